/* Attach mode `tracepoint`: sock:inet_sock_set_state, CLOSE -> SYN_SENT on TCP sockets.
 * The tracepoint's format is stable ABI read from tracefs, so no kernel header has to match
 * the running kernel. It fires in the connecting task's context (connect(), io_uring, TCP
 * Fast Open sendmsg), once per connection even for v4-mapped IPv6 sockets. It does not see
 * connect()'s return value. */
#include "imdswatch.h"

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IMDS_IPPROTO_TCP)
        return 0;
    if (args->oldstate != IMDS_TCP_CLOSE || args->newstate != IMDS_TCP_SYN_SENT)
        return 0;

    struct imds_event ev = {};
    ev.family = args->family;
    ev.dport = args->dport;                 /* the tracepoint stores it host-order */
    /* Copied with a helper: a plain memcpy lets clang read the ctx at computed offsets
     * later on, which the verifier rejects. */
    if (ev.family == IMDS_AF_INET)
        bpf_probe_read_kernel(ev.daddr, 4, args->daddr);
    else if (ev.family == IMDS_AF_INET6)
        bpf_probe_read_kernel(ev.daddr, 16, args->daddr_v6);
    else
        return 0;
    if (!imds_match(ev.family, ev.daddr, ev.dport))
        return 0;

    imds_fill_task(&ev, IMDS_PROBE_TRACEPOINT);
    ev.result = IMDS_RESULT_UNKNOWN;
    imds_emit(args, &ev);
    return 0;
}
