"""The fleet scorer's engine: acknowledged batches in, scored events and alerts out.

The core reads batches from an event log (`fleet.eventlog.EventLog`: the local write-ahead
log of section 5, or the JetStream stream of section 8) and never knows which. The one
scoring thread (`run`, or the bus's scoring replica) takes batches in the log's order,
pushes their events through the same `ReorderBuffer` replay uses and scores each released
event with `Scorer.process`, the model's one entry point: the fleet scores as
`imdswatch replay` of the merged stream does.

Events leave the reorder buffer when the newest event time is `window` past them (replay's
rule), or at the latest `hold` wall-clock seconds after they arrived: live events carry
event times close to now, and waiting for ten minutes of newer event time would delay every
alert by ten minutes. A batch that arrives more than `hold` after events newer than its own
were scored is scored at once and counted as late, as replay does with its late lines.

A checkpoint (`fleet.checkpoints.CheckpointStore`) saves in one state: the model (the
`--state` format), the log position it contains, the events still in the reorder buffer,
the id window, the alert cap and where the alert sink finds the lines written since. A
restart (or the next scoring replica) loads it, puts the buffered events back, re-scores
the log from that position, and skips the alerts already written: nothing acknowledged is
lost and nothing is scored or alerted twice.
"""

from __future__ import annotations

import collections
import gc
import gzip
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from exporters.alerts import build_alert
from fleet.alertsink import AlertSink
from fleet.checkpoints import CheckpointStore, model_etag
from fleet.eventlog import EventLog, Overloaded
from fleet.ingest import Item, Parsed, parse
from fleet.metrics import ServeMetrics
from intake.reorder import ReorderBuffer
from scoring.endpoints import EndpointCatalog
from scoring.scorer import Scorer
from scoring.settings import AGENT_MAX_ENTITIES
from scoring.state import StateError, state_dict

log = logging.getLogger("imdswatch.fleet")

# Acknowledged events waiting for the scorer, a few seconds of ingest. Each is held
# decoded, so this bounds serve's memory beyond the model; agents keep what a 503 turns
# away in their spools.
DEFAULT_QUEUE_EVENTS = 50_000
DEFAULT_HOLD = 0.5
# Events of one log record are ordered by (event time, record seq << ORDER_BITS | index).
ORDER_BITS = 24

__all__ = ["DEFAULT_HOLD", "DEFAULT_QUEUE_EVENTS", "AlertSink", "FleetCore", "Overloaded"]


class FleetCore:
    def __init__(
        self,
        scorer: Scorer,
        log: EventLog,
        store: CheckpointStore,
        alerts: AlertSink,
        metrics: ServeMetrics,
        observe: Callable[[Any], None] = lambda _o: None,
        *,
        window: float = 600.0,
        hold: float = DEFAULT_HOLD,
        save_interval: float = 60.0,
        source: str = "the checkpoint",
    ) -> None:
        self.scorer = scorer
        self.log = log
        self.store = store
        self.alerts = alerts
        self.metrics = metrics
        self.observe = observe
        self.window = window
        self.hold = hold
        self.save_interval = save_interval
        self.source = source  # names the checkpoint in errors
        self.ids = log.ids
        self.buffer = ReorderBuffer(window)
        self._held: collections.deque[tuple[float, float]] = collections.deque()
        self.applied = 0  # every log record before this one is scored or in the buffer
        self.scored = 0
        self.model: tuple[str, bytes] = ("", b"")
        # The model handed to agents holds at most what an agent keeps (its default cap):
        # larger, it would not fit a node agent's memory limit.
        self.agent_max_entities = AGENT_MAX_ENTITIES
        self.ready = False

    @property
    def catalog(self) -> EndpointCatalog:
        return self.scorer.catalog

    # -- start ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the checkpoint, put its buffered events back, re-score the log after it."""
        fleet = self.store.load(self.scorer)
        if fleet is None:
            fleet = {}
        try:
            self.applied = int(fleet.get(self.log.POSITION_KEY, 0))
            self.buffer.newest = _num(fleet.get("newest"))
            self.buffer.released = _num(fleet.get("released"))
            self.ids.load(fleet.get("ids") or {})
            pending = [(float(ts), int(order), line.encode())
                       for ts, order, line in fleet.get("pending", [])]
            if self.alerts.cap is not None:
                self.alerts.cap.restore(fleet.get("alert_cap"))
            self.alerts.resume(fleet)
        except (TypeError, ValueError, AttributeError, OSError) as exc:
            raise StateError(f"{self.source}: malformed fleet checkpoint ({exc})") from None
        self.alerts.open()
        catalog = self.scorer.catalog
        for ts, order, line in sorted(pending, key=lambda p: p[1]):
            for it in parse(line, catalog).items:
                self._push((ts, order, it), arrival=time.monotonic())
        if pending:
            # Released after the hold like any batch, even if no new event ever comes.
            self._held.append((time.monotonic(), max(p[0] for p in pending)))
        replayed = 0
        for seq, items in self.log.resume(self.applied, catalog):
            self._consume(seq, items)
            replayed += len(items)
        if pending or replayed:
            log.info("restored %d buffered events and %d from the log", len(pending), replayed)
        self._publish_model()
        self.ready = True

    # -- ingest (any thread) ----------------------------------------------------------------
    def ingest(self, parsed: Parsed) -> tuple[int, int]:
        """Make the batch's new events durable: (accepted, duplicates). Raises Overloaded
        when the log has no room, LogUnavailable when it cannot take events now."""
        return self.log.append(parsed)

    def document(self, name: str) -> tuple[str, bytes] | None:
        """(ETag, gzip body) of a document agents fetch (`GET /v1/<name>`)."""
        return self.model if name == "model" and self.model[0] else None

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
        batches = self.log.take(timeout)
        for seq, items in batches:
            self._consume(seq, items)
            self.log.done(len(items))
        self._release_held(time.monotonic())
        self.alerts.flush_cap(time.time())
        self.metrics.queue.set(self.log.queued())
        if self.scored != before:
            self.metrics.scored.inc(self.scored - before)

    def drain_queue(self) -> None:
        """Score what is queued (at shutdown: the ingest server is already closed)."""
        while self.log.queued():
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
    def checkpoint(self) -> bool:
        t0 = time.monotonic()
        self.log.before_checkpoint()
        ids = self.log.ids_snapshot()
        buf = self.buffer
        pending = sorted([*buf.fifo, *buf.heap], key=lambda x: x[1])
        fleet = {
            self.log.POSITION_KEY: self.applied,
            "newest": None if buf.newest == -math.inf else buf.newest,
            "released": None if buf.released == -math.inf else buf.released,
            "pending": [[ts, order, it.line.decode("utf-8", "replace")]
                        for ts, order, it in pending],
            "ids": ids,
            "alert_cap": self.alerts.cap.snapshot() if self.alerts.cap else None,
            **self.alerts.checkpoint_fields(),
        }
        model = self._model_body()
        if not self.store.save(self.scorer, fleet, model):
            return False
        self.alerts.checkpoint_saved()
        self.log.after_checkpoint(self.applied)
        self.model = (model_etag(model), model)
        # The model is millions of long-lived objects that form no cycles: moved out of the
        # cyclic collector's view, a full collection no longer walks all of them (pauses of
        # seconds at 1M entities, which POST-to-alert latency would show). Objects freed
        # later are still freed by their reference counts.
        gc.freeze()
        took = time.monotonic() - t0
        self.metrics.checkpoint_seconds.set(took)
        self.metrics.checkpoint_time.set_to_current_time()
        log.debug("checkpoint in %.2fs at log position %d", took, self.applied)
        return True

    def _model_body(self) -> bytes:
        # Cut to what an agent keeps, by the model's own eviction order.
        state = state_dict(self.scorer, self.agent_max_entities)
        return gzip.compress(orjson.dumps(state), compresslevel=3)

    def _publish_model(self) -> None:
        body = self._model_body()
        self.model = (model_etag(body), body)

    def close(self) -> None:
        self.log.close()
        self.alerts.close()


def _num(v: Any) -> float:
    return -math.inf if v is None else float(v)
