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

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns


def rfc3339(epoch_ns: int) -> str:
    """2024-05-01T12:00:00.123456Z"""
    dt = datetime.fromtimestamp(epoch_ns / 1e9, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}Z"
