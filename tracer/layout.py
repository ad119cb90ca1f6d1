"""The kernel event as Python sees it: a ctypes mirror of `struct imds_event` in
bpf/imdswatch.h, and its decoding into a plain record."""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass

AF_INET = 2
AF_INET6 = 10
RESULT_UNKNOWN = 1  # IMDS_RESULT_UNKNOWN: the probe does not see connect()'s result

PROBE_NAMES = {1: "tracepoint", 2: "kprobe", 3: "fentry", 4: "cgroup", 5: "cgroup_skb"}

# Record kinds (IMDS_KIND_*): the first 4 bytes of every record in the output buffer.
KIND_CONNECT, KIND_SYN, KIND_DATA, KIND_CLOSE = 1, 2, 3, 4
# imds_event.flags
F_IDENTITY, F_NAT, F_SOCK_MATCH, F_RECORD = 1, 2, 4, 8
# imds_ident.flags (bpf/identity.h)
ID_EXEC, ID_FORK, ID_SEED, ID_PATH, ID_ARGS, ID_ARGS_CUT, ID_PARENT = 1, 2, 4, 8, 16, 32, 64
PATH_LEN = ARGS_LEN = 256

# Indexes of the per-CPU `stats` array (enum imds_stat).
STAT_NAMES = ("matched", "emitted", "dropped", "count_map_full", "pending_full", "segments",
              "segments_dropped", "segments_truncated")


class CEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("exe_ino", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("result", ctypes.c_int32),
        ("family", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sock_family", ctypes.c_uint16),
        ("sock_dport", ctypes.c_uint16),
        ("sock_daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
        ("leader_comm", ctypes.c_char * 16),
        ("exe_name", ctypes.c_char * 48),
        ("probe", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


EVENT_SIZE = ctypes.sizeof(CEvent)
assert EVENT_SIZE == 184, EVENT_SIZE  # must match sizeof(struct imds_event)


class CIdent(ctypes.Structure):
    """struct imds_ident: a process's identity record (bpf/identity.h)."""

    _fields_ = [
        ("start_ns", ctypes.c_uint64),
        ("ppid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("path_len", ctypes.c_uint16),
        ("args_len", ctypes.c_uint16),
        ("pad", ctypes.c_uint32),
        ("parent_comm", ctypes.c_char * 16),
        ("path", ctypes.c_char * PATH_LEN),
        ("args", ctypes.c_char * ARGS_LEN),
    ]


IDENT_SIZE = ctypes.sizeof(CIdent)
assert IDENT_SIZE == 552, IDENT_SIZE
RECORD_SIZE = EVENT_SIZE + IDENT_SIZE  # struct imds_record: what connects and SYNs hand over

DATA_HEADER = 32  # struct imds_data up to its bytes


class CDataHeader(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("seq", ctypes.c_uint32),
        ("captured", ctypes.c_uint32),
    ]


assert ctypes.sizeof(CDataHeader) == DATA_HEADER


_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


@dataclass(slots=True)
class KernelIdentity:
    """A process's identity record as the kernel kept it (written at exec or fork, or seeded
    from /proc at start): each field None when the record does not hold it."""

    source: str  # "exec", "fork" or "seed"
    start_ns: int | None  # CLOCK_BOOTTIME ns
    ppid: int | None
    parent_name: str | None
    executable: str | None
    args: list[str] | None
    args_cut: bool = False


@dataclass(slots=True)
class KernelEvent:
    """What the kernel knows for sure about one metadata connection."""

    ts_ns: int  # CLOCK_MONOTONIC
    tid: int
    tgid: int
    uid: int
    gid: int
    cgroup_id: int
    comm: str
    family: int
    dst_ip: str
    dst_port: int
    probe: str
    result: int | None  # None when the probe cannot see it
    kind: int = KIND_CONNECT
    flags: int = 0
    cookie: int = 0
    process_name: str | None = None  # the thread-group leader's comm (kernel), when read
    exe_name: str | None = None  # the executable's file name at connect time (kernel)
    exe_ino: int = 0
    sock_ip: str | None = None  # SYN records: the socket's own destination (before NAT)
    sock_port: int | None = None
    identity: KernelIdentity | None = None  # the process's record (F_RECORD)


@dataclass(slots=True)
class Segment:
    """Bytes a tracked connection sent (KIND_DATA), or its end (KIND_CLOSE)."""

    kind: int
    cookie: int
    ts_ns: int
    seq: int
    length: int  # payload bytes of the segment
    data: bytes  # the first `captured` of them


def _ip(family: int, raw: bytes) -> str:
    # inet_ntop: the same text as ipaddress, several times faster on the flood path.
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _MAPPED_PREFIX:
        return "::ffff:" + socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def record_kind(data: int | bytes) -> int:
    """The kind of a record (its first 4 bytes)."""
    if isinstance(data, bytes | bytearray):
        return int.from_bytes(data[:4], "little")
    return ctypes.cast(data, ctypes.POINTER(ctypes.c_uint32)).contents.value


def decode_segment(data: int | bytes, size: int | None = None) -> Segment:
    if isinstance(data, bytes | bytearray):
        raw = bytes(data)
    else:
        raw = ctypes.string_at(data, size if size is not None else DATA_HEADER)
    h = CDataHeader.from_buffer_copy(raw[:DATA_HEADER])
    n = min(h.captured, max(0, len(raw) - DATA_HEADER))
    return Segment(h.kind, h.cookie, h.ts_ns, h.seq, h.len, raw[DATA_HEADER:DATA_HEADER + n])


def path_from_components(raw: bytes) -> str | None:
    """The path the exec program walked, leaf first ("curl\\0bin\\0usr\\0"), as "/usr/bin/curl"."""
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if not parts or any(not p or b"/" in p for p in parts):
        return None
    return "/" + "/".join(_text(p) for p in reversed(parts))


def components_from_path(path: str) -> bytes:
    """The inverse of path_from_components (userspace seeds records from /proc with it)."""
    parts = [p for p in path.split("/") if p]
    return b"".join(p.encode() + b"\0" for p in reversed(parts))


def _field_bytes(rec: ctypes.Structure, field: str, n: int) -> bytes:
    # A c_char array field reads as bytes cut at its first NUL; these hold several strings.
    return ctypes.string_at(ctypes.addressof(rec) + getattr(type(rec), field).offset, n)


def decode_identity(rec: CIdent) -> KernelIdentity:
    flags = rec.flags
    source = "exec" if flags & ID_EXEC else "fork" if flags & ID_FORK else "seed"
    exe = None
    if flags & ID_PATH and 0 < rec.path_len <= PATH_LEN:
        exe = path_from_components(_field_bytes(rec, "path", rec.path_len))
    args = None
    if flags & ID_ARGS and 0 < rec.args_len <= ARGS_LEN:
        raw = _field_bytes(rec, "args", rec.args_len)
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        args = [_text(a) for a in raw.split(b"\0")]
    parent = flags & ID_PARENT
    return KernelIdentity(
        source=source,
        start_ns=rec.start_ns or None,
        ppid=rec.ppid if parent and rec.ppid else None,
        parent_name=_text(rec.parent_comm) if parent and rec.ppid else None,
        executable=exe,
        args=args,
        args_cut=bool(flags & ID_ARGS_CUT),
    )


def decode(data: int | bytes, size: int | None = None) -> KernelEvent:
    """Decode a buffer callback's (pointer, size) or raw bytes of a connect/SYN record."""
    rec = None
    if isinstance(data, bytes | bytearray):
        raw = bytes(data)
        ev = CEvent.from_buffer_copy(raw[:EVENT_SIZE])
        if len(raw) >= RECORD_SIZE:
            rec = CIdent.from_buffer_copy(raw[EVENT_SIZE:RECORD_SIZE])
    else:
        ev = ctypes.cast(data, ctypes.POINTER(CEvent)).contents
        if size is None or size >= RECORD_SIZE:
            rec = CIdent.from_address(data + EVENT_SIZE)
    ip = _ip(ev.family, bytes(ev.daddr))
    identity = bool(ev.flags & F_IDENTITY)
    sock_ip = sock_port = None
    if ev.kind == KIND_SYN:
        sock_ip, sock_port = _ip(ev.sock_family, bytes(ev.sock_daddr)), ev.sock_dport
    return KernelEvent(
        ts_ns=ev.ts_ns,
        tid=ev.pid,
        tgid=ev.tgid,
        uid=ev.uid,
        gid=ev.gid,
        cgroup_id=ev.cgroup_id,
        comm=_text(ev.comm),
        family=ev.family,
        dst_ip=ip,
        dst_port=ev.dport,
        probe=PROBE_NAMES.get(ev.probe, "unknown"),
        result=None if ev.result == RESULT_UNKNOWN else ev.result,
        kind=ev.kind,
        flags=ev.flags,
        cookie=ev.cookie,
        process_name=_text(ev.leader_comm) if identity else None,
        exe_name=(_text(ev.exe_name) or None) if identity else None,
        exe_ino=ev.exe_ino,
        sock_ip=sock_ip,
        sock_port=sock_port,
        identity=decode_identity(rec) if rec is not None and ev.flags & F_RECORD else None,
    )
