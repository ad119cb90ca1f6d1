"""The kernel side of `run --enforce deny`: bpf/enforce.bpf.c on the connect hooks of one
cgroup, as BPF links only, its maps filled from plain data, its denials read back.

Safety by construction:
- links only (`CgroupAttachment.attach_link`): the kernel releases them with the agent's
  descriptors, so a stopped, crashed or SIGKILLed agent leaves nothing that denies;
- never the cgroup v2 root (a mount point of cgroup2): the operator names the subtree;
- loaded disarmed: nothing is denied until `arm(True)`; disarming is one array write
  that the next connect reads;
- the agent's own process is exempt in the kernel.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tracer import btf, cgroup_attach, kernel, maps, sources
from tracer.cgroup_attach import CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT, CgroupError

log = logging.getLogger("imdswatch.enforce")

ANY_UID = 0xFFFFFFFF
KIND_EXE_NAME = 1
KIND_COMM = 2
MAX_ENTRIES = 16384
CFG_ARMED, CFG_DEFAULT_DENY, CFG_AGENT_TGID, CFG_ALLOW_ALL, CFG_REQUESTS = 0, 1, 2, 3, 4
STAT_JUDGED, STAT_DENIED, STAT_LOST = 0, 1, 2
STAT_RESTRICTED, STAT_REQ_JUDGED, STAT_REQ_DENIED = 3, 4, 5
STATS = (("judged", STAT_JUDGED), ("denied", STAT_DENIED), ("lost", STAT_LOST),
         ("restricted", STAT_RESTRICTED), ("requests_judged", STAT_REQ_JUDGED),
         ("requests_denied", STAT_REQ_DENIED))
PROGRAMS = (("imdsw_enforce4", CGROUP_INET4_CONNECT), ("imdsw_enforce6", CGROUP_INET6_CONNECT))
CGROUP_SOCK_OPS = 3  # enum bpf_attach_type
SK_MSG_VERDICT = 7
KIND_CONNECT, KIND_REQUEST = 0, 1
PATH_LEN = 128
MSG_MAX = 1024  # a restricted socket's message longer than this is refused
PATTERNS = 192  # rows of the request-pattern table
ALL_CLASSES = 0x7F  # one bit per scoring.endpoints.REQUEST_CLASSES entry
EXTRA_FIELDS = (("ENF_OFF_INODE_SB", "inode", "i_sb"),
                ("ENF_OFF_SB_DEV", "super_block", "s_dev"))


class EnforceError(RuntimeError):
    """The kernel side cannot run here; the message says why (the agent stays in audit)."""


@dataclass
class KernelRules:
    """A policy as the kernel can apply it (see policy.kernel_rules)."""

    allow_exe: set[tuple[int, int, int]] = field(default_factory=set)  # (dev, ino, uid)
    allow_name: set[tuple[str, int, int]] = field(default_factory=set)  # (name, uid, kind)
    allow_uid: set[int] = field(default_factory=set)
    allow_all: bool = False
    deny_exe: dict[tuple[int, int, int], int] = field(default_factory=dict)  # -> rule + 1
    deny_uid: dict[int, int] = field(default_factory=dict)
    default_deny: bool = False
    # Allow entries that allow some request classes only: entry -> class mask (an entry
    # not here allows every class). Keys as in allow_exe, allow_name, allow_uid.
    classes: dict[object, int] = field(default_factory=dict)

    def mask(self, key: object) -> int:
        return self.classes.get(key, ALL_CLASSES)


@dataclass(frozen=True)
class RequestPattern:
    """One row of the kernel's request-pattern table (see policy.request_patterns)."""

    segments: tuple[tuple[int, int], ...]  # (kind, hash)
    rest: bool
    flags: int
    family: int
    classes: int


class DeniedConnect(ctypes.Structure):
    """Mirror of `struct enf_event`."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64), ("cgroup_id", ctypes.c_uint64),
        ("dev", ctypes.c_uint64), ("ino", ctypes.c_uint64), ("cookie", ctypes.c_uint64),
        ("pid", ctypes.c_uint32), ("tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
        ("rule", ctypes.c_uint32), ("family", ctypes.c_uint16), ("dport", ctypes.c_uint16),
        ("daddr", ctypes.c_uint8 * 16), ("comm", ctypes.c_char * 16),
        ("exe_name", ctypes.c_char * 48),
        ("kind", ctypes.c_uint32), ("classes", ctypes.c_uint32),
        ("method", ctypes.c_char * 8), ("path", ctypes.c_char * PATH_LEN),
    ]


def kernel_dev(st_dev: int) -> int:
    """A stat() device number as the kernel's dev_t (MKDEV: major << 20 | minor)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def _mount_devs() -> dict[int, int]:
    """Mount id -> its superblock's dev_t, from /proc/self/mountinfo."""
    devs = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" ", 3)
                major, _, minor = fields[2].partition(":")
                devs[int(fields[0])] = (int(major) << 20) | int(minor)
    except (OSError, ValueError, IndexError):
        return {}
    return devs


def _mount_id(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def kernel_file_id(path: str) -> tuple[int, int] | None:
    """(dev_t, inode) of the file at `path` as the kernel reads it from a running program's
    mm->exe_file: the inode's superblock device, which is the device its mount shows in
    mountinfo. stat()'s st_dev is not always that one (overlayfs, the root of every
    container and of some hosts, reports a layer's device); None when `path` cannot be
    opened."""
    try:
        fd = os.open(path, os.O_PATH)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        mount = _mount_id(fd)
    finally:
        os.close(fd)
    dev = _mount_devs().get(mount) if mount is not None else None
    return (dev if dev is not None else kernel_dev(st.st_dev), st.st_ino)


def is_cgroup_root(path: str) -> bool:
    real = os.path.realpath(path)
    return any(os.path.realpath(m) == real for m in cgroup_attach.cgroup2_mounts())


def check_cgroup(path: str) -> str:
    """The directory of the cgroup to enforce in; EnforceError for the root or a
    non-cgroup."""
    if not os.path.isfile(os.path.join(path, "cgroup.procs")):
        raise EnforceError(f"--enforce-cgroup {path} is not a cgroup v2 directory")
    if is_cgroup_root(path):
        raise EnforceError(f"--enforce-cgroup {path} is the cgroup v2 root: name the "
                           "subtree to enforce in (e.g. kubepods.slice), never the whole node")
    return path


class KernelEnforcer:
    """Usage: `e = KernelEnforcer(catalog, cgroup); e.start(rules); e.arm(True);
    e.poll(on_denied); ...; e.close()`. Poll from one thread."""

    def __init__(self, catalog: Iterable[maps.Endpoint], cgroup: str) -> None:
        self.catalog = list(catalog)
        self.cgroup = check_cgroup(cgroup)
        self.bpf: object | None = None
        self.attachment: cgroup_attach.CgroupAttachment | None = None
        self.armed = False
        self._on_denied: Callable[[DeniedConnect], None] | None = None
        self.rules = KernelRules()
        self.ringbuf = False
        self.scope: set[int] | None = None  # cgroup ids that may be denied; None: all
        # Why requests are not judged in the kernel (None: they are, once armed).
        self.requests_unavailable: str | None = "not started"
        # The sock_ops program, loaded with the request programs and linked only once a
        # policy restricts some caller's request classes: until then no connection in the
        # cgroup runs it.
        self._sockops_fd: int | None = None
        self.requests_linked = False
        self.cgroup_denials: dict[int, int] = {}  # cgroup id -> namespace deny rule + 1

    def start(self, rules: KernelRules, on_denied: Callable[[DeniedConnect], None],
              patterns: Iterable[RequestPattern] = ()) -> None:
        """Compile, load, fill, attach (disarmed). EnforceError says why it cannot."""
        try:
            offsets = btf.task_offsets()
            b = btf.BTF.kernel()
            for macro, struct, member in EXTRA_FIELDS:
                offsets[macro] = b.offset(struct, member)
        except (btf.BTFError, OSError) as exc:
            raise EnforceError(f"the kernel's BTF is needed to read a caller's executable "
                               f"in the kernel: {exc}") from None
        bcc = kernel.import_bcc()
        text = sources.file_text(sources.ENFORCE_FILE)
        self.ringbuf = kernel.ringbuf_supported()
        flags = sources.cflags(ringbuf=self.ringbuf, ringbuf_pages=16, offsets=offsets,
                               count_entries=64)
        flags.append(f"-DENF_MAX_ENTRIES={MAX_ENTRIES}")
        flags += [f"-DENF_PATH_LEN={PATH_LEN}", f"-DENF_ALL_CLASSES={ALL_CLASSES}",
                  f"-DENF_MSG_MAX={MSG_MAX}", f"-DENF_PATTERNS={PATTERNS}"]
        try:
            self.bpf = bcc.BPF(text=text.encode(), cflags=flags)
            fds = {}
            for name, hook in PROGRAMS:
                fds[name] = self.bpf.load_func(name.encode(), bcc.BPF.CGROUP_SOCK_ADDR,
                                               attach_type=hook).fd
        except Exception as exc:  # BCC raises bare Exception
            self.close()
            raise EnforceError(f"the enforcement programs did not load: {exc}") from None
        b = self.bpf
        maps.write(b["endpoints4"], b["endpoints6"], self.catalog, b["first4"], b["first6"])
        self._cfg(CFG_AGENT_TGID, os.getpid())
        self._cfg(CFG_ARMED, 0)
        self.set_rules(rules)
        self._on_denied = on_denied
        if self.ringbuf:
            b["events"].open_ring_buffer(self._event)
        else:
            b["enf_events"].open_perf_buffer(self._event, page_cnt=64, lost_cb=self._lost)
        try:
            self.attachment = cgroup_attach.CgroupAttachment(self.cgroup)
            for name, hook in PROGRAMS:
                self.attachment.attach_link(fds[name], hook)
        except (CgroupError, OSError) as exc:
            self.close()
            raise EnforceError(str(exc)) from None
        self.requests_unavailable = self._start_requests(list(patterns), bcc)
        if self.requests_unavailable is not None:
            log.error("requests are not judged in the kernel (connects still are): %s",
                      self.requests_unavailable)
        log.info("enforcement programs linked to %s (disarmed until armed)", self.cgroup)

    def _start_requests(self, patterns: list[RequestPattern], bcc: object) -> str | None:
        """Load the sock_ops and sk_msg programs (bpf/enforce_requests.h) and link them;
        the reason when they cannot be (the connect hooks go on without them)."""
        b = self.bpf
        assert b is not None and self.attachment is not None
        if not patterns:
            return "no request patterns"
        try:
            table = b["enf_patterns"]
            for i, p in enumerate(patterns):
                row = table.Leaf()
                for j, (kind, value) in enumerate(p.segments):
                    row.seg[j] = value
                    row.kind[j] = kind
                row.nseg, row.rest, row.flags = len(p.segments), int(p.rest), p.flags
                row.family, row.classes, row.used = p.family, p.classes, 1
                table[table.Key(i)] = row
            sockops = b.load_func(b"imdsw_sockops", bcc.BPF.SOCK_OPS)  # type: ignore[attr-defined]
            msg = b.load_func(b"imdsw_reqmsg", bcc.BPF.SK_MSG)  # type: ignore[attr-defined]
            cls = b.load_func(b"imdsw_reqcls", bcc.BPF.SK_MSG)  # type: ignore[attr-defined]
            progs = b["enf_progs"]
            progs[progs.Key(0)] = progs.Leaf(cls.fd)
            # The message program hangs on the socket map, which only our programs and
            # descriptors hold: it goes with them.
            from bcc.libbcc import lib  # type: ignore[import-not-found]

            socks = lib.bpf_table_fd(b.module, b"enf_socks")  # type: ignore[attr-defined]
            if socks < 0:
                return "the socket map has no descriptor"
            bcc.BPF.attach_func(msg, socks, SK_MSG_VERDICT)  # type: ignore[attr-defined]
            self._sockops_fd = sockops.fd
            self._link_requests(self.rules)
        except Exception as exc:  # BCC raises bare Exception; CgroupError, OSError
            return f"the request programs did not load or link: {exc}"
        return None

    def _link_requests(self, rules: KernelRules) -> None:
        """Link sock_ops (then let the connect hooks record restricted sockets) when `rules`
        restrict some caller's classes; before those rules are written, so that no
        restricted connection is established unseen. Never unlinked while running."""
        if self.requests_linked or self._sockops_fd is None or self.attachment is None:
            return
        if not (rules.default_deny and rules.classes):
            return
        self.attachment.attach_link(self._sockops_fd, CGROUP_SOCK_OPS)
        self._cfg(CFG_REQUESTS, 1)
        self.requests_linked = True

    def _cfg(self, idx: int, value: int) -> None:
        t = self.bpf["enf_config"]  # type: ignore[index]
        t[t.Key(idx)] = t.Leaf(value)

    def _event(self, _ctx: object, data: int, size: int) -> None:
        if self._on_denied is None or size < ctypes.sizeof(DeniedConnect):
            return
        ev = ctypes.cast(data, ctypes.POINTER(DeniedConnect)).contents
        copy = DeniedConnect()
        ctypes.memmove(ctypes.byref(copy), ctypes.byref(ev), ctypes.sizeof(DeniedConnect))
        self._on_denied(copy)

    def _lost(self, n: int) -> None:
        log.warning("%d denial records lost (buffer full); the denials still happened", n)

    def arm(self, on: bool) -> None:
        """On: the kernel denies per the rules; off: every connect is allowed (one write)."""
        if self.bpf is None:
            return
        self._cfg(CFG_ARMED, 1 if on else 0)
        self.armed = on

    def set_rules(self, new: KernelRules) -> None:
        """Replace the rules so that no moment in between denies a caller both the old and
        the new rules allow: allows are widened first and narrowed last, denies narrowed
        first and widened last."""
        b = self.bpf
        assert b is not None
        try:
            self._link_requests(new)
        except (CgroupError, OSError) as exc:
            self.requests_unavailable = f"the request programs did not link: {exc}"
            self._sockops_fd = None
            log.error("requests are not judged in the kernel (connects still are): %s",
                      self.requests_unavailable)
        old = self.rules
        exe, name, uid = b["enf_allow_exe"], b["enf_allow_name"], b["enf_allow_uid"]
        deny_exe, deny_uid = b["enf_deny_exe"], b["enf_deny_uid"]
        if new.allow_all:
            self._cfg(CFG_ALLOW_ALL, 1)
        # Widen first: an entry in both keeps what either allows until the end.
        for k in new.allow_exe:
            exe[_exe_key(exe, k)] = exe.Leaf(new.mask(k) | _old_mask(old, old.allow_exe, k))
        for k in new.allow_name:
            name[_name_key(name, k)] = name.Leaf(new.mask(k) |
                                                 _old_mask(old, old.allow_name, k))
        for u in new.allow_uid:
            uid[uid.Key(u)] = uid.Leaf(new.mask(u) | _old_mask(old, old.allow_uid, u))
        if not new.default_deny:
            self._cfg(CFG_DEFAULT_DENY, 0)
        for k in set(old.deny_exe) - set(new.deny_exe):
            _delete(deny_exe, _exe_key(deny_exe, k))
        for u in set(old.deny_uid) - set(new.deny_uid):
            _delete(deny_uid, deny_uid.Key(u))
        for k, rule in new.deny_exe.items():
            deny_exe[_exe_key(deny_exe, k)] = deny_exe.Leaf(rule)
        for u, rule in new.deny_uid.items():
            deny_uid[deny_uid.Key(u)] = deny_uid.Leaf(rule)
        if new.default_deny:
            self._cfg(CFG_DEFAULT_DENY, 1)
        for k in old.allow_exe - new.allow_exe:
            _delete(exe, _exe_key(exe, k))
        for k in old.allow_name - new.allow_name:
            _delete(name, _name_key(name, k))
        for u in old.allow_uid - new.allow_uid:
            _delete(uid, uid.Key(u))
        for k in new.allow_exe:  # narrowed last
            exe[_exe_key(exe, k)] = exe.Leaf(new.mask(k))
        for k in new.allow_name:
            name[_name_key(name, k)] = name.Leaf(new.mask(k))
        for u in new.allow_uid:
            uid[uid.Key(u)] = uid.Leaf(new.mask(u))
        if not new.allow_all:
            self._cfg(CFG_ALLOW_ALL, 0)
        self.rules = new

    def poll(self, timeout_ms: int = 0) -> None:
        if self.bpf is not None:
            if self.ringbuf:
                self.bpf.ring_buffer_poll(timeout_ms)
            else:
                self.bpf.perf_buffer_poll(timeout_ms)

    def stats(self) -> dict[str, int]:
        if self.bpf is None:
            return {name: 0 for name, _ in STATS}
        t = self.bpf["enf_stats"]
        return {name: sum(t[t.Key(i)]) for name, i in STATS}

    def set_scope(self, cgroup_ids: set[int] | None) -> None:
        """Only callers in these cgroups may be denied (None: every caller). Ids are never
        reused, so the order of adds and removes cannot deny anyone out of scope; the
        switch (key 0) goes on after the ids are in and off before they go."""
        if self.bpf is None:
            return
        t = self.bpf["enf_scope"]
        old = self.scope
        if cgroup_ids is None:
            _delete(t, t.Key(0))
            for cg in old or ():
                _delete(t, t.Key(cg))
            self.scope = None
            return
        new = set(list(cgroup_ids - {0})[:MAX_ENTRIES - 1])
        for cg in new - (old or set()):
            t[t.Key(cg)] = t.Leaf(1)
        t[t.Key(0)] = t.Leaf(1)
        for cg in (old or set()) - new:
            _delete(t, t.Key(cg))
        self.scope = new

    def set_cgroup_denials(self, rules: dict[int, int]) -> None:
        """Cgroup id -> the namespace deny rule's number + 1 (rules naming only a
        namespace, attributed by user space). Removals first: a cgroup no longer covered is
        not denied by a stale entry while the new ones go in."""
        if self.bpf is None:
            return
        t = self.bpf["enf_deny_cgroup"]
        new = dict(list(rules.items())[:MAX_ENTRIES])
        for cg in set(self.cgroup_denials) - set(new):
            _delete(t, t.Key(cg))
        for cg, rule in new.items():
            if self.cgroup_denials.get(cg) != rule:
                t[t.Key(cg)] = t.Leaf(rule)
        self.cgroup_denials = new

    def close(self) -> None:
        """Unlink and unload (idempotent). Disarmed first: nothing is denied from here."""
        if self.bpf is not None:
            try:
                self._cfg(CFG_ARMED, 0)
            except Exception:  # closing must go on whatever the map says
                pass
        self.armed = False
        if self.attachment is not None:
            self.attachment.close()
            self.attachment = None
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception:
                pass
            self.bpf = None


def _exe_key(table: object, k: tuple[int, int, int]) -> object:
    key = table.Key()  # type: ignore[attr-defined]
    key.dev, key.ino, key.uid = k
    return key


def _name_key(table: object, k: tuple[str, int, int]) -> object:
    key = table.Key()  # type: ignore[attr-defined]
    raw = k[0].encode()[:47]
    key.name = raw
    key.uid, key.kind = k[1], k[2]
    return key


def _old_mask(old: KernelRules, keys: object, k: object) -> int:
    return old.mask(k) if k in keys else 0  # type: ignore[operator]


def _delete(table: object, key: object) -> None:
    try:
        del table[key]  # type: ignore[attr-defined]
    except KeyError:
        pass
