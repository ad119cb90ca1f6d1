/* Shared by every attach mode: the event layout, the maps, the endpoint filter and the
 * output path. Each bpf/<mode>.bpf.c includes this file and only adds its probe functions,
 * so the four modes cannot drift apart. tracer/layout.py mirrors `struct imds_event`. */
#ifndef IMDSWATCH_H
#define IMDSWATCH_H

#include <uapi/linux/ptrace.h>

/* Numeric constants instead of kernel enums: BCC's headers here need not match the running
 * kernel, and these values are ABI (socket families, TCP states, protocol numbers). */
#define IMDS_AF_INET 2
#define IMDS_AF_INET6 10
#define IMDS_IPPROTO_TCP 6
#define IMDS_TCP_SYN_SENT 2
#define IMDS_TCP_CLOSE 7

#define IMDS_PROBE_TRACEPOINT 1
#define IMDS_PROBE_KPROBE 2
#define IMDS_PROBE_FENTRY 3
#define IMDS_PROBE_CGROUP 4
#define IMDS_PROBE_CGROUP_SKB 5

/* The probe's result field when it cannot see connect()'s return value. */
#define IMDS_RESULT_UNKNOWN 1

#define IMDS_COMM_LEN 16
#define IMDS_EXE_LEN 48

/* Record kinds in the output buffer: the first 4 bytes of every record. */
#define IMDS_KIND_CONNECT 1  /* a connect to an endpoint (struct imds_event) */
#define IMDS_KIND_SYN 2      /* request capture: first SYN of a connection (struct imds_event) */
#define IMDS_KIND_DATA 3     /* request capture: payload bytes of a segment (struct imds_data) */
#define IMDS_KIND_CLOSE 4    /* request capture: FIN or RST sent (struct imds_data, no bytes) */

/* imds_event.flags */
#define IMDS_F_IDENTITY 1    /* leader_comm, exe_name, exe_ino were read from the task */
#define IMDS_F_NAT 2         /* SYN: the packet's destination differs from the socket's */
#define IMDS_F_SOCK_MATCH 4  /* SYN: the socket's own destination is an endpoint, so the
                              * connect probe reported it too (joined by thread id) */
#define IMDS_F_RECORD 8      /* the process's identity record (bpf/identity.h) follows */

struct imds_event {
    __u32 kind;        /* IMDS_KIND_CONNECT or IMDS_KIND_SYN */
    __u32 flags;       /* IMDS_F_* */
    __u64 ts_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, converted in userspace */
    __u64 cgroup_id;   /* cgroup v2 id of the caller */
    __u64 cookie;      /* socket cookie; 0 where the probe cannot see the socket */
    __u64 exe_ino;     /* inode number of the process's executable at connect time */
    __u32 pid;         /* thread id (kernel pid) */
    __u32 tgid;        /* process id (userspace pid) */
    __u32 uid;
    __u32 gid;
    __s32 result;      /* connect() return value; IMDS_RESULT_UNKNOWN when unseen */
    __u16 family;      /* IMDS_AF_INET or IMDS_AF_INET6 as the socket saw it */
    __u16 dport;       /* host byte order */
    __u8 daddr[16];    /* v4: first 4 bytes; v6 (including v4-mapped): all 16 */
    __u16 sock_family; /* SYN: the socket's own destination (what connect() asked for) */
    __u16 sock_dport;
    __u8 sock_daddr[16];
    char comm[IMDS_COMM_LEN];        /* the calling thread's name */
    char leader_comm[IMDS_COMM_LEN]; /* the thread-group leader's (the process's) name */
    char exe_name[IMDS_EXE_LEN];     /* file name of the executable at connect time */
    __u8 probe;        /* IMDS_PROBE_* */
    __u8 pad[3];
};

/* LPM keys: prefix length in bits, then the address in network byte order. */
struct imds_key4 {
    __u32 prefixlen;
    __u8 addr[4];
};
struct imds_key6 {
    __u32 prefixlen;
    __u8 addr[16];
};

/* The port set of an endpoint prefix: every port, or a 65536-bit bitmap. A bitmap keeps the
 * lookup O(1) with no loop for the verifier, and 8 KiB per prefix is nothing for a catalog
 * of a few dozen entries. Userspace folds the ports of every broader prefix into each entry,
 * so the longest-prefix match alone gives the catalog's answer. */
struct imds_ports {
    __u32 any_port;
    __u32 pad;
    __u64 bits[1024];
};

/* Per (process name, uid, cgroup) connection counts. Counted before the event is reserved,
 * so a flood that overruns the output buffer still counts every connection. An LRU map:
 * a flood of distinct names evicts the least recently counted keys instead of filling up
 * (the totals in `stats` stay exact). */
struct imds_count_key {
    char comm[IMDS_COMM_LEN];
    __u32 uid;
    __u32 pad;
    __u64 cgroup_id;
};

enum imds_stat {
    IMDS_STAT_MATCHED = 0,   /* connections to an endpoint */
    IMDS_STAT_EMITTED = 1,   /* events handed to the output buffer */
    IMDS_STAT_DROPPED = 2,   /* events the output buffer had no room for */
    IMDS_STAT_COUNT_FULL = 3,/* count updates that failed */
    IMDS_STAT_PENDING_FULL = 4, /* entry/return probes: in-flight table full */
    IMDS_STAT_SEGMENTS = 5,  /* request capture: records handed to the buffer (segments,
                              * closes, SYN records that pair a connect with its cookie) */
    IMDS_STAT_SEGMENTS_DROPPED = 6, /* request capture: records the buffer had no room for */
    IMDS_STAT_TRUNCATED = 7, /* request capture: segments longer than the capture size */
    IMDS_STAT_MAX = 8,
};

BPF_LPM_TRIE(endpoints4, struct imds_key4, struct imds_ports, 1024);
BPF_LPM_TRIE(endpoints6, struct imds_key6, struct imds_ports, 1024);
/* First address byte -> 1 when some trie entry covers addresses starting with it: an array
 * lookup (a few ns) turns away almost every non-metadata destination before the LPM walk
 * (~100 ns), which matters for the once-per-connect modes' cost on ordinary traffic.
 * Userspace sets a byte before writing the trie entries that need it and clears it after
 * removing the last one, so a reload never hides an endpoint. */
BPF_ARRAY(first4, __u32, 256);
BPF_ARRAY(first6, __u32, 256);
BPF_TABLE("lru_hash", struct imds_count_key, __u64, conn_counts, IMDS_COUNT_ENTRIES);
BPF_PERCPU_ARRAY(stats, __u64, IMDS_STAT_MAX);

#ifdef IMDS_USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, IMDS_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

static __always_inline void imds_stat_inc(int idx)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;    /* per-CPU slot: no atomic needed */
}

static __always_inline int imds_port_in(struct imds_ports *p, __u16 port)
{
    if (p->any_port)
        return 1;
    __u32 idx = (port >> 6) & 1023;   /* mask: keeps the verifier's bound explicit */
    return (p->bits[idx] >> (port & 63)) & 1;
}

static __always_inline int imds_is_v4_mapped(const __u8 *a)
{
    const __u32 *w = (const __u32 *)a;
    return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

/* True when daddr (16 bytes, v6 or v4-mapped v6) / 4 bytes (v4) is a catalog endpoint. */
static __always_inline int imds_match(__u16 family, const __u8 *daddr, __u16 port)
{
    struct imds_ports *p;
    __u32 idx;
    __u32 *first;
    if (family == IMDS_AF_INET)
        idx = daddr[0];
    else if (imds_is_v4_mapped(daddr))
        idx = daddr[12];
    else
        idx = daddr[0];
    if (family == IMDS_AF_INET6 && !imds_is_v4_mapped(daddr))
        first = first6.lookup(&idx);
    else
        first = first4.lookup(&idx);
    if (!first || !*first)
        return 0;
    if (family == IMDS_AF_INET) {
        struct imds_key4 k = {.prefixlen = 32};
        __builtin_memcpy(k.addr, daddr, 4);
        p = endpoints4.lookup(&k);
    } else {
        /* ::ffff:a.b.c.d reaches the IPv4 endpoint a.b.c.d */
        if (imds_is_v4_mapped(daddr)) {
            struct imds_key4 k = {.prefixlen = 32};
            __builtin_memcpy(k.addr, daddr + 12, 4);
            p = endpoints4.lookup(&k);
        } else {
            struct imds_key6 k = {.prefixlen = 128};
            __builtin_memcpy(k.addr, daddr, 16);
            p = endpoints6.lookup(&k);
        }
    }
    return p && imds_port_in(p, port);
}

/* A cgroup connect hook's TCP destination (struct bpf_sock_addr: UAPI, network order) into
 * `ev`; 1 when it is an endpoint. UDP connect() sends nothing: never one. */
static __always_inline int imds_sock_addr_match(struct bpf_sock_addr *ctx, __u16 family,
                                                struct imds_event *ev)
{
    if (ctx->type != 1)    /* SOCK_STREAM */
        return 0;
    __u32 *w = (__u32 *)ev->daddr;
    ev->family = family;
    ev->dport = bpf_ntohs((__u16)ctx->user_port);
    if (family == IMDS_AF_INET) {
        w[0] = ctx->user_ip4;
    } else {
        w[0] = ctx->user_ip6[0];
        w[1] = ctx->user_ip6[1];
        w[2] = ctx->user_ip6[2];
        w[3] = ctx->user_ip6[3];
    }
    return imds_match(ev->family, ev->daddr, ev->dport);
}

static __always_inline void imds_count(struct imds_event *ev)
{
    struct imds_count_key key = {};
    __builtin_memcpy(key.comm, ev->leader_comm, IMDS_COMM_LEN);
    key.uid = ev->uid;
    key.cgroup_id = ev->cgroup_id;
    __u64 one = 1, *n = conn_counts.lookup(&key);
    if (n) {
        __sync_fetch_and_add(n, 1);
        return;
    }
    /* LRU: never full; COUNT_FULL now counts failures of a concurrent insert only */
    if (conn_counts.update(&key, &one) != 0)
        imds_stat_inc(IMDS_STAT_COUNT_FULL);
}

#ifdef IMDS_HELPER_READ_KERNEL
/* bpf_probe_read_kernel called by the kernel's own helper number (from its BTF, see
 * tracer/btf.py), not by BCC's name: BCC decides whether the kernel has that helper by
 * looking it up in /proc/kallsyms, which shows zero addresses to a process without
 * CAP_SYSLOG (the DaemonSet drops it). BCC then renames the call to the old
 * bpf_probe_read, which only tracing programs may call, and the verifier refuses the cgroup
 * program ("program of this type cannot use helper bpf_probe_read#4"). */
static long (*imds_read_kernel)(void *dst, __u32 size, const void *src) =
    (void *)IMDS_HELPER_READ_KERNEL;
static long (*imds_read_kernel_str)(void *dst, __u32 size, const void *src) =
    (void *)IMDS_HELPER_READ_KERNEL_STR;
#else
#define imds_read_kernel bpf_probe_read_kernel
#define imds_read_kernel_str bpf_probe_read_kernel_str
#endif

/* A task's name into a zeroed buffer, up to its NUL only. Before 6.x the kernel set a name
 * with strlcpy, which leaves the bytes after the NUL as an earlier name's ("curl\0on3" after
 * python3 -> env -> curl): compared or used as a key in full, they would make one name many. */
#define imds_read_comm(dst, task) \
    imds_read_kernel_str((dst), IMDS_COMM_LEN, (char *)(task) + IMDS_OFF_TASK_COMM)

#include "identity.h"

/* The process's identity as the kernel sees it at this moment: the thread-group leader's
 * name (a thread's own comm is "iou-wrk-12" for io_uring workers, a JVM thread name...) and
 * the executable's file name and inode (what runs, before anything can exec another binary).
 * Offsets come from the running kernel's BTF (tracer/btf.py passes them as -D constants);
 * without them the leader name falls back to the thread's and no exe is read. */
static __always_inline void imds_fill_identity(struct imds_event *ev)
{
    /* IMDS_NO_TASK_READS: the mode's programs may not read the task on this kernel (the
     * identity record, read by tgid, still comes with every event). */
#if defined(IMDS_OFF_TASK_GROUP_LEADER) && !defined(IMDS_NO_TASK_READS)
    char *task = (char *)bpf_get_current_task();
    char *leader = 0, *mm = 0, *file = 0, *dentry = 0, *inode = 0, *name = 0;
    imds_read_kernel(&leader, sizeof(leader), task + IMDS_OFF_TASK_GROUP_LEADER);
    if (leader)
        imds_read_comm(ev->leader_comm, leader);
    else
        __builtin_memcpy(ev->leader_comm, ev->comm, IMDS_COMM_LEN);
    imds_read_kernel(&mm, sizeof(mm), task + IMDS_OFF_TASK_MM);
    if (mm)
        imds_read_kernel(&file, sizeof(file), mm + IMDS_OFF_MM_EXE_FILE);
    if (file) {
        imds_read_kernel(&dentry, sizeof(dentry), file + IMDS_OFF_FILE_DENTRY);
        imds_read_kernel(&inode, sizeof(inode), file + IMDS_OFF_FILE_INODE);
    }
    if (dentry)
        imds_read_kernel(&name, sizeof(name), dentry + IMDS_OFF_DENTRY_NAME);
    if (name)
        imds_read_kernel_str(ev->exe_name, IMDS_EXE_LEN, name);
    if (inode)
        imds_read_kernel(&ev->exe_ino, sizeof(ev->exe_ino), inode + IMDS_OFF_INODE_INO);
    ev->flags |= IMDS_F_IDENTITY;
#else
    __builtin_memcpy(ev->leader_comm, ev->comm, IMDS_COMM_LEN);
#endif
}

/* Fill the process fields the kernel knows for sure. */
static __always_inline void imds_fill_task(struct imds_event *ev, __u8 probe)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u64 ug = bpf_get_current_uid_gid();
    ev->kind = IMDS_KIND_CONNECT;
    ev->ts_ns = bpf_ktime_get_ns();
    ev->pid = (__u32)id;
    ev->tgid = id >> 32;
    ev->uid = (__u32)ug;
    ev->gid = ug >> 32;
    ev->cgroup_id = bpf_get_current_cgroup_id();
    ev->probe = probe;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    imds_fill_identity(ev);
}

#ifndef IMDS_USE_RINGBUF
/* The perf buffer copies from memory the program owns: a per-CPU scratch record. */
BPF_PERCPU_ARRAY(record_scratch, struct imds_record, 1);
#endif

/* Hand a record to userspace: the event, then the calling process's identity record when it
 * has one. A full buffer is counted (in `lost`), never silent. */
static __always_inline void imds_output(void *ctx, struct imds_event *ev, int sent, int lost)
{
#ifdef IMDS_IDENTITY_RECORD
    __u32 tgid = ev->tgid;
    struct imds_ident *rec = identities.lookup(&tgid);
#else
    struct imds_ident *rec = 0;
#endif
#ifdef IMDS_USE_RINGBUF
    struct imds_record *out = events.ringbuf_reserve(sizeof(*out));
    if (!out) {
        imds_stat_inc(lost);
        return;
    }
#else
    __u32 zero = 0;
    struct imds_record *out = record_scratch.lookup(&zero);
    if (!out)
        return;
#endif
    __builtin_memcpy(&out->ev, ev, sizeof(*ev));
    if (rec) {
        __builtin_memcpy(&out->id, rec, sizeof(*rec));
        out->ev.flags |= IMDS_F_RECORD;
    } else {
        out->id.flags = 0;
        out->id.path_len = 0;
        out->id.args_len = 0;
    }
#ifdef IMDS_USE_RINGBUF
    events.ringbuf_submit(out, 0);
    imds_stat_inc(sent);
#else
    if (events.perf_submit(ctx, out, sizeof(*out)) != 0)
        imds_stat_inc(lost);
    else
        imds_stat_inc(sent);
#endif
}

/* Count, then hand the event to userspace. */
static __always_inline void imds_emit(void *ctx, struct imds_event *ev)
{
    imds_stat_inc(IMDS_STAT_MATCHED);
    imds_count(ev);
    imds_output(ctx, ev, IMDS_STAT_EMITTED, IMDS_STAT_DROPPED);
}

#include "requests.h"

#endif /* IMDSWATCH_H */
