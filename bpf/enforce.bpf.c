/* Enforcement (`imdswatch run --enforce deny`): BPF_PROG_TYPE_CGROUP_SOCK_ADDR programs on
 * the BPF_CGROUP_INET4_CONNECT and BPF_CGROUP_INET6_CONNECT hooks of the operator's
 * --enforce-cgroup, never the root. They are attached ONLY as BPF links: a link is
 * released with the agent's last descriptor of it, so an agent that stops, crashes or is
 * SIGKILLed leaves nothing that denies (fail open). BPF_PROG_ATTACH would persist.
 *
 * A connect to a catalog endpoint is judged by who makes it, read from the kernel at this
 * moment: the executable's (device, inode) from task->mm->exe_file, its file name, the
 * thread-group leader's name, the uid. User space projects the policy onto these maps so
 * that the kernel never denies a caller the policy allows (allow entries may be wider than
 * their rules, deny entries only as wide as theirs): allow entries first, then deny
 * entries, then the policy's default. Returning 0 makes connect() fail with EPERM.
 * Every other destination returns 1 after the same first-byte array lookup the tracer
 * does, before any map walk. */
#include "imdswatch.h"

#define ENF_ALLOW 1
#define ENF_DENY 0
#define ENF_ANY_UID 0xffffffffu
#define ENF_KIND_CONNECT 0
#define ENF_KIND_REQUEST 1
#ifndef ENF_PATH_LEN
#define ENF_PATH_LEN 128
#endif
#ifndef ENF_ALL_CLASSES
#define ENF_ALL_CLASSES 0x7f
#endif

enum enf_cfg {
    ENF_CFG_ARMED = 0,        /* 0: every connect allowed (break glass, disarm, learning) */
    ENF_CFG_DEFAULT_DENY = 1, /* 1: deny what no allow entry covers */
    ENF_CFG_AGENT_TGID = 2,   /* never the agent itself */
    ENF_CFG_ALLOW_ALL = 3,    /* an allow rule the kernel cannot narrow: allow everyone */
    ENF_CFG_REQUESTS = 4,     /* 1: the request programs are linked: restrict classes */
    ENF_CFG_MAX = 5,
};

enum enf_stat {
    ENF_STAT_JUDGED = 0,      /* metadata connects judged while armed */
    ENF_STAT_DENIED = 1,
    ENF_STAT_LOST = 2,        /* denial records the buffer had no room for */
    ENF_STAT_RESTRICTED = 3,  /* connects allowed for some request classes only */
    ENF_STAT_REQ_JUDGED = 4,  /* messages judged on restricted sockets */
    ENF_STAT_REQ_DENIED = 5,
    ENF_STAT_MAX = 6,
};

struct enf_exe_key {
    __u64 dev;                /* the kernel's dev_t of the executable's file system */
    __u64 ino;
    __u32 uid;                /* ENF_ANY_UID: any */
    __u32 pad;
};

struct enf_name_key {
    char name[IMDS_EXE_LEN];  /* executable file name, or the leader's comm */
    __u32 uid;
    __u32 kind;               /* 1: executable file name, 2: comm */
};

struct enf_event {
    __u64 ts_ns;
    __u64 cgroup_id;
    __u64 dev;
    __u64 ino;
    __u64 cookie;             /* a refused connect: its socket's cookie (0: a request) */
    __u32 pid;
    __u32 tgid;
    __u32 uid;
    __u32 gid;
    __u32 rule;               /* the deny entry's rule number + 1; 0: the default */
    __u16 family;
    __u16 dport;
    __u8 daddr[16];
    char comm[IMDS_COMM_LEN]; /* the thread-group leader's name */
    char exe_name[IMDS_EXE_LEN];
    __u32 kind;               /* ENF_KIND_CONNECT or ENF_KIND_REQUEST */
    __u32 classes;            /* a request: the classes it may be; a connect: allowed ones */
    char method[8];
    char path[ENF_PATH_LEN];  /* a request's target as sent, cut */
};

BPF_ARRAY(enf_config, __u64, ENF_CFG_MAX);
/* Allow entries: the value is the mask of request classes the entry's rules allow. */
BPF_HASH(enf_allow_exe, struct enf_exe_key, __u32, ENF_MAX_ENTRIES);
BPF_HASH(enf_allow_name, struct enf_name_key, __u32, ENF_MAX_ENTRIES);
BPF_HASH(enf_allow_uid, __u32, __u32, ENF_MAX_ENTRIES);
BPF_HASH(enf_deny_exe, struct enf_exe_key, __u32, ENF_MAX_ENTRIES);
BPF_HASH(enf_deny_uid, __u32, __u32, ENF_MAX_ENTRIES);
BPF_PERCPU_ARRAY(enf_stats, __u64, ENF_STAT_MAX);
BPF_PERCPU_ARRAY(enf_scratch, struct enf_event, 1);
/* The enforcement scope (--enforce-scope): while key 0 is present only callers whose
 * cgroup id is a key may be denied; every other caller is out of scope and allowed
 * (user space still audits it). Kept current by user space from the cgroup tree and the
 * pods it attributes; a cgroup it has not attributed yet is out of scope (fail open). */
BPF_HASH(enf_scope, __u64, __u32, ENF_MAX_ENTRIES);
/* Deny rules that name only a Kubernetes namespace: the cgroup ids of that namespace's
 * pods -> the rule number + 1, kept current by user space as enf_scope is (a pod not yet
 * attributed is not in it: fail open). */
BPF_HASH(enf_deny_cgroup, __u64, __u32, ENF_MAX_ENTRIES);
#ifndef IMDS_USE_RINGBUF
/* Denial records: imdswatch.h's ring buffer `events` where the kernel has one (the
 * helpers the tracer's cgroup programs already use on every kernel of the matrix), else
 * this perf buffer. */
BPF_PERF_OUTPUT(enf_events);
#endif

static __always_inline __u64 enf_cfg(int idx)
{
    __u64 *v = enf_config.lookup(&idx);
    return v ? *v : 0;
}

static __always_inline void enf_stat_inc(int idx)
{
    __u64 *v = enf_stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline void enf_identity(struct enf_event *ev)
{
    char *task = (char *)bpf_get_current_task();
    char *leader = 0, *mm = 0, *file = 0, *dentry = 0, *inode = 0, *name = 0, *sb = 0;
    __u32 dev = 0;
    imds_read_kernel(&leader, sizeof(leader), task + IMDS_OFF_TASK_GROUP_LEADER);
    if (leader)
        imds_read_comm(ev->comm, leader);
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
    if (inode) {
        imds_read_kernel(&ev->ino, sizeof(ev->ino), inode + IMDS_OFF_INODE_INO);
        imds_read_kernel(&sb, sizeof(sb), inode + ENF_OFF_INODE_SB);
    }
    if (sb) {
        imds_read_kernel(&dev, sizeof(dev), sb + ENF_OFF_SB_DEV);
        ev->dev = dev;
    }
}

/* 1 when the caller may be denied: no scope set, or its cgroup is in the scope. */
static __always_inline int enf_in_scope(void)
{
    __u64 key = 0;
    if (!enf_scope.lookup(&key))
        return 1;
    key = bpf_get_current_cgroup_id();
    return enf_scope.lookup(&key) != 0;
}

/* The namespace deny rule's number + 1 covering the caller's cgroup; 0 when none does. */
static __always_inline __u32 enf_denied_by_cgroup(void)
{
    __u64 id = bpf_get_current_cgroup_id();
    __u32 *rule = enf_deny_cgroup.lookup(&id);
    return rule ? *rule : 0;
}

/* The request classes the allow entries covering the caller allow together; 0 when none
 * covers it. Every entry is looked at: a caller covered by several may use what any of
 * them allows (the kernel may allow more than the policy, never less). */
static __always_inline __u32 enf_allowed(struct enf_event *ev)
{
    __u32 mask = 0, *v;
    struct enf_exe_key ek = {.dev = ev->dev, .ino = ev->ino, .uid = ev->uid};
    if ((v = enf_allow_exe.lookup(&ek)))
        mask |= *v;
    ek.uid = ENF_ANY_UID;
    if ((v = enf_allow_exe.lookup(&ek)))
        mask |= *v;
    struct enf_name_key nk = {.uid = ev->uid, .kind = 1};
    __builtin_memcpy(nk.name, ev->exe_name, IMDS_EXE_LEN);
    if ((v = enf_allow_name.lookup(&nk)))
        mask |= *v;
    nk.uid = ENF_ANY_UID;
    if ((v = enf_allow_name.lookup(&nk)))
        mask |= *v;
    struct enf_name_key ck = {.uid = ev->uid, .kind = 2};
    __builtin_memcpy(ck.name, ev->comm, IMDS_COMM_LEN);
    if ((v = enf_allow_name.lookup(&ck)))
        mask |= *v;
    ck.uid = ENF_ANY_UID;
    if ((v = enf_allow_name.lookup(&ck)))
        mask |= *v;
    __u32 uid = ev->uid;
    if ((v = enf_allow_uid.lookup(&uid)))
        mask |= *v;
    return mask;
}

/* The deny entry's rule number + 1 covering the caller; 0 when none does. */
static __always_inline __u32 enf_denied_by(struct enf_event *ev)
{
    struct enf_exe_key ek = {.dev = ev->dev, .ino = ev->ino, .uid = ev->uid};
    __u32 *rule = enf_deny_exe.lookup(&ek);
    if (rule)
        return *rule;
    ek.uid = ENF_ANY_UID;
    rule = enf_deny_exe.lookup(&ek);
    if (rule)
        return *rule;
    __u32 uid = ev->uid;
    rule = enf_deny_uid.lookup(&uid);
    return rule ? *rule : 0;
}

#include "enforce_requests.h"

static __always_inline int enf_connect(struct bpf_sock_addr *ctx, __u16 family)
{
    struct imds_event m = {};
    if (!imds_sock_addr_match(ctx, family, &m))
        return ENF_ALLOW;
    if (!enf_cfg(ENF_CFG_ARMED) || enf_cfg(ENF_CFG_ALLOW_ALL))
        return ENF_ALLOW;
    __u64 id = bpf_get_current_pid_tgid();
    if (enf_cfg(ENF_CFG_AGENT_TGID) == (id >> 32))
        return ENF_ALLOW;
    if (!enf_in_scope())
        return ENF_ALLOW;
    int zero = 0;
    struct enf_event *ev = enf_scratch.lookup(&zero);
    if (!ev)
        return ENF_ALLOW;
    __builtin_memset(ev, 0, sizeof(*ev));
    __u64 ug = bpf_get_current_uid_gid();
    ev->pid = (__u32)id;
    ev->tgid = id >> 32;
    ev->uid = (__u32)ug;
    ev->gid = ug >> 32;
    enf_stat_inc(ENF_STAT_JUDGED);
    enf_identity(ev);
    __u32 allowed = enf_allowed(ev);
    if (allowed) {
        if ((allowed & ENF_ALL_CLASSES) != ENF_ALL_CLASSES && enf_cfg(ENF_CFG_REQUESTS) &&
            enf_cfg(ENF_CFG_DEFAULT_DENY))
            enf_restrict(ctx, ev, &m, allowed);
        return ENF_ALLOW;
    }
    __u32 rule = enf_denied_by(ev);
    if (!rule)
        rule = enf_denied_by_cgroup();
    if (!rule && !enf_cfg(ENF_CFG_DEFAULT_DENY))
        return ENF_ALLOW;
    ev->rule = rule;
    ev->ts_ns = bpf_ktime_get_ns();
    ev->cgroup_id = bpf_get_current_cgroup_id();
    /* The tracer's cgroup-mode program on the root runs after this one in the same
     * connect() and reports the attempt with this cookie: the agent tells by it that the
     * kernel refused the call it traced. */
    ev->cookie = bpf_get_socket_cookie(ctx);
    ev->family = m.family;
    ev->dport = m.dport;
    __builtin_memcpy(ev->daddr, m.daddr, 16);
    enf_stat_inc(ENF_STAT_DENIED);
#ifdef IMDS_USE_RINGBUF
    if (events.ringbuf_output(ev, sizeof(*ev), 0) != 0)
        enf_stat_inc(ENF_STAT_LOST);
#else
    if (enf_events.perf_submit(ctx, ev, sizeof(*ev)) != 0)
        enf_stat_inc(ENF_STAT_LOST);
#endif
    return ENF_DENY;
}

int imdsw_enforce4(struct bpf_sock_addr *ctx)
{
    return enf_connect(ctx, IMDS_AF_INET);
}

int imdsw_enforce6(struct bpf_sock_addr *ctx)
{
    return enf_connect(ctx, IMDS_AF_INET6);
}
