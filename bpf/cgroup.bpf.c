/* Attach mode `cgroup`: BPF_PROG_TYPE_CGROUP_SOCK_ADDR programs on the cgroup v2 root's
 * BPF_CGROUP_INET4_CONNECT and BPF_CGROUP_INET6_CONNECT hooks. The kernel runs them once per
 * connect() (also io_uring and TCP Fast Open connects) before the connection is attempted,
 * in the caller's context, on every socket of every cgroup below the root. The destination
 * comes from `struct bpf_sock_addr` (UAPI: user_family, user_ip4, user_ip6, user_port in
 * network order), not from kernel structures. No result: the hook runs before connect().
 *
 * A v4-mapped destination on an AF_INET6 socket reaches only the INET6 hook (the kernel's
 * tcp_v6_connect calls tcp_v4_connect directly, not the INET4 hook), as ::ffff:a.b.c.d,
 * which imds_match folds into the IPv4 trie: one connect, one event.
 *
 * These programs observe and never block: they ALWAYS return 1 (allow). Returning 0 would
 * make connect() fail with EPERM for every process on the machine. */
#include "imdswatch.h"

#define IMDS_ALLOW 1

static __always_inline void imds_cgroup_connect(struct bpf_sock_addr *ctx, __u16 family)
{
    struct imds_event ev = {};
    if (!imds_sock_addr_match(ctx, family, &ev))
        return;

    imds_fill_task(&ev, IMDS_PROBE_CGROUP);
    ev.result = IMDS_RESULT_UNKNOWN;
    /* The socket's cookie ties this connect to the segments request capture copies
     * (bpf/requests.h); tracking starts before the SYN leaves. */
    ev.cookie = bpf_get_socket_cookie(ctx);
    imds_track(ev.cookie, &ev);
    imds_emit(ctx, &ev);
}

int imdsw_connect4(struct bpf_sock_addr *ctx)
{
    imds_cgroup_connect(ctx, IMDS_AF_INET);
    return IMDS_ALLOW;
}

int imdsw_connect6(struct bpf_sock_addr *ctx)
{
    imds_cgroup_connect(ctx, IMDS_AF_INET6);
    return IMDS_ALLOW;
}
