/* Request capture: a cgroup_skb/egress program on the cgroup v2 root that copies the first
 * bytes of every segment a process sends on a connection to a metadata endpoint, for
 * userspace to read the HTTP requests from (tracer/requests.py).
 *
 * Where it runs: ip_finish_output()/ip6_finish_output(), after netfilter's OUTPUT and
 * POSTROUTING hooks, so the packet carries its destination after NAT. A socket whose
 * connect() named another address but that a DNAT rule sends to a metadata address is seen
 * here by the packet's destination; one that named a metadata address and is sent elsewhere
 * (a node proxy) by the socket's own destination. Both are tested for every packet, with the
 * first-byte arrays of imdswatch.h: two array lookups (a few ns) are all other traffic pays.
 *
 * Which connections: `tracked` (socket cookie -> connection), filled by the cgroup connect
 * hook (cgroup mode, which knows the cookie) or here at the connection's first SYN, which
 * the kernel sends from connect() itself, in the caller's context (so the caller's identity
 * is read here too). A connection's FIN or RST ends its tracking. Userspace also removes a
 * connection whose first bytes are not HTTP (TLS, anything else): no more copies for it.
 *
 * Bytes read: at most IMDS_CAPTURE_BYTES of each segment, copied straight into the output
 * buffer; segments longer than that are marked (len > captured) and counted.
 *
 * Kernels that refuse task helpers here (Debian's 5.10, 6.1 and 6.12 answer "unknown func
 * bpf_get_current_pid_tgid" for cgroup_skb; the reference 6.18 allows it) get
 * `imdsw_egress_tracked`: the
 * same program without the first-SYN path, so it follows only connections a connect hook
 * tracked. The cgroup mode's hooks track theirs; other modes attach `imdsw_track4/6`, cgroup
 * connect hooks that only tie the socket cookie to the connecting thread. A connection that
 * becomes a metadata connection only after NAT is not seen there (userspace says so).
 *
 * The programs always return 1 (pass/allow): they observe and never drop a packet. */
#ifndef IMDSWATCH_REQUESTS_H
#define IMDSWATCH_REQUESTS_H

#ifndef IMDS_CAPTURE_BYTES
#define IMDS_CAPTURE_BYTES 1024
#endif
#ifndef IMDS_TRACKED_ENTRIES
#define IMDS_TRACKED_ENTRIES 8192
#endif

#define IMDS_ETH_P_IP 0x0800
#define IMDS_ETH_P_IPV6 0x86DD
#define IMDS_TCP_FIN 0x01
#define IMDS_TCP_SYN 0x02
#define IMDS_TCP_RST 0x04
#define IMDS_TCP_ACK 0x10
#define IMDS_PASS 1

struct imds_data {
    __u32 kind;        /* IMDS_KIND_DATA or IMDS_KIND_CLOSE */
    __u32 len;         /* payload bytes of the segment */
    __u64 ts_ns;
    __u64 cookie;
    __u32 seq;         /* TCP sequence number of the segment's first payload byte */
    __u32 captured;    /* bytes copied into data (<= IMDS_CAPTURE_BYTES) */
    __u8 data[IMDS_CAPTURE_BYTES];
};

struct imds_conn {
    __u64 ts_ns;
    __u32 tgid;
    __u32 tid;
};

/* LRU: bounded; a connection idle long enough to be evicted by newer ones loses its later
 * requests (counted in userspace as requests on unknown connections never arrive). */
BPF_TABLE("lru_hash", __u64, struct imds_conn, tracked, IMDS_TRACKED_ENTRIES);

#ifndef IMDS_USE_RINGBUF
/* The perf buffer copies from memory the program owns: a per-CPU scratch record. */
BPF_PERCPU_ARRAY(data_scratch, struct imds_data, 1);
#endif

static __always_inline void imds_track(__u64 cookie, struct imds_event *ev)
{
    struct imds_conn c = {.ts_ns = ev->ts_ns, .tgid = ev->tgid, .tid = ev->pid};
    tracked.update(&cookie, &c);
}

static __always_inline void imds_segment(struct __sk_buff *skb, __u64 cookie, __u32 kind,
                                         __u32 off, __u32 len, __u32 seq)
{
    struct imds_data *out;
#ifdef IMDS_USE_RINGBUF
    out = events.ringbuf_reserve(sizeof(*out));
    if (!out) {
        imds_stat_inc(IMDS_STAT_SEGMENTS_DROPPED);
        return;
    }
#else
    int zero = 0;
    out = data_scratch.lookup(&zero);
    if (!out)
        return;
#endif
    __u64 n = len;
    if (n > IMDS_CAPTURE_BYTES) {
        n = IMDS_CAPTURE_BYTES;
        imds_stat_inc(IMDS_STAT_TRUNCATED);
    }
    out->kind = kind;
    out->len = len;
    out->ts_ns = bpf_ktime_get_ns();
    out->cookie = cookie;
    out->seq = seq;
    out->captured = 0;
    /* The helper needs a length the verifier knows to lie in 1..IMDS_CAPTURE_BYTES. Older
     * verifiers (5.10) learn no lower bound from `n != 0`, so the range is checked on n - 1
     * with one unsigned compare (n == 0 wraps above it) and 1 added after; 64-bit and
     * behind an empty asm, so the very register that was bounded reaches the helper
     * (clang otherwise reloads the unbounded 32-bit value). */
    __u64 m = n - 1;
    asm volatile("" : "+r"(m));
    if (m < IMDS_CAPTURE_BYTES && bpf_skb_load_bytes(skb, off, out->data, m + 1) == 0)
        out->captured = m + 1;
#ifdef IMDS_USE_RINGBUF
    events.ringbuf_submit(out, 0);
    imds_stat_inc(IMDS_STAT_SEGMENTS);
#else
    /* Only the used part of the record goes out. */
    __u64 size = sizeof(*out) - IMDS_CAPTURE_BYTES + out->captured;
    asm volatile("" : "+r"(size));
    if (size > sizeof(*out))
        size = sizeof(*out);
    if (events.perf_submit(skb, out, size) != 0)
        imds_stat_inc(IMDS_STAT_SEGMENTS_DROPPED);
    else
        imds_stat_inc(IMDS_STAT_SEGMENTS);
#endif
}

/* The first SYN of a connection nobody tracks yet: when the packet's destination (after
 * NAT) or the socket's own destination is an endpoint, track it and report it. */
static __always_inline void imds_syn(struct __sk_buff *skb, __u64 cookie, __u16 family,
                                     __u8 *pkt_daddr, __u16 pkt_dport)
{
    struct imds_event ev = {};
    ev.family = family;
    ev.dport = pkt_dport;
    __builtin_memcpy(ev.daddr, pkt_daddr, 16);
    /* The socket's destination, as connect() named it (netfilter never rewrites the
     * socket). __sk_buff.remote_port holds the network-order port in its upper 16 bits on
     * little-endian machines and its lower 16 on big-endian ones: the other half is zero. */
    __u32 rport = skb->remote_port;
    ev.sock_dport = bpf_ntohs((__u16)(rport >> 16)) | bpf_ntohs((__u16)rport);
    __u32 *w = (__u32 *)ev.sock_daddr;
    if (family == IMDS_AF_INET) {
        ev.sock_family = IMDS_AF_INET;
        w[0] = skb->remote_ip4;
    } else {
        ev.sock_family = IMDS_AF_INET6;
        w[0] = skb->remote_ip6[0];
        w[1] = skb->remote_ip6[1];
        w[2] = skb->remote_ip6[2];
        w[3] = skb->remote_ip6[3];
    }
    int pkt = imds_match(family, ev.daddr, ev.dport);
    int sock = imds_match(ev.sock_family, ev.sock_daddr, ev.sock_dport);
    if (!pkt && !sock)
        return;
    imds_fill_task(&ev, IMDS_PROBE_CGROUP_SKB);
    ev.kind = IMDS_KIND_SYN;
    ev.cookie = cookie;
    ev.result = IMDS_RESULT_UNKNOWN;
    __u32 *a = (__u32 *)ev.daddr, *b = (__u32 *)ev.sock_daddr;
    if (ev.dport != ev.sock_dport || a[0] != b[0] || a[1] != b[1] || a[2] != b[2] ||
        a[3] != b[3])
        ev.flags |= IMDS_F_NAT;
    imds_track(cookie, &ev);
    if (sock) {
        /* The connect probe saw (and counted) this connection: this record only ties the
         * socket cookie to the connecting thread. */
        ev.flags |= IMDS_F_SOCK_MATCH;
        imds_output(skb, &ev, IMDS_STAT_SEGMENTS, IMDS_STAT_SEGMENTS_DROPPED);
    } else {
        imds_emit(skb, &ev);    /* seen only after NAT: counted here */
    }
}

/* `follow_new`: a compile-time constant. 0 leaves imds_syn (and its task helpers) out of the
 * program, for kernels that refuse them in cgroup_skb. */
static __always_inline int imds_egress_slow(struct __sk_buff *skb, __u16 family, __u32 ihl,
                                            int follow_new)
{
    __u8 tcp[20];
    if (bpf_skb_load_bytes(skb, ihl, tcp, sizeof(tcp)) < 0)
        return IMDS_PASS;
    __u32 doff = (tcp[12] >> 4) * 4;
    __u8 flags = tcp[13];
    __u32 off = ihl + doff;
    __u32 len = skb->len > off ? skb->len - off : 0;
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct imds_conn *c = tracked.lookup(&cookie);
    if (!c) {
        if (!follow_new)
            return IMDS_PASS;
        if ((flags & (IMDS_TCP_SYN | IMDS_TCP_ACK)) != IMDS_TCP_SYN)
            return IMDS_PASS;    /* not ours: a server's reply, an older connection */
        __u8 daddr[16] = {};
        if (family == IMDS_AF_INET)
            bpf_skb_load_bytes(skb, 16, daddr, 4);
        else
            bpf_skb_load_bytes(skb, 24, daddr, 16);
        imds_syn(skb, cookie, family, daddr, ((__u16)tcp[2] << 8) | tcp[3]);
        if (!tracked.lookup(&cookie))
            return IMDS_PASS;
    }
    __u32 seq = ((__u32)tcp[4] << 24) | ((__u32)tcp[5] << 16) | ((__u32)tcp[6] << 8) | tcp[7];
    if (len > 0)
        imds_segment(skb, cookie, IMDS_KIND_DATA, off, len, seq);
    if (flags & (IMDS_TCP_FIN | IMDS_TCP_RST)) {
        imds_segment(skb, cookie, IMDS_KIND_CLOSE, 0, 0, seq);
        tracked.delete(&cookie);
    }
    return IMDS_PASS;
}

static __always_inline int imds_first_set(__u32 *first)
{
    return first && *first;
}

static __always_inline int imds_egress(struct __sk_buff *skb, int follow_new)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    __u32 idx;
    if (skb->protocol == bpf_htons(IMDS_ETH_P_IP)) {
        __u8 *ip = data;
        if (data + 20 > end || ip[9] != IMDS_IPPROTO_TCP)
            return IMDS_PASS;
        idx = ip[16];    /* first byte of the destination after NAT */
        if (!imds_first_set(first4.lookup(&idx))) {
            idx = skb->remote_ip4 & 0xff;    /* the socket's: network order, first byte low */
            if (!imds_first_set(first4.lookup(&idx)))
                return IMDS_PASS;
        }
        return imds_egress_slow(skb, IMDS_AF_INET, (ip[0] & 0xf) * 4, follow_new);
    }
    if (skb->protocol == bpf_htons(IMDS_ETH_P_IPV6)) {
        __u8 *ip6 = data;
        if (data + 40 > end || ip6[6] != IMDS_IPPROTO_TCP)
            return IMDS_PASS;    /* extension headers: not followed */
        idx = ip6[24];
        if (!imds_first_set(first6.lookup(&idx))) {
            idx = skb->remote_ip6[0] & 0xff;
            if (!imds_first_set(first6.lookup(&idx)))
                return IMDS_PASS;
        }
        return imds_egress_slow(skb, IMDS_AF_INET6, 40, follow_new);
    }
    return IMDS_PASS;
}

int imdsw_egress(struct __sk_buff *skb)
{
    return imds_egress(skb, 1);
}

int imdsw_egress_tracked(struct __sk_buff *skb)
{
    return imds_egress(skb, 0);
}

/* For `imdsw_egress_tracked` in the probe modes that know no socket cookie (fentry, kprobe,
 * tracepoint): a cgroup connect hook that tracks a metadata connection's cookie and hands
 * userspace the SYN record that pairs the cookie with the connecting thread (the record
 * imds_syn makes on kernels that allow it). It runs before tcp_v4_connect, so the record
 * precedes the mode's connect event; userspace pairs them by thread either way. It
 * counts nothing: the mode's own probe sees and counts the connect. Always allows. */
static __always_inline void imds_track_connect(struct bpf_sock_addr *ctx, __u16 family)
{
    struct imds_event ev = {};
    if (!imds_sock_addr_match(ctx, family, &ev))
        return;
    __u64 id = bpf_get_current_pid_tgid();
    ev.kind = IMDS_KIND_SYN;
    ev.flags = IMDS_F_SOCK_MATCH;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.pid = (__u32)id;
    ev.tgid = id >> 32;
    ev.probe = IMDS_PROBE_CGROUP_SKB;
    ev.result = IMDS_RESULT_UNKNOWN;
    ev.cookie = bpf_get_socket_cookie(ctx);
    imds_track(ev.cookie, &ev);
    imds_output(ctx, &ev, IMDS_STAT_SEGMENTS, IMDS_STAT_SEGMENTS_DROPPED);
}

int imdsw_track4(struct bpf_sock_addr *ctx)
{
    imds_track_connect(ctx, IMDS_AF_INET);
    return 1;
}

int imdsw_track6(struct bpf_sock_addr *ctx)
{
    imds_track_connect(ctx, IMDS_AF_INET6);
    return 1;
}

#endif /* IMDSWATCH_REQUESTS_H */
