"""Identity records for the processes already running when the agent starts, read from /proc
and written into the kernel's `identities` map (bpf/identity.h) without overwriting a record
the kernel wrote meanwhile (its exec and fork programs are attached first, so anything that
starts or execs during the scan is the kernel's)."""

from __future__ import annotations

import ctypes
import os

from tracer.layout import (
    ARGS_LEN,
    ID_ARGS,
    ID_ARGS_CUT,
    ID_PARENT,
    ID_PATH,
    ID_SEED,
    PATH_LEN,
    components_from_path,
)

BPF_NOEXIST = 1
MAX_PROCESSES = 65536  # the scan's bound; the map's own bound is smaller and LRU


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def stat_fields(raw: bytes) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks since boot) from /proc/PID/stat; the name in
    parentheses may hold anything, so fields are counted after its last ')'."""
    end = raw.rfind(b")")
    if end < 0:
        return None
    fields = raw[end + 2:].split()
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def fill(leaf: ctypes.Structure, proc_root: str, pid: int) -> bool:
    """Fill a `struct imds_ident` leaf from /proc/PID; False when the process is gone or
    unreadable. A kernel thread (no exe, no argv) gets its parent and start only."""
    base = f"{proc_root}/{pid}"
    stat = _read(f"{base}/stat")
    parsed = stat_fields(stat) if stat is not None else None
    if parsed is None:
        return False
    ppid, ticks = parsed
    flags = ID_SEED
    leaf.start_ns = ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    if ppid:
        comm = _read(f"{proc_root}/{ppid}/comm")
        if comm is not None:
            leaf.ppid = ppid
            leaf.parent_comm = comm.removesuffix(b"\n")[:15]
            flags |= ID_PARENT
    try:
        exe = os.readlink(f"{base}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = None
    if exe and exe.startswith("/"):
        comps = components_from_path(exe)
        if 0 < len(comps) <= PATH_LEN:
            ctypes.memmove(ctypes.addressof(leaf) + type(leaf).path.offset, comps, len(comps))
            leaf.path_len = len(comps)
            flags |= ID_PATH
    argv = _read(f"{base}/cmdline")
    if argv:
        if len(argv) > ARGS_LEN:
            argv, flags = argv[:ARGS_LEN], flags | ID_ARGS_CUT
        ctypes.memmove(ctypes.addressof(leaf) + type(leaf).args.offset, argv, len(argv))
        leaf.args_len = len(argv)
        flags |= ID_ARGS
    leaf.flags = flags
    return True


def seed(table: object, proc_root: str = "/proc") -> int:
    """Write a record for every process /proc lists that has none yet; returns how many
    were written. `table` is the BCC table of the `identities` map."""
    from bcc.libbcc import lib  # type: ignore[import-not-found]

    try:
        pids = sorted(int(n) for n in os.listdir(proc_root) if n.isdigit())
    except OSError:
        return 0
    written = 0
    fd = table.map_fd  # type: ignore[attr-defined]
    for pid in pids[:MAX_PROCESSES]:
        key = table.Key(pid)  # type: ignore[attr-defined]
        leaf = table.Leaf()  # type: ignore[attr-defined]
        if not fill(leaf, proc_root, pid):
            continue
        if lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST) == 0:
            written += 1
    return written
