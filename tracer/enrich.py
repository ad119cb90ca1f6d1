"""What /proc says about the process behind a kernel event.

The root is configurable (`/host/proc` in a container with hostPID). Reads race with the
process: one that has exited (or exec'd another program) before we look keeps only its
kernel fields and is flagged, never dropped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tracer.cgroups import CgroupIdentity, identify
from tracer.passwd import PasswdNames


@dataclass(slots=True)
class ProcessInfo:
    exited: bool = False
    exe: str | None = None
    exe_ino: int | None = None  # inode number of /proc/<pid>/exe's target
    command_line: str | None = None
    args: list[str] | None = None
    ppid: int | None = None
    parent_name: str | None = None
    parent_exe: str | None = None
    euid: int | None = None
    egid: int | None = None
    cgroup: CgroupIdentity | None = None
    start_ns: int | None = None  # start time, CLOCK_BOOTTIME ns (/proc/PID/stat, in ticks)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    # A replaced or deleted binary reads as "/path (deleted)"; keep the path, which is what
    # ran, and let the flag-free path be compared with exceptions.
    return target.removesuffix(" (deleted)")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Enricher:
    """Reads exe, command line, parent, effective ids and cgroup identity for a tgid.

    Results are cached briefly per (tgid, comm): a process calling the metadata service in a
    loop is read once, not per connection, while an exec (new comm) is read afresh.
    """

    def __init__(
        self, proc_root: str = "/proc", passwd_path: str = "/etc/passwd", cache_ttl: float = 2.0
    ) -> None:
        self.proc_root = proc_root.rstrip("/") or "/proc"
        self.users = PasswdNames(passwd_path)
        self.cache_ttl = cache_ttl
        self._cache: dict[tuple[int, str, int], tuple[float, ProcessInfo]] = {}

    def user_name(self, uid: int) -> str | None:
        return self.users.name(uid)

    def lookup(self, tgid: int, tid: int, comm: str, exe_ino: int = 0) -> ProcessInfo:
        """`exe_ino`: the executable's inode the kernel saw (0: unknown); part of the cache
        key, so a process that exec'd another binary under the same name is read afresh."""
        now = time.monotonic()
        key = (tgid, comm, exe_ino)
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_ttl:
            return hit[1]
        info = self._read(tgid, tid, comm)
        if not info.exited:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = (now, info)
        return info

    def _read(self, tgid: int, tid: int, comm: str) -> ProcessInfo:
        base = f"{self.proc_root}/{tgid}"
        # The thread's comm must still be the kernel's: otherwise the thread is gone, or the
        # pid now belongs to another program, and nothing read below would be about our caller.
        # The kernel ends comm with one newline; a name may itself end in "\n" (prctl), so
        # only that one is removed.
        now_comm = _read(f"{base}/task/{tid}/comm")
        if now_comm is None or now_comm.removesuffix("\n") != comm:
            return ProcessInfo(exited=True)
        info = ProcessInfo()
        info.exe = _readlink(f"{base}/exe")
        try:
            info.exe_ino = os.stat(f"{base}/exe").st_ino
        except OSError:
            info.exe_ino = None
        cmdline = _read(f"{base}/cmdline")
        if cmdline:
            args = cmdline.rstrip("\0").split("\0")
            info.args = args
            info.command_line = " ".join(args)
        status = _read(f"{base}/status")
        if status is None:
            return ProcessInfo(exited=True)
        for line in status.splitlines():
            if line.startswith("PPid:"):
                info.ppid = int(line.split()[1])
            elif line.startswith("Uid:"):
                info.euid = int(line.split()[2])
            elif line.startswith("Gid:"):
                info.egid = int(line.split()[2])
        stat = _read(f"{base}/stat")
        if stat is not None:
            end = stat.rfind(")")
            fields = stat[end + 2:].split() if end >= 0 else []
            if len(fields) > 19 and fields[19].isdigit():
                info.start_ns = int(fields[19]) * 1_000_000_000 // _CLK_TCK
        cg = _read(f"{base}/cgroup")
        if cg is not None:
            info.cgroup = identify(cg)
        # Read again: an exec between the first check and the reads above (a shell exec'ing
        # its last command right after connecting) would attribute another program's exe.
        after = _read(f"{base}/task/{tid}/comm")
        if after is None or after.removesuffix("\n") != comm:
            return ProcessInfo(exited=True)
        if info.ppid:
            pbase = f"{self.proc_root}/{info.ppid}"
            pcomm = _read(f"{pbase}/comm")
            info.parent_name = pcomm.removesuffix("\n") if pcomm is not None else None
            info.parent_exe = _readlink(f"{pbase}/exe")
        return info
