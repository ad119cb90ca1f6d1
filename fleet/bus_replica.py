"""One `imdswatch serve --bus` replica (contract section 8).

Every replica ingests: `POST /v1/events` appends to the stream (`fleet.bus_log`) and
answers once the stream has stored the batch. Every replica serves the newest checkpoint's
documents (`GET /v1/model`; `GET /v1/policy` joins `DOCUMENTS` the same way). One replica
scores: the one holding the lease (`fleet.lease`). While it holds it, its scoring thread
runs the same core as section 5 (`fleet.core.FleetCore`) on the stream, writes its alerts
and checkpoints through the fenced ledger (`fleet.ledger`, `fleet.bus_checkpoints`), and
stops at the first sign the lease is gone: its own clock, a refused renewal, a refused
write. Taking over, a replica writes its takeover record, loads the newest usable
checkpoint, learns which alerts were written since, and scores from the checkpoint's
position. If the ledger shows nobody wrote since its own last record (it lost the lease to
a bus outage and got it back), it keeps what it holds in memory instead.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats.js.errors

from fleet.alertsink import AlertSink
from fleet.bus import LEDGER_ALERT, TRANSIENT, Bus
from fleet.bus_checkpoints import BusCheckpoints
from fleet.bus_log import JetStreamLog
from fleet.checkpoints import model_etag
from fleet.core import FleetCore
from fleet.dedup import IdWindow
from fleet.ingest import Parsed
from fleet.lease import Lease
from fleet.ledger import ALERT_HEADER, REPLICA_HEADER, Fenced, Ledger, LedgerUnavailable
from fleet.metrics import ServeMetrics
from scoring.endpoints import EndpointCatalog
from scoring.scorer import Scorer
from scoring.state import StateError

log = logging.getLogger("imdswatch.fleet.replica")

DOCUMENT_POLL = 2.0


class LeaseLost(Exception):
    """The lease ran out (by this replica's clock) before a write."""


class BusReplica:
    def __init__(self, bus: Bus, *, replica_id: str, state_path: Path,
                 make_scorer: Callable[[], Scorer], make_sink: Callable[..., AlertSink],
                 metrics: ServeMetrics, observe: Callable[[Any], None], window: float,
                 hold: float, save_interval: float, dedup_ids: int,
                 empty_model: bytes) -> None:
        self.bus = bus
        self.replica_id = replica_id
        self.state_path = state_path
        self.make_scorer = make_scorer
        self.make_sink = make_sink
        self.metrics = metrics
        self.observe = observe
        self.window = window
        self.hold = hold
        self.save_interval = save_interval
        self.dedup_ids = dedup_ids
        self._catalog = make_scorer().catalog
        self.ingest_log = JetStreamLog(bus, IdWindow(2), metrics, self._catalog)
        self.lease = Lease(bus, replica_id)
        self.ledger = Ledger(bus, replica_id)
        self.core: FleetCore | None = None
        self.store: BusCheckpoints | None = None
        self._clean = False  # the core holds a consistent state (stopped between steps)
        self._leading = False
        self._docs_lock = threading.Lock()
        self._docs: dict[str, tuple[str, bytes]] = {"model": (model_etag(empty_model),
                                                              empty_model)}
        self._docs_seq = 0
        self._takeover_seq = 0
        self.ready = True

    # -- the HTTP API's backend ------------------------------------------------------------
    @property
    def catalog(self) -> EndpointCatalog:
        return self._catalog

    def ingest(self, parsed: Parsed) -> tuple[int, int]:
        return self.ingest_log.append(parsed)

    def document(self, name: str) -> tuple[str, bytes] | None:
        core = self.core
        if self._leading and core is not None and name == "model":
            return core.document(name)
        with self._docs_lock:
            return self._docs.get(name)

    @property
    def leading(self) -> bool:
        return self._leading

    @property
    def scorer(self) -> Scorer | None:
        core = self.core
        return core.scorer if core is not None and self._leading else None

    # -- the scoring thread ------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            if not self.lease.wait_held(0.2) or stop.is_set():
                continue
            try:
                self._take_over()
            except (Fenced, LeaseLost, LedgerUnavailable, StateError, *TRANSIENT) as exc:
                failures += 1
                wait = min(10.0, 0.5 * 2 ** failures)
                log.error("taking over failed: %s; giving the lease up, trying again in "
                          "%.0fs", exc or type(exc).__name__, wait)
                self._stop_leading(clean=False)
                self.lease.release()  # another replica may fare better meanwhile
                stop.wait(wait)
                continue
            failures = 0
            self._lead(stop)

    def _take_over(self) -> None:
        rev = self.lease.revision
        if not rev:
            raise LeaseLost("the lease ran out while taking over")
        t0 = time.monotonic()
        same = self.ledger.takeover(rev)
        self._takeover_seq = self.ledger.last
        if same and self._clean and self.core is not None and self.store is not None:
            # Nobody wrote since this replica's last record: its memory is still the truth.
            self.store.lease_rev = rev
            self.core.log.resume(self.core.applied, self._catalog)
            log.info("scoring again from stream position %d (no other replica scored "
                     "meanwhile)", self.core.applied)
        else:
            self._build_core(rev)
        self._leading = True
        self._clean = True
        self.metrics.leader.set(1)
        self.metrics.takeovers.inc()
        log.info("this replica (%s) scores the fleet's events: took over in %.2fs at stream "
                 "position %d", self.replica_id, time.monotonic() - t0,
                 self.core.applied if self.core else 0)

    def _build_core(self, rev: int) -> None:
        old = self.core
        self.core = None
        if old is not None:
            old.alerts.close()
            old.log.close()
        store = BusCheckpoints(self.bus, self.ledger, self.state_path, self.replica_id, rev,
                               self.metrics, self.lease.held)
        sink = self.make_sink(record=self._record, recorded=self._recorded)
        core = FleetCore(self.make_scorer(), JetStreamLog(self.bus, IdWindow(self.dedup_ids),
                                                          self.metrics, self._catalog),
                         store, sink, self.metrics, self.observe, window=self.window,
                         hold=self.hold, save_interval=self.save_interval,
                         source="the bus's newest checkpoint")
        self.store = store
        self.core = core
        core.restore()

    def _recorded(self) -> Iterator[int]:
        """The alerts written since the checkpoint just loaded: the ledger's alert records
        between its record and this replica's takeover record."""
        assert self.store is not None
        after = self.store.loaded.seq if self.store.loaded is not None else 0
        return self.ledger.alert_digests(after, self._takeover_seq)

    def _record(self, line: bytes, digest: int) -> bool:
        if not self.lease.held():
            raise LeaseLost("the lease ran out before an alert was written")
        key = f"{digest:016x}"
        _seq, dup = self.ledger.append(LEDGER_ALERT, line.rstrip(b"\n"), f"alert-{key}",
                                       {ALERT_HEADER: key, REPLICA_HEADER: self.replica_id})
        return not dup

    def _lead(self, stop: threading.Event) -> None:
        core = self.core
        assert core is not None
        next_save = time.monotonic() + self.save_interval
        try:
            while not stop.is_set():
                if not self.lease.held():
                    log.warning("scoring stopped: the lease is no longer held")
                    self._stop_leading(clean=True)
                    return
                core.step(0.05)
                if time.monotonic() >= next_save:
                    if not self.lease.held():
                        continue
                    core.checkpoint()
                    self._publish_docs_from_store()
                    next_save = time.monotonic() + self.save_interval
        except (Fenced, LeaseLost, LedgerUnavailable) as exc:
            log.warning("scoring stopped: %s", exc)
            self._stop_leading(clean=False)
            return

    def _stop_leading(self, clean: bool) -> None:
        if self._leading:
            self.metrics.leader.set(0)
            self.metrics.bus_lag_messages.set(0)
            self.metrics.bus_lag_seconds.set(0)
        self._leading = False
        self._clean = clean and self.core is not None
        if self.core is not None:
            self.core.log.close()  # stop reading the stream (resume reopens it)
        if not self._clean and self.core is not None:
            # Half a step may have been applied: this state must never be used again.
            core, self.core = self.core, None
            core.alerts.close()

    def finish(self) -> None:
        """At a clean stop, after the scoring thread ended: the last checkpoint (while the
        lease still holds), then the lease given up."""
        core = self.core
        if self._leading and core is not None and self.lease.held():
            try:
                core.checkpoint()
            except (Fenced, LeaseLost, LedgerUnavailable) as exc:
                log.warning("no last checkpoint: %s", exc)
        self._stop_leading(clean=True)
        if core is not None:
            core.alerts.close()
            core.log.close()

    # -- documents for followers ----------------------------------------------------------------
    def _publish_docs_from_store(self) -> None:
        store = self.store
        if store is not None and store.last_model is not None and store.kept:
            with self._docs_lock:
                self._docs["model"] = store.last_model
                self._docs_seq = store.kept[0].seq

    def run_documents(self, stop: threading.Event) -> None:
        """Keep the newest checkpoint's model at hand (every replica, for GET /v1/model)."""
        while not stop.is_set():
            if not self._leading:
                try:
                    self._refresh_documents()
                except (nats.js.errors.Error, *TRANSIENT) as exc:
                    log.debug("documents: %s", exc)
            stop.wait(DOCUMENT_POLL)

    def _refresh_documents(self) -> None:
        rec = self.ledger.checkpoint(direct=True)
        if rec is None or rec.seq == self._docs_seq:
            return
        buf = io.BytesIO()
        self.bus.call(self.bus.obs.get(rec.model, writeinto=buf), 60)
        body = buf.getvalue()
        with self._docs_lock:
            self._docs["model"] = (rec.model_etag or model_etag(body), body)
            self._docs_seq = rec.seq
