"""The fleet scorer's engine: acknowledged batches in, scored events and alerts out.

Ingest threads call `ingest`: under the log's lock, a batch is checked for room in the
queue, de-duplicated by id, appended to the write-ahead log and queued, so the queue's order
is the log's order. The one scoring thread (`run`) takes batches once they are fsynced,
pushes their events through the same `ReorderBuffer` replay uses and scores each released
event with `Scorer.process`, the model's one entry point: the fleet scores as
`imdswatch replay` of the merged stream does.

Events leave the reorder buffer when the newest event time is `window` past them (replay's
rule), or at the latest `hold` wall-clock seconds after they arrived: live events carry
event times close to now, and waiting for ten minutes of newer event time would delay every
alert by ten minutes. A batch that arrives more than `hold` after events newer than its own
were scored is scored at once and counted as late, as replay does with its late lines.

A checkpoint saves, in one atomic state file: the model (the `--state` format), the log
position it contains, the events still in the reorder buffer, the id window and the size of
the alert file. A restart loads it, puts the buffered events back, re-scores the log from
that position, and skips alert lines that are already in the alert file: nothing
acknowledged is lost and nothing is scored or alerted twice.
"""

from __future__ import annotations

import collections
import gc
import gzip
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from exporters.alertcap import AlertCap
from exporters.alerts import build_alert
from fleet.dedup import IdWindow
from fleet.ingest import Item, Parsed, parse
from fleet.metrics import ServeMetrics
from fleet.wal import WriteAheadLog
from intake.reorder import ReorderBuffer
from scoring.scorer import Scorer
from scoring.settings import AGENT_MAX_ENTITIES
from scoring.state import (
    StateError,
    load_state_dict,
    state_chunks,
    state_dict,
    write_atomic,
)

log = logging.getLogger("imdswatch.fleet")

# Acknowledged events waiting for the scorer, a few seconds of ingest. Each is held
# decoded, so this bounds serve's memory beyond the model; agents keep what a 503 turns
# away in their spools.
DEFAULT_QUEUE_EVENTS = 50_000
DEFAULT_HOLD = 0.5
# Events of one log record are ordered by (event time, record seq << ORDER_BITS | index).
ORDER_BITS = 24


class Overloaded(Exception):
    """The queue has no room: answer 503 and let the agent retry."""


class IngestQueue:
    """Acknowledged batches waiting for the scorer, bounded in events."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self.events = 0
        self._batches: collections.deque[tuple[int, list[Item]]] = collections.deque()
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

    def take(self, timeout: float) -> list[tuple[int, list[Item]]]:
        with self._cond:
            if not self._batches:
                self._cond.wait(timeout)
            out = list(self._batches)
            self._batches.clear()
        return out

    def done(self, n: int) -> None:
        with self._cond:
            self.events -= n


class AlertSink:
    """Alert lines out, skipping those a previous run already wrote (after a restart the
    log's events are re-scored from the checkpoint and give the same alerts again)."""

    def __init__(self, output: str, stream: Any = None, cap: AlertCap | None = None) -> None:
        # The same alert-line cap as the agent's and replay's (exporters.alertcap): one
        # compromised image on every node must not bury the SIEM either.
        self.cap = cap
        self.path = None if output == "-" else Path(output)
        self._stream = stream if self.path is None else open(self.path, "ab")  # noqa: SIM115
        self._seen: collections.Counter[bytes] = collections.Counter()
        self.written = 0

    def offset(self) -> int | None:
        return None if self.path is None else self._stream.tell()

    def already_written_since(self, offset: int | None) -> None:
        if self.path is None or offset is None:
            return
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                if line.endswith(b"\n"):
                    self._seen[line] += 1

    def alert(self, doc: dict, ts: float, detector: str) -> None:
        """An alert line, through the cap (which may write a window's summary first)."""
        if self.cap is not None:
            admitted, summary = self.cap.admit(ts, detector)
            if summary is not None:
                self.write(orjson.dumps(summary) + b"\n")
            if not admitted:
                return
        self.write(orjson.dumps(doc) + b"\n")

    def flush_cap(self, now: float) -> None:
        """The cap's summary for a window that has ended by event time `now`."""
        if self.cap is not None:
            summary = self.cap.flush(now)
            if summary is not None:
                self.write(orjson.dumps(summary) + b"\n")

    def write(self, line: bytes) -> None:
        if self._seen:
            if self._seen[line] > 0:
                self._seen[line] -= 1
                if not self._seen[line]:
                    del self._seen[line]
                return
        self._stream.write(line)
        self._stream.flush()
        self.written += 1

    def close(self) -> None:
        if self.path is not None:
            self._stream.close()
        else:
            self._stream.flush()


class FleetCore:
    def __init__(
        self,
        scorer: Scorer,
        state_path: str | os.PathLike,
        alerts: AlertSink,
        metrics: ServeMetrics,
        observe: Callable[[Any], None] = lambda _o: None,
        *,
        window: float = 600.0,
        hold: float = DEFAULT_HOLD,
        queue_events: int = DEFAULT_QUEUE_EVENTS,
        save_interval: float = 60.0,
        ids: IdWindow | None = None,
    ) -> None:
        self.scorer = scorer
        self.state_path = Path(state_path)
        self.wal = WriteAheadLog(self.state_path.with_name(self.state_path.name + ".wal"))
        self.alerts = alerts
        self.metrics = metrics
        self.observe = observe
        self.window = window
        self.hold = hold
        self.queue = IngestQueue(queue_events)
        self.save_interval = save_interval
        self.ids = ids or IdWindow()
        self.buffer = ReorderBuffer(window)
        self._held: collections.deque[tuple[float, float]] = collections.deque()
        self.applied = 0  # every log record before this one is scored or in the buffer
        self.scored = 0
        self.model: tuple[str, bytes] = ("", b"")
        # The model handed to agents holds at most what an agent keeps (its default cap):
        # larger, it would not fit a node agent's memory limit.
        self.agent_max_entities = AGENT_MAX_ENTITIES
        self.ready = False

    # -- start ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the checkpoint, put its buffered events back, re-score the log after it."""
        fleet: dict = {}
        if self.state_path.exists():
            state = _read_state(self.state_path)
            load_state_dict(self.scorer, state, str(self.state_path))
            fleet = state.get("fleet") or {}
        try:
            self.applied = int(fleet.get("wal_seq", 0))
            self.buffer.newest = _num(fleet.get("newest"))
            self.buffer.released = _num(fleet.get("released"))
            self.ids.load(fleet.get("ids") or {})
            pending = [(float(ts), int(order), line.encode())
                       for ts, order, line in fleet.get("pending", [])]
            if self.alerts.cap is not None:
                self.alerts.cap.restore(fleet.get("alert_cap"))
        except (TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{self.state_path}: malformed fleet checkpoint ({exc})") from None
        self.alerts.already_written_since(fleet.get("alerts_offset"))
        catalog = self.scorer.catalog
        for ts, order, line in sorted(pending, key=lambda p: p[1]):
            for it in parse(line, catalog).items:
                self._push((ts, order, it), arrival=time.monotonic())
        if pending:
            # Released after the hold like any batch, even if no new event ever comes.
            self._held.append((time.monotonic(), max(p[0] for p in pending)))
        replayed = 0
        for seq, payload in self.wal.replay(self.applied):
            parsed = parse(payload, catalog)
            for it in parsed.items:
                self.ids.add(it.key)
            self._consume(seq, parsed.items)
            replayed += len(parsed.items)
        self.wal.open()
        self.metrics.wal_bytes.set(self.wal.disk_bytes())
        if pending or replayed:
            log.info("restored %d buffered events and %d from the write-ahead log",
                     len(pending), replayed)
        self._publish_model()
        self.ready = True

    # -- ingest (any thread) ----------------------------------------------------------------
    def ingest(self, parsed: Parsed) -> tuple[int, int]:
        """Make the batch's new events durable and queue them: (accepted, duplicates).
        Raises Overloaded when the queue is full, OSError when the log cannot be written."""
        items = parsed.items
        fresh: list[Item] = []
        seq = -1
        with self.wal.lock():
            if not self.queue.has_room(len(items)):
                raise Overloaded()
            add = self.ids.add
            fresh = [it for it in items if add(it.key)]
            if fresh:
                try:
                    seq = self.wal.append_locked(b"\n".join(it.line for it in fresh))
                except OSError:
                    self.ids.discard(it.key for it in fresh)
                    raise
                self.queue.put(seq, fresh)
        if seq >= 0:
            self.wal.sync(seq)
        return len(fresh), len(items) - len(fresh)

    # -- scoring (the scoring thread) --------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        next_save = time.monotonic() + self.save_interval
        while not stop.is_set():
            self.step(0.05)
            if time.monotonic() >= next_save:
                self.checkpoint()
                next_save = time.monotonic() + self.save_interval

    def step(self, timeout: float) -> None:
        before = self.scored
        batches = self.queue.take(timeout)
        if batches:
            self.wal.sync(batches[-1][0])
            for seq, items in batches:
                self._consume(seq, items)
                self.queue.done(len(items))
        self._release_held(time.monotonic())
        self.alerts.flush_cap(time.time())
        self.metrics.queue.set(self.queue.events)
        if self.scored != before:
            self.metrics.scored.inc(self.scored - before)

    def drain_queue(self) -> None:
        """Score what is queued (at shutdown: the ingest server is already closed)."""
        while self.queue.events:
            self.step(0)

    def _consume(self, seq: int, items: list[Item]) -> None:
        base = seq << ORDER_BITS
        newest = -math.inf
        now = time.monotonic()
        for i, it in enumerate(items):
            ts = it.event.ts
            newest = ts if ts > newest else newest
            self._push((ts, base | i, it), now)
        if items:
            self._held.append((now, newest))
        self.applied = seq + 1

    def _push(self, item: tuple, arrival: float) -> None:
        late = self.buffer.late
        for ready in self.buffer.push(item):
            self._score(ready)
        if self.buffer.late != late:
            self.metrics.late.inc(self.buffer.late - late)

    def _release_held(self, now: float) -> None:
        held = self._held
        horizon = -math.inf
        cutoff = now - self.hold
        while held and held[0][0] <= cutoff:
            horizon = max(horizon, held.popleft()[1])
        if horizon > -math.inf and horizon >= self.buffer.released:
            # The buffer's own release step, with the wall clock's horizon instead of
            # newest - window.
            for ready in self.buffer._release(horizon):
                self._score(ready)

    def _score(self, ready: tuple) -> None:
        it: Item = ready[2]
        out = self.scorer.process(it.event)
        if out is None:  # the catalog changed under a buffered event
            return
        self.scored += 1
        # Only anomalies reach the exporter (anomaly series, alert counts): per-event
        # connection counts by process come from the agents, and labelling every event
        # would cost serve more than scoring it. Scored events are counted per batch.
        if out.reason or out.suppressed:
            self.observe(out)
        if out.alert:
            if it.agent_alerted:
                self.metrics.agent_alerted.inc()
            else:
                self.alerts.alert(build_alert(out, "fleet"), out.event.ts, out.detector)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> None:
        t0 = time.monotonic()
        self.wal.rotate()
        with self.wal.lock():
            ids = self.ids.dump()
        buf = self.buffer
        pending = sorted([*buf.fifo, *buf.heap], key=lambda x: x[1])
        fleet = {
            "wal_seq": self.applied,
            "newest": None if buf.newest == -math.inf else buf.newest,
            "released": None if buf.released == -math.inf else buf.released,
            "pending": [[ts, order, it.line.decode("utf-8", "replace")]
                        for ts, order, it in pending],
            "ids": ids,
            "alerts_offset": self.alerts.offset(),
            "alert_cap": self.alerts.cap.snapshot() if self.alerts.cap else None,
        }
        try:
            # Streamed: the state of a million entries is never one structure in memory.
            write_atomic(self.state_path, state_chunks(self.scorer, {"fleet": fleet}),
                         gz=self.state_path.suffix == ".gz")
        except OSError as exc:
            log.error("cannot save the fleet state to %s: %s (the log is kept)",
                      self.state_path, exc)
            return
        self.wal.drop_before(self.applied)
        self._publish_model()
        # The model is millions of long-lived objects that form no cycles: moved out of the
        # cyclic collector's view, a full collection no longer walks all of them (pauses of
        # seconds at 1M entities, which POST-to-alert latency would show). Objects freed
        # later are still freed by their reference counts.
        gc.freeze()
        took = time.monotonic() - t0
        self.metrics.checkpoint_seconds.set(took)
        self.metrics.checkpoint_time.set_to_current_time()
        self.metrics.wal_bytes.set(self.wal.disk_bytes())
        log.debug("checkpoint in %.2fs at log record %d", took, self.applied)

    def _publish_model(self) -> None:
        # Cut to what an agent keeps, by the model's own eviction order.
        state = state_dict(self.scorer, self.agent_max_entities)
        body = gzip.compress(orjson.dumps(state), compresslevel=3)
        self.model = (hashlib.blake2b(body, digest_size=12).hexdigest(), body)

    def close(self) -> None:
        self.wal.close()
        self.alerts.close()


def _num(v: Any) -> float:
    return -math.inf if v is None else float(v)


def _read_state(path: Path) -> dict:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        state = orjson.loads(raw)
    except (OSError, EOFError, orjson.JSONDecodeError) as exc:
        raise StateError(f"{path}: cannot read the fleet state ({exc})") from None
    if not isinstance(state, dict):
        raise StateError(f"{path}: not an imdswatch state file")
    return state
