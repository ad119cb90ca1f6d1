/* Per-request enforcement (`run --enforce deny`): a caller the policy lets connect but not
 * ask for every request class (metadata yes, credentials no) has each request it writes
 * judged in the kernel, and a request of a class it may not use refused.
 *
 * Three steps, so that other traffic runs none of this per message or packet:
 * 1. the connect hook (enforce.bpf.c), having allowed such a caller, records the classes it
 *    may use and who it is under the socket's cookie (`enf_pending`, LRU);
 * 2. `imdsw_sockops`, a cgroup sock_ops program on the same cgroup, at the connection's
 *    ACTIVE_ESTABLISHED callback moves that record to a key the message program can read
 *    (the socket's addresses and ports) and puts the socket in `enf_socks` (SOCKHASH). Its
 *    other callbacks (a few per connection, none per packet: we ask for no per-packet
 *    callback) return at the first compare; a connection to anything else stops at the
 *    first-byte array lookup. For the restricted sockets only it asks for state-change
 *    callbacks, to forget the socket's record when it closes;
 * 3. `imdsw_reqmsg`, the sk_msg verdict program of `enf_socks`, runs on each sendmsg of
 *    those sockets only. It reads the request line and lets the message through only when
 *    it is one whole request head (request line to the blank line, nothing after: no
 *    pipelined second request, no body) whose target is canonical (no `//`, `%`, `\`,
 *    `#`, no segment starting with `.`) and whose classes (policy/request_patterns.py:
 *    the classifier's own rules as segment patterns, in `enf_patterns`) are all allowed.
 *    Anything else on a restricted socket is refused (SK_DROP: sendmsg fails with EACCES),
 *    reported, and the socket refuses everything after it.
 *
 * Fail open: the sock_ops program is linked (BPF link) like the connect hooks; the message
 * program is attached to the SOCKHASH, which only our programs and descriptors hold. When
 * the agent dies the links and descriptors go, the map is freed, and every socket in it
 * leaves it: no message program runs any more. */
#ifndef IMDSWATCH_ENFORCE_REQUESTS_H
#define IMDSWATCH_ENFORCE_REQUESTS_H

#ifndef ENF_SOCKETS
#define ENF_SOCKETS 8192
#endif
#ifndef ENF_MSG_MAX
#define ENF_MSG_MAX 1024      /* a restricted socket's message longer than this is refused */
#endif
#ifndef ENF_PATTERNS
#define ENF_PATTERNS 192
#endif
#define ENF_SEGS 8
#define ENF_SEG_LIT 0
#define ENF_SEG_DIGITS 1
#define ENF_SEG_ANY 2
#define ENF_PAT_QUERY 1
#define ENF_PAT_PUT 2
#define ENF_CLASS_OTHER (1u << 6)
#define ENF_SK_PASS 1
#define ENF_SK_DROP 0
#define ENF_OP_ACTIVE_ESTABLISHED 4
#define ENF_OP_STATE 10           /* BPF_SOCK_OPS_STATE_CB: args[1] is the new state */
#define ENF_STATE_CB_FLAG 4       /* BPF_SOCK_OPS_STATE_CB_FLAG */
#define ENF_TCP_CLOSE 7
#define ENF_FNV_BASIS 2166136261u
#define ENF_FNV_PRIME 16777619u

struct enf_sock {
    struct enf_event who;     /* the connect's caller; who.classes: what it may ask for */
    __u32 refused;            /* 1 after a refused message: everything after is refused */
    __u32 pad;
};

struct enf_sk_key {
    __u32 family;
    __u32 lport;              /* host order, as both contexts give it */
    __u32 rport;              /* network order in the low 16 bits, as both give it */
    __u32 raddr[4];
    __u32 laddr[4];
};

struct enf_pattern {
    __u32 seg[ENF_SEGS];      /* FNV-1a of the segment (of its digit shape for DIGITS) */
    __u8 kind[ENF_SEGS];
    __u8 nseg;
    __u8 rest;                /* 1: any number of further segments */
    __u8 flags;
    __u8 family;              /* < 32; the first match of each family counts */
    __u32 classes;
    __u32 used;               /* 0: an unused slot, the end of the table */
};

struct enf_parse {
    __u32 state;
    __u32 seg_len;
    __u32 nseg;
    __u32 query;
    __u32 more;               /* more segments than ENF_SEGS */
    __u32 bad;
    __u32 win;                /* the last four bytes, for the blank line */
    __u32 end;                /* offset just after the blank line; 0: none seen */
    __u32 h;
    __u32 d;
    __u32 mlen;
    __u32 plen;
    __u32 hash[ENF_SEGS];
    __u32 dhash[ENF_SEGS];
    char method[8];
    char path[ENF_PATH_LEN];
};

BPF_TABLE("lru_hash", __u64, struct enf_sock, enf_pending, ENF_SOCKETS);
BPF_TABLE("lru_hash", struct enf_sk_key, struct enf_sock, enf_restricted, ENF_SOCKETS);
BPF_SOCKHASH(enf_socks, struct enf_sk_key, ENF_SOCKETS);
BPF_ARRAY(enf_patterns, struct enf_pattern, ENF_PATTERNS);
BPF_PERCPU_ARRAY(enf_parse_scratch, struct enf_parse, 1);
BPF_PERCPU_ARRAY(enf_req_scratch, struct enf_event, 1);
BPF_PERCPU_ARRAY(enf_sock_scratch, struct enf_sock, 1);
/* The classification runs in a program of its own, tail-called with the parse left in
 * enf_parse_scratch (same CPU, same message): each of the two loops is verified on its
 * own, which keeps the verifier's work far below its limit on every kernel. */
BPF_PROG_ARRAY(enf_progs, 1);

/* The connect hook allowed `ev` for `allowed` classes only: remember it by socket cookie. */
static __always_inline void enf_restrict(struct bpf_sock_addr *ctx, struct enf_event *ev,
                                         struct imds_event *m, __u32 allowed)
{
    ev->kind = ENF_KIND_REQUEST;
    ev->classes = allowed;
    ev->ts_ns = bpf_ktime_get_ns();
    ev->cgroup_id = bpf_get_current_cgroup_id();
    ev->family = m->family;
    ev->dport = m->dport;
    __builtin_memcpy(ev->daddr, m->daddr, 16);
    __u64 cookie = bpf_get_socket_cookie(ctx);
    int zero = 0;
    /* The value is built in place: a struct enf_sock is too large for the stack. */
    struct enf_sock *s = enf_sock_scratch.lookup(&zero);
    if (!s)
        return;
    __builtin_memcpy(&s->who, ev, sizeof(*ev));
    s->refused = 0;
    s->pad = 0;
    enf_pending.update(&cookie, s);
    enf_stat_inc(ENF_STAT_RESTRICTED);
}

static __always_inline void enf_sockops_key(struct bpf_sock_ops *skops,
                                            struct enf_sk_key *key)
{
    if (key->family == IMDS_AF_INET) {
        key->raddr[0] = skops->remote_ip4;
        key->laddr[0] = skops->local_ip4;
    } else {
        key->raddr[0] = skops->remote_ip6[0];
        key->raddr[1] = skops->remote_ip6[1];
        key->raddr[2] = skops->remote_ip6[2];
        key->raddr[3] = skops->remote_ip6[3];
        key->laddr[0] = skops->local_ip6[0];
        key->laddr[1] = skops->local_ip6[1];
        key->laddr[2] = skops->local_ip6[2];
        key->laddr[3] = skops->local_ip6[3];
    }
    key->lport = skops->local_port;
    key->rport = skops->remote_port;
}

int imdsw_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op == ENF_OP_STATE) {
        /* Asked for on restricted sockets only: forget the record when one closes. */
        if (skops->args[1] == ENF_TCP_CLOSE) {
            struct enf_sk_key key = {};
            key.family = skops->family;
            enf_sockops_key(skops, &key);
            enf_restricted.delete(&key);
        }
        return 1;
    }
    if (op != ENF_OP_ACTIVE_ESTABLISHED)
        return 1;
    /* Other destinations stop at the first-byte array of imdswatch.h, before anything
     * else is read. */
    __u32 family = skops->family, idx, *first;
    if (family == IMDS_AF_INET) {
        idx = skops->remote_ip4 & 0xff;
        first = first4.lookup(&idx);
    } else if (family == IMDS_AF_INET6) {
        __u32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1];
        __u32 r2 = skops->remote_ip6[2];
        if (r0 == 0 && r1 == 0 && r2 == bpf_htonl(0x0000ffff)) {
            idx = skops->remote_ip6[3] & 0xff;
            first = first4.lookup(&idx);
        } else {
            idx = r0 & 0xff;
            first = first6.lookup(&idx);
        }
    } else {
        return 1;
    }
    if (!first || !*first)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct enf_sock *s = enf_pending.lookup(&cookie);
    if (!s)
        return 1;
    struct enf_sk_key key = {};
    key.family = family;
    enf_sockops_key(skops, &key);
    if (enf_restricted.update(&key, s) == 0) {
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | ENF_STATE_CB_FLAG);
        enf_socks.sock_hash_update(skops, &key, BPF_ANY);
    }
    enf_pending.delete(&cookie);
    return 1;
}

static __always_inline void enf_hash_byte(struct enf_parse *st, __u8 c)
{
    if (c >= 'A' && c <= 'Z')
        c += 'a' - 'A';
    st->h = (st->h ^ c) * ENF_FNV_PRIME;
    __u8 dc = (c >= '0' && c <= '9') ? '0' : c;
    st->d = (st->d ^ dc) * ENF_FNV_PRIME;
    st->seg_len += 1;
}

static __always_inline void enf_end_segment(struct enf_parse *st)
{
    if (st->seg_len == 0)
        return;
    __u32 n = st->nseg;
    if (n < ENF_SEGS) {
        st->hash[n & (ENF_SEGS - 1)] = st->h;
        st->dhash[n & (ENF_SEGS - 1)] = st->d;
        st->nseg = n + 1;
    } else {
        st->more = 1;
    }
    st->h = ENF_FNV_BASIS;
    st->d = ENF_FNV_BASIS;
    st->seg_len = 0;
}

/* One byte of the message. States: 0 method, 1 the target's first byte, 2 its path,
 * 3 its query, 4 the rest of the head (until the blank line). */
static __always_inline void enf_parse_byte(struct enf_parse *st, __u8 c, __u32 i)
{
    __u32 state = st->state;
    if (state == 4) {
        st->win = (st->win << 8) | c;
        if (st->win == 0x0d0a0d0a && st->end == 0)
            st->end = i + 1;
        return;
    }
    if (state == 0) {
        if (c == ' ') {
            st->state = 1;
        } else if (c >= 'A' && c <= 'Z' && st->mlen < 7) {
            st->method[st->mlen & 7] = c;
            st->mlen += 1;
        } else {
            st->bad = 1;
        }
        return;
    }
    __u32 p = st->plen;
    if (c != ' ' && p < ENF_PATH_LEN)
        st->path[p & (ENF_PATH_LEN - 1)] = c;
    if (c != ' ')
        st->plen = p + 1;
    if (state == 1) {
        if (c != '/')
            st->bad = 1;  /* absolute-form, `*`, anything but an origin-form path */
        st->state = 2;
        return;
    }
    if (c == ' ') {
        enf_end_segment(st);
        st->state = 4;
        return;
    }
    if (c == '\r' || c == '\n' || c == '%' || c == '\\' || c == '#') {
        st->bad = 1;
        return;
    }
    if (state == 3)
        return;
    if (c == '?') {
        enf_end_segment(st);
        st->query = 1;
        st->state = 3;
        return;
    }
    if (c == '/') {
        if (st->seg_len == 0)
            st->bad = 1;  /* `//` */
        enf_end_segment(st);
        return;
    }
    if (c == '.' && st->seg_len == 0)
        st->bad = 1;      /* `.`, `..`, or any segment starting with a dot */
    enf_hash_byte(st, c);
}

static __always_inline int enf_pattern_match(struct enf_pattern *pat, struct enf_parse *st)
{
    __u32 n = pat->nseg;
    if (pat->rest) {
        if (st->nseg < n)
            return 0;
    } else if (st->nseg != n || st->more) {
        return 0;
    }
    if ((pat->flags & ENF_PAT_QUERY) && !st->query)
        return 0;
#pragma unroll
    for (int j = 0; j < ENF_SEGS; j++) {
        if (j >= n)
            break;
        __u8 kind = pat->kind[j];
        if (kind == ENF_SEG_ANY)
            continue;
        __u32 have = kind == ENF_SEG_DIGITS ? st->dhash[j] : st->hash[j];
        if (have != pat->seg[j])
            return 0;
    }
    return 1;
}

/* The classes the parsed request may be, per policy/request_patterns.py. */
static __always_inline __u32 enf_classify(struct enf_parse *st)
{
    __u32 done = 0, mask = 0;
    int put = st->mlen == 3 && st->method[0] == 'P' && st->method[1] == 'U' &&
              st->method[2] == 'T';
#pragma clang loop unroll(disable)
    for (int i = 0; i < ENF_PATTERNS; i++) {
        int idx = i;
        struct enf_pattern *pat = enf_patterns.lookup(&idx);
        if (!pat || !pat->used)
            break;
        __u32 fam = 1u << (pat->family & 31);
        if (done & fam)
            continue;
        if (!enf_pattern_match(pat, st))
            continue;
        done |= fam;
        if ((pat->flags & ENF_PAT_PUT) && !put)
            mask |= ENF_CLASS_OTHER;
        else
            mask |= pat->classes;
    }
    return mask ? mask : ENF_CLASS_OTHER;
}

static __always_inline void enf_request_denied(struct sk_msg_md *msg, struct enf_sock *s,
                                               struct enf_parse *st, __u32 classes)
{
    int zero = 0;
    struct enf_event *ev = enf_req_scratch.lookup(&zero);
    if (!ev)
        return;
    __builtin_memcpy(ev, &s->who, sizeof(*ev));
    ev->kind = ENF_KIND_REQUEST;
    ev->classes = classes;
    ev->ts_ns = bpf_ktime_get_ns();
    __builtin_memcpy(ev->method, st->method, sizeof(ev->method));
    __builtin_memcpy(ev->path, st->path, sizeof(ev->path));
    enf_stat_inc(ENF_STAT_REQ_DENIED);
#ifdef IMDS_USE_RINGBUF
    if (events.ringbuf_output(ev, sizeof(*ev), 0) != 0)
        enf_stat_inc(ENF_STAT_LOST);
#else
    if (enf_events.perf_submit(msg, ev, sizeof(*ev)) != 0)
        enf_stat_inc(ENF_STAT_LOST);
#endif
}

static __always_inline void enf_msg_key(struct sk_msg_md *msg, struct enf_sk_key *key)
{
    key->family = msg->family;
    key->lport = msg->local_port;
    key->rport = msg->remote_port;
    if (key->family == IMDS_AF_INET) {
        key->raddr[0] = msg->remote_ip4;
        key->laddr[0] = msg->local_ip4;
    } else {
        key->raddr[0] = msg->remote_ip6[0];
        key->raddr[1] = msg->remote_ip6[1];
        key->raddr[2] = msg->remote_ip6[2];
        key->raddr[3] = msg->remote_ip6[3];
        key->laddr[0] = msg->local_ip6[0];
        key->laddr[1] = msg->local_ip6[1];
        key->laddr[2] = msg->local_ip6[2];
        key->laddr[3] = msg->local_ip6[3];
    }
}

static __always_inline int enf_verdict(struct sk_msg_md *msg, struct enf_sock *s,
                                       struct enf_parse *st, __u32 classes)
{
    if ((classes & ~s->who.classes) == 0)
        return ENF_SK_PASS;
    s->refused = 1;
    enf_request_denied(msg, s, st, classes);
    return ENF_SK_DROP;
}

/* Tail-called by imdsw_reqmsg with a request head parsed whole and canonical. */
int imdsw_reqcls(struct sk_msg_md *msg)
{
    struct enf_sk_key key = {};
    enf_msg_key(msg, &key);
    int zero = 0;
    struct enf_parse *st = enf_parse_scratch.lookup(&zero);
    struct enf_sock *s = enf_restricted.lookup(&key);
    if (!st || !s)
        return ENF_SK_DROP;
    return enf_verdict(msg, s, st, enf_classify(st));
}

int imdsw_reqmsg(struct sk_msg_md *msg)
{
    struct enf_sk_key key = {};
    enf_msg_key(msg, &key);
    int zero = 0;
    struct enf_parse *st = enf_parse_scratch.lookup(&zero);
    if (!st)
        return ENF_SK_DROP;
    __builtin_memset(st, 0, sizeof(*st));
    st->h = ENF_FNV_BASIS;
    st->d = ENF_FNV_BASIS;
    struct enf_sock *s = enf_restricted.lookup(&key);
    if (!s)
        return ENF_SK_DROP;  /* a restricted socket whose record was evicted */
    enf_stat_inc(ENF_STAT_REQ_JUDGED);
    /* Off (break glass, disarm): every message passes. */
    if (!enf_cfg(ENF_CFG_ARMED))
        return ENF_SK_PASS;
    __u32 size = msg->size;
    if (s->refused || size == 0 || size > ENF_MSG_MAX) {
        st->bad = 1;
    } else if (bpf_msg_pull_data(msg, 0, size, 0) != 0) {
        st->bad = 1;
    } else {
        void *data = (void *)(long)msg->data;
        void *data_end = (void *)(long)msg->data_end;
#pragma clang loop unroll(disable)
        for (__u32 i = 0; i < ENF_MSG_MAX; i++) {
            __u8 *p = (__u8 *)data + i;
            if ((void *)(p + 1) > data_end)
                break;
            enf_parse_byte(st, *p, i);
            if (st->bad || st->end)
                break;
        }
        /* One whole request head and nothing after it. */
        if (st->end != size)
            st->bad = 1;
    }
    if (!st->bad)
        enf_progs.call(msg, 0);
    /* Unparsable, or the tail call failed: whatever it is, it is not known to be allowed. */
    return enf_verdict(msg, s, st, ENF_ALL_CLASSES);
}

#endif
