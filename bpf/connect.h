/* Entry/return logic shared by the `kprobe` and `fentry` modes, which both hook
 * tcp_v4_connect(sk, uaddr, addr_len) and tcp_v6_connect(sk, uaddr, addr_len).
 *
 * The destination is read from `uaddr`, the caller's sockaddr already copied into kernel
 * memory. Its layout is UAPI (family, port, address at fixed offsets), unlike struct sock,
 * whose field offsets come from headers that may not match the running kernel.
 *
 * tcp_v6_connect() handles a v4-mapped destination by calling tcp_v4_connect() itself. The
 * outer call records the connection in `pending` keyed by thread; the inner call finds the
 * entry and stays silent, so one connection gives one event, with the v6 socket's view. */
#ifndef IMDSWATCH_CONNECT_H
#define IMDSWATCH_CONNECT_H

#include "imdswatch.h"

#define IMDS_FN_V4 4
#define IMDS_FN_V6 6
#define IMDS_PENDING_MAX_AGE_NS 1000000000ULL

/* UAPI sockaddr_in / sockaddr_in6, declared here so no header version can move a field. */
struct imds_sockaddr_in {
    __u16 family;
    __be16 port;
    __u8 addr[4];
};
struct imds_sockaddr_in6 {
    __u16 family;
    __be16 port;
    __u32 flowinfo;
    __u8 addr[16];
};

struct imds_pending {
    struct imds_event ev;
    __u32 fn;        /* which function recorded it: only that one's return emits */
    __u32 matched;   /* 0: a v6 call whose mapped destination is not an endpoint */
};

BPF_HASH(pending, __u32, struct imds_pending, 10240);

static __always_inline int imds_connect_enter(void *uaddr, int addr_len, __u32 fn,
                                              __u8 probe)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    if (fn == IMDS_FN_V4) {
        struct imds_pending *outer = pending.lookup(&tid);
        /* Nested in tcp_v6_connect: the outer call reports it. tcp_v*_connect never sleeps
         * for the handshake, so an older record is a leftover of a missed return probe
         * (kretprobe maxactive overflow) and must not silence this connection. */
        if (outer && outer->fn == IMDS_FN_V6 &&
            bpf_ktime_get_ns() - outer->ev.ts_ns < IMDS_PENDING_MAX_AGE_NS)
            return 0;
    }

    struct imds_pending p = {};
    __u16 family = 0;
    bpf_probe_read_kernel(&family, sizeof(family), uaddr);
    if (family == IMDS_AF_INET && addr_len >= (int)sizeof(struct imds_sockaddr_in)) {
        struct imds_sockaddr_in sa = {};
        bpf_probe_read_kernel(&sa, sizeof(sa), uaddr);
        p.ev.family = IMDS_AF_INET;
        p.ev.dport = bpf_ntohs(sa.port);
        __builtin_memcpy(p.ev.daddr, sa.addr, 4);
    } else if (family == IMDS_AF_INET6 && addr_len >= 24) {
        struct imds_sockaddr_in6 sa = {};
        bpf_probe_read_kernel(&sa, sizeof(sa), uaddr);
        p.ev.family = IMDS_AF_INET6;
        p.ev.dport = bpf_ntohs(sa.port);
        __builtin_memcpy(p.ev.daddr, sa.addr, 16);
    } else {
        return 0;    /* AF_UNSPEC disconnect or a short address: not a connection */
    }
    p.matched = imds_match(p.ev.family, p.ev.daddr, p.ev.dport);
    /* Only a v4-mapped v6 call goes on into tcp_v4_connect, so only that one is recorded
     * when it does not match (to keep its nested call silent); others need no record. */
    if (!p.matched && (fn == IMDS_FN_V4 || !imds_is_v4_mapped(p.ev.daddr)))
        return 0;
    p.fn = fn;
    imds_fill_task(&p.ev, probe);
    if (pending.update(&tid, &p) != 0)
        imds_stat_inc(IMDS_STAT_PENDING_FULL);
    return 0;
}

static __always_inline int imds_connect_return(void *ctx, int ret, __u32 fn)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct imds_pending *p = pending.lookup(&tid);
    if (!p || p->fn != fn)
        return 0;
    if (p->matched) {
        p->ev.result = ret;
        imds_emit(ctx, &p->ev);
    }
    pending.delete(&tid);
    return 0;
}

#endif /* IMDSWATCH_CONNECT_H */
