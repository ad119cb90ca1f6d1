"""Attaching the `cgroup` mode's programs to the cgroup v2 root, and making sure they leave.

Programs attached with the legacy BPF_PROG_ATTACH (what BCC's `attach_func` does) stay
attached after the process that attached them exits, crashes or is killed. So this module
attaches through a BPF link (BPF_LINK_CREATE, Linux >= 5.7) where it can: the kernel
detaches a link's program when the last descriptor of the link closes, that is when the
agent exits however it exits. Older kernels get BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI,
detached in `close()` (Tracer.close, the SIGTERM path, error paths) and at interpreter exit;
a SIGKILLed agent there leaves them attached until the next start removes them
(`remove_stale`). Both ways are multi-attach: other programs on the same hooks (Cilium,
systemd's IP accounting) keep running beside ours.

libbpf's low-level calls are used through ctypes from the libbpf BCC itself links.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import weakref
from pathlib import Path

log = logging.getLogger("imdswatch.tracer")

# enum bpf_attach_type (UAPI)
CGROUP_INET_EGRESS = 1
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CONNECT_HOOKS = {"connect4": CGROUP_INET4_CONNECT, "connect6": CGROUP_INET6_CONNECT}
# Every hook imdswatch attaches to (the connect hooks, request capture's egress hook).
OUR_HOOKS = (CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT, CGROUP_INET_EGRESS)
BPF_F_ALLOW_MULTI = 1 << 1
# Every cgroup program of imdswatch is named with one of these prefixes (BPF keeps 15
# characters of a name): imdsw_connect4/6, imdsw_egress(_tracked), imdsw_track4/6.
PROGRAM_PREFIX = ("imdsw_connect", "imdsw_egress", "imdsw_track")
# The DaemonSet mounts the host's hierarchy at /host/sys/fs/cgroup: in a container,
# /sys/fs/cgroup is the root of its cgroup namespace (its own cgroup), not the host's root.
PREFERRED_ROOTS = ("/host/sys/fs/cgroup", "/host/sys/fs/cgroup/unified", "/sys/fs/cgroup",
                   "/sys/fs/cgroup/unified")


class CgroupError(RuntimeError):
    pass


def cgroup2_mounts(mounts: str = "/proc/self/mounts") -> list[str]:
    """Mount points of cgroup2 file systems, in mount order."""
    try:
        with open(mounts) as f:
            rows = [line.split() for line in f]
    except OSError:
        return []
    out: list[str] = []
    for row in rows:
        if len(row) >= 3 and row[2] == "cgroup2" and row[1] not in out:
            out.append(row[1].replace("\\040", " "))
    return out


def cgroup2_root(configured: str | None = None, mounts: str = "/proc/self/mounts") -> str:
    """The directory of the cgroup v2 root: `configured` when given, else the first cgroup2
    mount of PREFERRED_ROOTS (the DaemonSet's mount of the host's hierarchy, then the
    unified and hybrid host layouts), else the first cgroup2 mount."""
    if configured:
        if not os.path.isfile(os.path.join(configured, "cgroup.procs")):
            raise CgroupError(f"{configured} is not a cgroup v2 directory")
        return configured
    found = cgroup2_mounts(mounts)
    for path in PREFERRED_ROOTS:
        if path in found:
            return path
    if found:
        return found[0]
    raise CgroupError("no cgroup v2 file system is mounted (fstype cgroup2 in /proc/self/mounts)")


# -- libbpf through ctypes -----------------------------------------------------------------

_lib: ctypes.CDLL | None = None


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise CgroupError(f"libbpf not found ({exc}): install libbpf1") from None
        lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.bpf_prog_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
        lib.bpf_prog_detach2.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.bpf_prog_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
                                       ctypes.POINTER(ctypes.c_uint32),
                                       ctypes.POINTER(ctypes.c_uint32),
                                       ctypes.POINTER(ctypes.c_uint32)]
        lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
        lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                               ctypes.POINTER(ctypes.c_uint32)]
        _lib = lib
    return _lib


def _err(res: int) -> str:
    code = ctypes.get_errno() or -res
    return os.strerror(code)


def attached_program_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to this cgroup on `attach_type`."""
    lib = _libbpf()
    ids = (ctypes.c_uint32 * 64)()
    cnt = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    res = lib.bpf_prog_query(cgroup_fd, attach_type, 0, ctypes.byref(flags), ids,
                             ctypes.byref(cnt))
    if res < 0:
        raise CgroupError(f"BPF_PROG_QUERY failed: {_err(res)}")
    return [ids[i] for i in range(min(cnt.value, 64))]


def program_name(prog_fd: int) -> str:
    """The name of a loaded program (struct bpf_prog_info.name, offset 64)."""
    info = (ctypes.c_uint8 * 96)()
    size = ctypes.c_uint32(96)
    if _libbpf().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)) < 0:
        return ""
    return bytes(info[64:80]).split(b"\0", 1)[0].decode("ascii", "replace")


def attached_programs(cgroup_fd: int, attach_type: int) -> list[tuple[int, str]]:
    """(id, name) of every program attached directly to the cgroup on `attach_type`."""
    out = []
    for pid in attached_program_ids(cgroup_fd, attach_type):
        fd = _libbpf().bpf_prog_get_fd_by_id(pid)
        if fd < 0:
            continue
        try:
            out.append((pid, program_name(fd)))
        finally:
            os.close(fd)
    return out


def _programs_held_open(proc: str = "/proc") -> set[int]:
    """Ids of the BPF programs some live process holds a descriptor of (its own program or
    link), from /proc/*/fdinfo."""
    held: set[int] = set()
    for pid_dir in Path(proc).iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if "bpf" not in os.readlink(fd):
                    continue
                text = (pid_dir / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("prog_id:"):
                    held.add(int(line.split()[1]))
    return held


def remove_stale(root: str, proc: str = "/proc") -> list[int]:
    """Detach imdswatch cgroup programs (connect hooks, egress) left on the root cgroup by
    an agent that died without detaching (legacy attach only: links go with their process).
    A program some live process still holds (another agent, a test) is left alone. Returns
    the ids removed."""
    lib = _libbpf()
    cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    removed: list[int] = []
    try:
        ours = [(pid, t) for t in OUR_HOOKS for pid, name in
                attached_programs(cg, t) if name.startswith(PROGRAM_PREFIX)]
        if not ours:
            return []
        held = _programs_held_open(proc)
        for pid, attach_type in ours:
            if pid in held:
                continue
            fd = lib.bpf_prog_get_fd_by_id(pid)
            if fd < 0:
                continue
            try:
                if lib.bpf_prog_detach2(fd, cg, attach_type) == 0:
                    removed.append(pid)
            finally:
                os.close(fd)
    finally:
        os.close(cg)
    for pid in removed:
        log.warning("removed a stale imdswatch cgroup program (id %d) left by an agent that "
                    "did not detach", pid)
    return removed


class CgroupAttachment:
    """The `cgroup` mode's programs attached to one cgroup. `attach` per hook, `close` to
    detach them all (idempotent; also run at interpreter exit)."""

    _live: weakref.WeakSet[CgroupAttachment] = weakref.WeakSet()

    def __init__(self, root: str) -> None:
        self.root = root
        self.cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.links: list[int] = []                  # link fds
        self.legacy: list[tuple[int, int]] = []     # (prog fd, attach type)
        CgroupAttachment._live.add(self)

    def attach(self, prog_fd: int, attach_type: int) -> str:
        """Attach; returns "link" or "legacy" (how). Raises CgroupError."""
        if self.cgroup_fd < 0:
            raise CgroupError("attachment already closed")
        lib = _libbpf()
        ctypes.set_errno(0)
        fd = lib.bpf_link_create(prog_fd, self.cgroup_fd, attach_type, None)
        if fd >= 0:
            self.links.append(fd)
            return "link"
        link_err = _err(fd)
        ctypes.set_errno(0)
        res = lib.bpf_prog_attach(prog_fd, self.cgroup_fd, attach_type, BPF_F_ALLOW_MULTI)
        if res < 0:
            raise CgroupError(f"cannot attach to {self.root}: link: {link_err}; "
                              f"BPF_PROG_ATTACH: {_err(res)}")
        # A duplicate: BCC closes its descriptors at exit before this module's atexit hook
        # runs, and the detach needs the program's.
        self.legacy.append((os.dup(prog_fd), attach_type))
        return "legacy"

    def attach_link(self, prog_fd: int, attach_type: int) -> None:
        """Attach through a BPF link only, never BPF_PROG_ATTACH: for a program that can
        deny, which must leave with the agent however it exits. Raises CgroupError."""
        if self.cgroup_fd < 0:
            raise CgroupError("attachment already closed")
        ctypes.set_errno(0)
        fd = _libbpf().bpf_link_create(prog_fd, self.cgroup_fd, attach_type, None)
        if fd < 0:
            raise CgroupError(f"cannot link to {self.root}: {_err(fd)} (BPF links need "
                              "Linux 5.7 or later)")
        self.links.append(fd)

    def detach(self) -> None:
        """Detach every program, keeping the cgroup open (attach again to resume)."""
        links, self.links = self.links, []
        for fd in links:
            os.close(fd)
        legacy, self.legacy = self.legacy, []
        for prog_fd, attach_type in legacy:
            res = _libbpf().bpf_prog_detach2(prog_fd, self.cgroup_fd, attach_type)
            os.close(prog_fd)
            if res < 0:
                log.error("detaching cgroup program (attach type %d) from %s failed: %s",
                          attach_type, self.root, _err(res))

    def close(self) -> None:
        try:
            self.detach()
        finally:
            if self.cgroup_fd >= 0:
                os.close(self.cgroup_fd)
                self.cgroup_fd = -1


@atexit.register
def _detach_all() -> None:
    for a in list(CgroupAttachment._live):
        try:
            a.close()
        except Exception:  # at exit: nothing left to report to
            pass
