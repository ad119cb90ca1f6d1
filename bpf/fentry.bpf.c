/* Attach mode `fentry`: fentry/fexit on tcp_v4_connect and tcp_v6_connect through BPF
 * trampolines, cheaper than kprobes (no breakpoint trap). Same entry/return logic as the
 * kprobe mode; BCC names these kfunc__<fn> / kretfunc__<fn> and needs kernel BTF. */
#include "connect.h"

KFUNC_PROBE(tcp_v4_connect, void *sk, void *uaddr, int addr_len)
{
    return imds_connect_enter(uaddr, addr_len, IMDS_FN_V4, IMDS_PROBE_FENTRY);
}

KFUNC_PROBE(tcp_v6_connect, void *sk, void *uaddr, int addr_len)
{
    return imds_connect_enter(uaddr, addr_len, IMDS_FN_V6, IMDS_PROBE_FENTRY);
}

KRETFUNC_PROBE(tcp_v4_connect, void *sk, void *uaddr, int addr_len, int ret)
{
    return imds_connect_return(ctx, ret, IMDS_FN_V4);
}

KRETFUNC_PROBE(tcp_v6_connect, void *sk, void *uaddr, int addr_len, int ret)
{
    return imds_connect_return(ctx, ret, IMDS_FN_V6);
}
