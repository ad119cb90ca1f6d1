"""The kernel event as Python sees it: a ctypes mirror of `struct imds_event` in
bpf/imdswatch.h, and its decoding into a plain record."""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass

AF_INET = 2
AF_INET6 = 10
RESULT_UNKNOWN = 1  # IMDS_RESULT_UNKNOWN: the probe does not see connect()'s result

PROBE_NAMES = {1: "tracepoint", 2: "kprobe", 3: "fentry", 4: "cgroup"}

# Indexes of the per-CPU `stats` array (enum imds_stat).
STAT_NAMES = ("matched", "emitted", "dropped", "count_map_full", "pending_full")


class CEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("result", ctypes.c_int32),
        ("family", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
        ("probe", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
    ]


EVENT_SIZE = ctypes.sizeof(CEvent)
assert EVENT_SIZE == 80, EVENT_SIZE  # must match sizeof(struct imds_event)


_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


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


def decode(data: int | bytes, size: int | None = None) -> KernelEvent:
    """Decode a buffer callback's (pointer, size) or raw bytes."""
    if isinstance(data, bytes | bytearray):
        ev = CEvent.from_buffer_copy(bytes(data[:EVENT_SIZE]))
    else:
        ev = ctypes.cast(data, ctypes.POINTER(CEvent)).contents
    raw = bytes(ev.daddr)
    # inet_ntop: the same text as ipaddress, several times faster on the flood path.
    if ev.family == AF_INET:
        ip = socket.inet_ntop(socket.AF_INET, raw[:4])
    elif raw[:12] == _MAPPED_PREFIX:
        ip = "::ffff:" + socket.inet_ntop(socket.AF_INET, raw[12:])
    else:
        ip = socket.inet_ntop(socket.AF_INET6, raw)
    return KernelEvent(
        ts_ns=ev.ts_ns,
        tid=ev.pid,
        tgid=ev.tgid,
        uid=ev.uid,
        gid=ev.gid,
        cgroup_id=ev.cgroup_id,
        comm=ev.comm.decode("utf-8", "replace"),
        family=ev.family,
        dst_ip=ip,
        dst_port=ev.dport,
        probe=PROBE_NAMES.get(ev.probe, "unknown"),
        result=None if ev.result == RESULT_UNKNOWN else ev.result,
    )
