"""Kernel monotonic nanoseconds to wall-clock event time."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class MonotonicClock:
    """bpf_ktime_get_ns() counts CLOCK_MONOTONIC, which Python's time.monotonic_ns() reads
    too; the offset to the wall clock is re-measured on `refresh()` so NTP steps follow."""

    def __init__(self) -> None:
        self.offset_ns = 0
        self.refresh()

    def refresh(self) -> None:
        # Bracket the wall-clock read between two monotonic reads to halve the error.
        m1 = time.monotonic_ns()
        wall = time.time_ns()
        m2 = time.monotonic_ns()
        self.offset_ns = wall - (m1 + m2) // 2
        b1 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        wall = time.time_ns()
        b2 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.boot_offset_ns = wall - (b1 + b2) // 2

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def wall_from_boottime(self, boot_ns: int) -> int:
        """CLOCK_BOOTTIME ns (a process's start time as the kernel and /proc keep it) to
        wall-clock ns."""
        return boot_ns + self.boot_offset_ns


_last_second: list = [None, ""]


def rfc3339(epoch_ns: int) -> str:
    """2024-05-01T12:00:00.123456Z. The date-time part is cached per second: events come
    in bursts within the same second."""
    sec, ns = divmod(epoch_ns, 1_000_000_000)
    if _last_second[0] != sec:
        prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _last_second[0], _last_second[1] = sec, prefix
    return f"{_last_second[1]}{ns // 1000:06d}Z"
