"""The agent's spool: events waiting for the fleet scorer's acknowledgement, on disk.

The agent thread appends each event's NDJSON line to the open segment (`<n>.open`, one
write per line, so a crashed agent keeps what it wrote). About once a second (or at
`segment_events` lines) the segment is fsynced and sealed (`<n>.<lines>.ndjson`); the
sender thread posts sealed segments oldest first and deletes each once acknowledged.

Bounded: when the spool would pass `max_bytes`, the oldest sealed segments are deleted and
their events counted as dropped (a long outage keeps the newest events, which matter most
for detection). A restart picks up sealed segments and seals a leftover open one (a torn
last line is cut off).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("imdswatch.fleet.spool")

DEFAULT_MAX_BYTES = 256 << 20
SEGMENT_EVENTS = 5000
SEGMENT_AGE = 1.0
SEGMENT_BYTES = 4 << 20


class SpoolError(OSError):
    """The spool directory cannot be used; the message says which and why."""


class Segment:
    __slots__ = ("path", "events", "size")

    def __init__(self, path: Path, events: int, size: int) -> None:
        self.path = path
        self.events = events
        self.size = size


class Spool:
    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                 segment_events: int = SEGMENT_EVENTS, segment_age: float = SEGMENT_AGE) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_events = segment_events
        self.segment_age = segment_age
        self.segment_bytes = max(4096, min(SEGMENT_BYTES, max_bytes // 8))
        self._sealed: list[Segment] = []
        self._cond = threading.Condition(threading.Lock())
        self._sending: Path | None = None
        self._fd = -1
        self._open_path: Path | None = None
        self._open_events = 0
        self._open_bytes = 0
        self._opened_at = 0.0
        self._next = 0
        self.dropped = 0
        self._warned_at = -1e9
        self.write_error: str | None = None

    # -- start ------------------------------------------------------------------------------
    def open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".writable"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SpoolError(f"spool {self.dir}: not writable ({exc.strerror})") from None
        for p in sorted(self.dir.glob("*.open")):
            self._seal_leftover(p)
        for p in self.dir.glob("*.ndjson"):
            parts = p.name.split(".")
            try:
                n, events = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                continue
            self._sealed.append(Segment(p, events, p.stat().st_size))
            self._next = max(self._next, n + 1)
        self._sealed.sort(key=lambda s: s.path.name)
        if self._sealed:
            log.info("spool %s: %d events from before the restart still to send",
                     self.dir, self.backlog()[0])

    def _seal_leftover(self, path: Path) -> None:
        data = path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        n = int(path.name.split(".")[0])
        self._next = max(self._next, n + 1)
        lines = keep.count(b"\n")
        if not lines:
            path.unlink()
            return
        if len(keep) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(keep))
        path.rename(self.dir / f"{n:012d}.{lines}.ndjson")

    # -- the agent thread -------------------------------------------------------------------
    def append(self, line: bytes) -> None:
        try:
            if self._fd < 0:
                self._new_segment()
            elif self._open_bytes + len(line) + 1 > self.segment_bytes:
                self.seal()
                self._new_segment()
            data = line + b"\n"
            os.write(self._fd, data)
            self._open_events += 1
            self._open_bytes += len(data)
            self.write_error = None
        except OSError as exc:
            # Counted and reported (readiness goes down), never raised into the tracer loop.
            self.dropped += 1
            if self.write_error is None:
                log.error("spool %s: cannot write (%s); events are being dropped", self.dir,
                          exc.strerror)
            self.write_error = exc.strerror or str(exc)
            self.seal()  # what was written before stays sendable
            return
        if self._open_events >= self.segment_events:
            self.seal()

    def _new_segment(self) -> None:
        self._open_path = self.dir / f"{self._next:012d}.open"
        self._next += 1
        self._fd = os.open(self._open_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                           | os.O_CLOEXEC, 0o600)
        self._open_events = self._open_bytes = 0
        self._opened_at = time.monotonic()

    def _close_open(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1

    def due(self) -> bool:
        return self._fd >= 0 and time.monotonic() - self._opened_at >= self.segment_age

    def seal(self) -> None:
        """Make the open segment sendable (fsynced, renamed) and keep the spool bounded."""
        if self._fd < 0 or self._open_path is None:
            return
        path, events, size = self._open_path, self._open_events, self._open_bytes
        try:
            os.fsync(self._fd)
        except OSError as exc:
            log.warning("spool: fsync failed: %s", exc)
        self._close_open()
        self._open_events = self._open_bytes = 0
        if not events:
            path.unlink(missing_ok=True)
            return
        sealed = path.with_name(f"{path.name.split('.')[0]}.{events}.ndjson")
        try:
            path.rename(sealed)
        except OSError as exc:
            log.error("spool: cannot seal %s: %s", path, exc)
            return
        with self._cond:
            self._sealed.append(Segment(sealed, events, size))
            self._enforce_bound()
            self._cond.notify()

    def _enforce_bound(self) -> None:
        total = sum(s.size for s in self._sealed)
        dropped = 0
        while total > self.max_bytes and self._sealed:
            victim = next((s for s in self._sealed if s.path != self._sending), None)
            if victim is None:
                break
            self._sealed.remove(victim)
            victim.path.unlink(missing_ok=True)
            total -= victim.size
            dropped += victim.events
        if dropped:
            self.dropped += dropped
            # Once a minute at most: a long outage must not flood the log.
            now = time.monotonic()
            if now - self._warned_at >= 60:
                self._warned_at = now
                log.warning("spool full (%d bytes max): dropping the oldest events (%d so "
                            "far, see imdswatch_fleet_spool_dropped_total)", self.max_bytes,
                            self.dropped)

    # -- the sender thread ----------------------------------------------------------------
    def oldest(self, timeout: float) -> tuple[Segment, bytes] | None:
        with self._cond:
            if not self._sealed:
                self._cond.wait(timeout)
            if not self._sealed:
                return None
            seg = self._sealed[0]
            self._sending = seg.path
        try:
            return seg, seg.path.read_bytes()
        except OSError:
            with self._cond:
                self._sending = None
                if seg in self._sealed:
                    self._sealed.remove(seg)
            return None

    def done(self, seg: Segment, delivered: bool = True) -> None:
        """`seg` was acknowledged, or refused for good (then its events count as dropped):
        delete it."""
        with self._cond:
            self._sending = None
            if seg in self._sealed:
                self._sealed.remove(seg)
            if not delivered:
                self.dropped += seg.events
        seg.path.unlink(missing_ok=True)

    def release(self) -> None:
        """The segment being sent was not delivered: it stays, and may be dropped again."""
        with self._cond:
            self._sending = None
            self._enforce_bound()

    # -- state --------------------------------------------------------------------------
    def backlog(self) -> tuple[int, int]:
        with self._cond:
            events = sum(s.events for s in self._sealed) + self._open_events
            size = sum(s.size for s in self._sealed) + self._open_bytes
        return events, size

    def writable(self) -> bool:
        return self.write_error is None and os.access(self.dir, os.W_OK)

    def close(self) -> None:
        self.seal()
        with self._cond:
            self._cond.notify_all()
