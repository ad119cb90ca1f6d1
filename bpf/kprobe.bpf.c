/* Attach mode `kprobe`: kprobe + kretprobe on tcp_v4_connect and tcp_v6_connect, the design
 * card's probe. The entry reads the destination from uaddr; the return adds the result.
 * Function names carry no kprobe__ prefix: the tracer attaches them itself, so it can verify
 * each attach and fall back. */
#include "connect.h"

int imds_kprobe_v4(struct pt_regs *ctx, void *sk, void *uaddr, int addr_len)
{
    return imds_connect_enter(uaddr, addr_len, IMDS_FN_V4, IMDS_PROBE_KPROBE);
}

int imds_kprobe_v6(struct pt_regs *ctx, void *sk, void *uaddr, int addr_len)
{
    return imds_connect_enter(uaddr, addr_len, IMDS_FN_V6, IMDS_PROBE_KPROBE);
}

int imds_kretprobe_v4(struct pt_regs *ctx)
{
    return imds_connect_return(ctx, (int)PT_REGS_RC(ctx), IMDS_FN_V4);
}

int imds_kretprobe_v6(struct pt_regs *ctx)
{
    return imds_connect_return(ctx, (int)PT_REGS_RC(ctx), IMDS_FN_V6);
}
