"""Where acknowledged events wait to be scored: the one interface the scoring core reads,
and section 5's embedded implementation of it.

The scoring core (`fleet.core.FleetCore`) never knows which log it reads:
- `LocalLog` (here): the write-ahead log on the state's disk (`fleet.wal`) and the queue of
  batches acknowledged since the process started. The default.
- `fleet.bus_log.JetStreamLog`: a JetStream stream every replica appends to (section 8).

A log numbers its batches: `seq` orders a batch's events after every earlier batch's, and
a *position* is the seq of the next batch to read. A checkpoint saves the position the
model has reached under the log's `POSITION_KEY`; `resume(position)` continues from it.
Each event reaches the scorer once: a log de-duplicates by the item's key through the
`IdWindow` it was given (saved in every checkpoint, so the window survives restarts).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from fleet.dedup import IdWindow
from fleet.ingest import Item, Parsed, parse
from fleet.metrics import ServeMetrics
from fleet.wal import WriteAheadLog
from scoring.endpoints import EndpointCatalog

Batch = tuple[int, list[Item]]


class Overloaded(Exception):
    """The log has no room now: answer 503 and let the agent retry."""


class LogUnavailable(OSError):
    """The log cannot take events now (a disk error, the bus away): 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EventLog(Protocol):
    POSITION_KEY: str
    ids: IdWindow

    def append(self, parsed: Parsed) -> tuple[int, int]:
        """Make a batch's events durable: (accepted, duplicates). Raises Overloaded or
        LogUnavailable; returns only once the events survive a SIGKILL of this process."""
        ...

    def resume(self, position: int, catalog: EndpointCatalog) -> Iterator[Batch]:
        """The batches from `position` on that are already in the log (at a start)."""
        ...

    def take(self, timeout: float) -> list[Batch]:
        """The next batches in order, waiting up to `timeout` for one."""
        ...

    def done(self, events: int) -> None:
        """`events` taken events are scored or buffered (the log may free their room)."""
        ...

    def queued(self) -> int:
        """Events acknowledged and not yet taken (for the queue metric)."""
        ...

    def ids_snapshot(self) -> dict:
        """The id window as a checkpoint saves it (consistent with concurrent appends)."""
        ...

    def before_checkpoint(self) -> None: ...

    def after_checkpoint(self, position: int) -> None:
        """A checkpoint containing everything before `position` is durable."""
        ...

    def close(self) -> None: ...


class IngestQueue:
    """Acknowledged batches waiting for the scorer, bounded in events."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self.events = 0
        self._batches: collections.deque[Batch] = collections.deque()
        self._cond = threading.Condition(threading.Lock())

    def has_room(self, n: int) -> bool:
        # A batch larger than the whole queue is still taken when the queue is empty, or
        # it could never be delivered.
        return self.events == 0 or self.events + n <= self.max_events

    def put(self, seq: int, items: list[Item]) -> None:
        with self._cond:
            self._batches.append((seq, items))
            self.events += len(items)
            self._cond.notify()

    def take(self, timeout: float) -> list[Batch]:
        with self._cond:
            if not self._batches:
                self._cond.wait(timeout)
            out = list(self._batches)
            self._batches.clear()
        return out

    def done(self, n: int) -> None:
        with self._cond:
            self.events -= n


class LocalLog:
    """Section 5's log. Ingest threads call `append`: under the log's lock a batch is
    checked for room in the queue, de-duplicated by id, appended to the write-ahead log and
    queued, so the queue's order is the log's order; the 200 waits for the group fsync.
    The scoring thread takes batches once they are fsynced."""

    POSITION_KEY = "wal_seq"

    def __init__(self, directory: str | Path, ids: IdWindow, metrics: ServeMetrics,
                 queue_events: int) -> None:
        self.wal = WriteAheadLog(directory)
        self.ids = ids
        self.metrics = metrics
        self.queue = IngestQueue(queue_events)

    def append(self, parsed: Parsed) -> tuple[int, int]:
        items = parsed.items
        seq = -1
        with self.wal.lock():
            if not self.queue.has_room(len(items)):
                raise Overloaded()
            add = self.ids.add
            fresh = [it for it in items if add(it.key)]
            if fresh:
                try:
                    seq = self.wal.append_locked(b"\n".join(it.line for it in fresh))
                except OSError as exc:
                    self.ids.discard(it.key for it in fresh)
                    raise LogUnavailable(f"cannot write the write-ahead log: {exc}") from None
                self.queue.put(seq, fresh)
        if seq >= 0:
            try:
                self.wal.sync(seq)
            except OSError as exc:
                raise LogUnavailable(f"cannot sync the write-ahead log: {exc}") from None
        return len(fresh), len(items) - len(fresh)

    def resume(self, position: int, catalog: EndpointCatalog) -> Iterator[Batch]:
        for seq, payload in self.wal.replay(position):
            items = parse(payload, catalog).items
            for it in items:
                self.ids.add(it.key)
            yield seq, items
        self.wal.open()
        self.metrics.wal_bytes.set(self.wal.disk_bytes())

    def take(self, timeout: float) -> list[Batch]:
        batches = self.queue.take(timeout)
        if batches:
            self.wal.sync(batches[-1][0])
        return batches

    def done(self, events: int) -> None:
        self.queue.done(events)

    def queued(self) -> int:
        return self.queue.events

    def ids_snapshot(self) -> dict:
        with self.wal.lock():
            return self.ids.dump()

    def before_checkpoint(self) -> None:
        self.wal.rotate()

    def after_checkpoint(self, position: int) -> None:
        self.wal.drop_before(position)
        self.metrics.wal_bytes.set(self.wal.disk_bytes())

    def close(self) -> None:
        self.wal.close()
