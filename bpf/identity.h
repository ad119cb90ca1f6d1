/* The caller's identity, recorded when a process starts (fork) and when it runs a new program
 * (exec), dropped when it ends (exit), and copied into every connect record by whatever hook
 * sees the connect. A process that exits a millisecond after its call is gone before
 * userspace could read /proc; its record was written before it ever called.
 *
 * Programs (raw tracepoints: cheapest tracing type, stable arguments, Linux >= 4.17):
 *   sched_process_exec (task, old_pid, bprm): the executable's full path, walked from the new
 *     mm's exe_file up the dentry and mount chain (the path /proc/PID/exe shows, symlinks
 *     resolved, relative execve() names included); argv read from the new mm's
 *     arg_start..arg_end (bounded); the parent that started it; the start time.
 *   sched_process_fork (parent, child): a new process (not a thread) gets a copy of its
 *     parent's record (same program, same argv, as /proc would show) with itself as the
 *     child and the forker as parent; so a forked child that connects without exec'ing
 *     still has its identity.
 *   sched_process_exit (task): the record goes when the last thread of the group exits.
 * Records are keyed by tgid in an LRU hash (bounded: the least recently used go first, and a
 * lookup refreshes). A reused pid is never confused: every process created after the agent
 * attached gets its record at fork (overwriting anything under that pid) and loses it at
 * exit; processes that ran before were seeded from /proc by userspace, without overwriting
 * what the kernel wrote meanwhile. The record carries the start time, which userspace shows.
 *
 * The connect hooks only look the record up by bpf_get_current_pid_tgid(), which every
 * program type we use may call on every kernel of the matrix: the cgroup hooks of 5.10, which
 * may not read the task, get the record too. */
#ifndef IMDSWATCH_IDENTITY_H
#define IMDSWATCH_IDENTITY_H

#define IMDS_PATH_LEN 256   /* path components, leaf first, each NUL-terminated */
#define IMDS_ARGS_LEN 256   /* argv, NUL-separated, as the process's memory holds it */
#define IMDS_PATH_DEPTH 32  /* dentries and mount crossings walked at most */
#ifndef IMDS_IDENTITY_ENTRIES
#define IMDS_IDENTITY_ENTRIES 8192
#endif

/* imds_ident.flags */
#define IMDS_ID_EXEC 1       /* filled at exec */
#define IMDS_ID_FORK 2       /* parent and start from the fork (program from the parent's) */
#define IMDS_ID_SEED 4       /* written by userspace from /proc at start */
#define IMDS_ID_PATH 8       /* path holds the executable's complete path */
#define IMDS_ID_ARGS 16      /* args holds argv (maybe cut: ARGS_CUT) */
#define IMDS_ID_ARGS_CUT 32  /* argv was longer than IMDS_ARGS_LEN */
#define IMDS_ID_PARENT 64    /* ppid and parent_comm are set */

struct imds_ident {
    __u64 start_ns;    /* the process's start, CLOCK_BOOTTIME ns (task->start_boottime) */
    __u32 ppid;        /* the parent that started it (fork) or ran the exec */
    __u32 flags;       /* IMDS_ID_* */
    __u16 path_len;    /* bytes of path used */
    __u16 args_len;    /* bytes of args used */
    __u32 pad;
    char parent_comm[IMDS_COMM_LEN];
    char path[IMDS_PATH_LEN];
    char args[IMDS_ARGS_LEN];
};

/* What a connect hands userspace: the event, then the process's record (valid when the
 * event's flags have IMDS_F_RECORD). */
struct imds_record {
    struct imds_event ev;
    struct imds_ident id;
};

/* The exec program builds a record here: the per-CPU value is the record followed by room
 * for one more bounded read, so a read at any offset inside path or args stays inside the
 * value whatever its length (path spills into args, which is filled after it). */
struct imds_ident_scratch {
    struct imds_ident id;
    char spill[IMDS_PATH_LEN];
};

/* Only where the record's offsets were given (tracer.btf.record_offsets): other objects
 * that include imdswatch.h (the enforcer) allocate no record map. */
#if defined(IMDS_OFF_TASK_TGID) && defined(IMDS_OFF_MOUNT_MNT)
#define IMDS_IDENTITY_RECORD 1

BPF_TABLE("lru_hash", __u32, struct imds_ident, identities, IMDS_IDENTITY_ENTRIES);

BPF_PERCPU_ARRAY(ident_scratch, struct imds_ident_scratch, 1);

#ifdef IMDS_HELPER_READ_USER
static long (*imds_read_user)(void *dst, __u32 size, const void *src) =
    (void *)IMDS_HELPER_READ_USER;
#else
#define imds_read_user bpf_probe_read_user
#endif

static __always_inline char *imds_ptr(char *base, int off)
{
    char *p = 0;
    imds_read_kernel(&p, sizeof(p), base + off);
    return p;
}

/* The parent that started `task`: its tgid and its process (leader) name. */
static __always_inline void imds_ident_parent(struct imds_ident *id, char *task)
{
    char *parent = imds_ptr(task, IMDS_OFF_TASK_REAL_PARENT);
    if (!parent)
        return;
    imds_read_kernel(&id->ppid, sizeof(id->ppid), parent + IMDS_OFF_TASK_TGID);
    char *leader = imds_ptr(parent, IMDS_OFF_TASK_GROUP_LEADER);
    imds_read_kernel(id->parent_comm, IMDS_COMM_LEN,
                     (leader ? leader : parent) + IMDS_OFF_TASK_COMM);
    id->flags |= IMDS_ID_PARENT;
}

/* The executable's path, from its dentry up to the root, crossing mounts: components leaf
 * first ("curl\0bin\0usr\0"), which userspace reverses. No d_path (not allowed in these
 * programs before 5.10's allowlist, and never in some types): a bounded walk of the same
 * chain. Set IMDS_ID_PATH only when the walk reached the root within the bounds. */
static __always_inline void imds_ident_path(struct imds_ident *id, char *file)
{
    char *dentry = imds_ptr(file, IMDS_OFF_FILE_DENTRY);
    char *vfsmnt = imds_ptr(file, IMDS_OFF_FILE_MNT);
    if (!dentry || !vfsmnt)
        return;
    char *mnt = vfsmnt - IMDS_OFF_MOUNT_MNT;  /* container_of(vfsmnt, struct mount, mnt) */
    __u32 off = 0;
#pragma unroll
    for (int i = 0; i < IMDS_PATH_DEPTH; i++) {
        char *root = imds_ptr(mnt + IMDS_OFF_MOUNT_MNT, IMDS_OFF_VFSMOUNT_ROOT);
        char *parent = imds_ptr(dentry, IMDS_OFF_DENTRY_PARENT);
        if (dentry == root || dentry == parent) {
            char *up = imds_ptr(mnt, IMDS_OFF_MOUNT_PARENT);
            if (dentry != root || !up || up == mnt) {
                /* the root of the process's file system tree */
                if (off <= IMDS_PATH_LEN) {
                    id->path_len = off;
                    id->flags |= IMDS_ID_PATH;
                }
                return;
            }
            dentry = imds_ptr(mnt, IMDS_OFF_MOUNT_MOUNTPOINT);  /* where it is mounted */
            mnt = up;
            if (!dentry)
                return;
            continue;
        }
        char *name = imds_ptr(dentry, IMDS_OFF_DENTRY_NAME);
        if (!name || off >= IMDS_PATH_LEN)
            return;
        long n = imds_read_kernel_str(id->path + (off & (IMDS_PATH_LEN - 1)), IMDS_PATH_LEN,
                                      name);
        if (n <= 0)
            return;
        off += n;
        dentry = parent;
    }
}

/* argv from the new program's memory; bounded, cut marked. */
static __always_inline void imds_ident_args(struct imds_ident *id, char *mm)
{
    unsigned long start = 0, end = 0;
    imds_read_kernel(&start, sizeof(start), mm + IMDS_OFF_MM_ARG_START);
    imds_read_kernel(&end, sizeof(end), mm + IMDS_OFF_MM_ARG_END);
    if (!start || end <= start)
        return;
    __u64 len = end - start;
    if (len > IMDS_ARGS_LEN) {
        len = IMDS_ARGS_LEN;
        id->flags |= IMDS_ID_ARGS_CUT;
    }
    /* The bounded-length idiom of requests.h (5.10's verifier learns no lower bound from
     * len != 0): check len - 1 with one unsigned compare, in the very register used. */
    __u64 m = len - 1;
    asm volatile("" : "+r"(m));
    if (m < IMDS_ARGS_LEN && imds_read_user(id->args, m + 1, (void *)start) == 0) {
        id->args_len = m + 1;
        id->flags |= IMDS_ID_ARGS;
    }
}

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
    /* args: struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm; p == current */
    char *task = (char *)ctx->args[0];
    __u32 zero = 0, tgid = 0;
    struct imds_ident_scratch *s = ident_scratch.lookup(&zero);
    if (!s || !task)
        return 0;
    struct imds_ident *id = &s->id;
    imds_read_kernel(&tgid, sizeof(tgid), task + IMDS_OFF_TASK_TGID);
    id->flags = IMDS_ID_EXEC;
    id->ppid = 0;
    id->path_len = 0;
    id->args_len = 0;
    id->parent_comm[0] = 0;
    id->start_ns = 0;
    imds_read_kernel(&id->start_ns, sizeof(id->start_ns), task + IMDS_OFF_TASK_START);
    imds_ident_parent(id, task);
    char *mm = imds_ptr(task, IMDS_OFF_TASK_MM);
    if (mm) {
        char *file = imds_ptr(mm, IMDS_OFF_MM_EXE_FILE);
        if (file)
            imds_ident_path(id, file);
        imds_ident_args(id, mm);
    }
    identities.update(&tgid, id);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    /* args: struct task_struct *parent, struct task_struct *child */
    char *parent = (char *)ctx->args[0], *child = (char *)ctx->args[1];
    __u32 tgid = 0, pid = 0, ptgid = 0;
    imds_read_kernel(&tgid, sizeof(tgid), child + IMDS_OFF_TASK_TGID);
    imds_read_kernel(&pid, sizeof(pid), child + IMDS_OFF_TASK_PID);
    if (tgid != pid)
        return 0;    /* a new thread: its process already has its record */
    imds_read_kernel(&ptgid, sizeof(ptgid), parent + IMDS_OFF_TASK_TGID);
    struct imds_ident *from = identities.lookup(&ptgid);
    if (from) {
        identities.update(&tgid, from);
    } else {
        __u32 zero = 0;
        struct imds_ident_scratch *s = ident_scratch.lookup(&zero);
        if (!s)
            return 0;
        s->id.flags = 0;
        s->id.path_len = 0;
        s->id.args_len = 0;
        identities.update(&tgid, &s->id);
    }
    struct imds_ident *id = identities.lookup(&tgid);
    if (!id)
        return 0;
    id->flags = (id->flags & (IMDS_ID_PATH | IMDS_ID_ARGS | IMDS_ID_ARGS_CUT)) |
                IMDS_ID_FORK | IMDS_ID_PARENT;
    id->ppid = ptgid;
    id->start_ns = 0;
    imds_read_kernel(&id->start_ns, sizeof(id->start_ns), child + IMDS_OFF_TASK_START);
    char *leader = imds_ptr(parent, IMDS_OFF_TASK_GROUP_LEADER);
    imds_read_kernel(id->parent_comm, IMDS_COMM_LEN,
                     (leader ? leader : parent) + IMDS_OFF_TASK_COMM);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    /* args: struct task_struct *p (current). signal->live was decremented before this
     * tracepoint: 0 means the last thread of the group is leaving. */
    char *task = (char *)ctx->args[0];
    char *signal = imds_ptr(task, IMDS_OFF_TASK_SIGNAL);
    int live = 1;
    if (signal)
        imds_read_kernel(&live, sizeof(live), signal + IMDS_OFF_SIGNAL_LIVE);
    if (live)
        return 0;
    __u32 tgid = 0;
    imds_read_kernel(&tgid, sizeof(tgid), task + IMDS_OFF_TASK_TGID);
    identities.delete(&tgid);
    return 0;
}
#endif /* IMDS_OFF_TASK_TGID && IMDS_OFF_MOUNT_MNT */

#endif /* IMDSWATCH_IDENTITY_H */
