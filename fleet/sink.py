"""The agent's side of fleet mode (`imdswatch run --fleet URL --spool DIR`).

Every metadata event is spooled for the fleet scorer, which scores it with the whole
fleet's history and alerts. While the fleet scorer is unreachable (a send or model fetch
failed and none has succeeded since) the agent scores each new event itself against its
copy of the fleet model and alerts with `scored_by: agent`, so detection never stops.

One alert per event: an event that alerted locally is spooled with
`imdswatch.agent_alerted: true`, and the fleet scorer learns it without alerting again.
Locally scored events that did not alert are spooled unmarked: the fleet, seeing more
history, may still alert on them (once) when they are delivered. Events captured in the
second before an outage is noticed were not scored locally; the fleet scores them when
it is back.

Threads: the agent's loop calls `handle` and `housekeeping` (it owns the scorer: a fetched
model is applied there); a sender posts sealed spool segments with exponential backoff and
jitter; a fetcher refreshes the fleet model every `model_interval` seconds (ETag: an
unchanged model costs one small request).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import orjson

from exporters.metrics import MetricsExporter
from fleet.client import FleetClient, FleetRejected, FleetUnavailable
from fleet.ingest import AGENT_ALERTED
from fleet.metrics import AgentFleetMetrics
from fleet.spool import DEFAULT_MAX_BYTES, Spool, SpoolError
from fleet.token_file import read_token
from scoring.events import Event
from scoring.scorer import Outcome, Scorer
from scoring.state import StateError, load_state_dict

log = logging.getLogger("imdswatch.fleet.agent")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 60.0
MODEL_INTERVAL = 300.0
START_FETCH_TIMEOUT = 5.0


@dataclass
class FleetOptions:
    url: str
    spool: str
    token_file: str | None = None
    ca_file: str | None = None
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    model_interval: float = MODEL_INTERVAL


class FleetSink:
    def __init__(self, opts: FleetOptions, scorer: Scorer, exporter: MetricsExporter) -> None:
        token = read_token(opts.token_file, "--fleet-token-file") if opts.token_file else None
        self.client = FleetClient(opts.url, token, opts.ca_file)
        self.model_client = FleetClient(opts.url, token, opts.ca_file)
        self.spool = Spool(opts.spool, opts.spool_max_bytes)
        self.opts = opts
        self.scorer = scorer
        self.exporter = exporter
        self.metrics = AgentFleetMetrics(exporter.registry)
        self.local = True  # until the fleet scorer has answered once
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._model: dict | None = None
        self._model_lock = threading.Lock()
        self._etag: str | None = None
        self._model_at: float | None = None
        self._dropped_seen = 0
        self._not_ready = False

    # -- start/stop -------------------------------------------------------------------------
    def start(self) -> None:
        """Open the spool (RuntimeError when unusable), fetch the fleet model once and apply
        it, start the sender and the fetcher."""
        try:
            self.spool.open()
        except SpoolError as exc:
            raise RuntimeError(str(exc)) from None
        self.model_client.timeout = START_FETCH_TIMEOUT
        self._fetch()
        self.model_client.timeout = self.client.timeout
        self._apply_model()
        if self.local:
            log.warning("fleet scorer %s unreachable at start: alerting locally until it "
                        "answers", self.opts.url)
        for name, target in (("imdswatch-fleet-send", self._send_loop),
                             ("imdswatch-fleet-model", self._model_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.housekeeping()

    def close(self, timeout: float = 3.0) -> None:
        """Seal what is spooled, give the sender a moment to deliver it, stop."""
        self.spool.close()
        deadline = time.monotonic() + timeout
        while not self.local and self.spool.backlog()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self.spool.close()
        for t in self._threads:
            t.join(timeout=2)
        self.client.close()
        self.model_client.close()
        self._update_metrics()

    # -- the agent thread -------------------------------------------------------------------
    def handle(self, event: Event) -> Outcome | None:
        """Spool one event; score it here only while the fleet scorer is away."""
        endpoint = self.scorer.catalog.match(event.dst_ip, event.dst_port)
        if endpoint is None:
            return None
        doc = event.doc if event.doc is not None else {}
        if self.local:
            out = self.scorer.process(event)  # the one way into the model
            if out is not None and out.alert:
                own = doc.setdefault("imdswatch", {})
                if isinstance(own, dict):
                    own[AGENT_ALERTED] = True
        else:
            out = Outcome(event, endpoint)  # counted in the metrics, scored by the fleet
        self.spool.append(orjson.dumps(doc))
        if self.spool.due():
            self.spool.seal()
        return out

    def housekeeping(self) -> None:
        if self.spool.due():
            self.spool.seal()
        self._apply_model()
        self._update_metrics()
        health = self.exporter.health
        if not self.spool.writable():
            if health.ready or not self._not_ready:
                self.exporter.set_ready(False, f"spool {self.spool.dir} not writable")
                self._not_ready = True
        elif self._not_ready:
            self._not_ready = False
            self.exporter.set_ready(True, "probe attached, spool writable")

    def _apply_model(self) -> None:
        with self._model_lock:
            state, self._model = self._model, None
        if state is None:
            return
        try:
            load_state_dict(self.scorer, state, "fleet model")
        except StateError as exc:
            log.error("%s; keeping the current model", exc)
            return
        log.info("fleet model applied: %d events learned from %d hosts",
                 self.scorer.events_learned, self.scorer.hosts_seen)

    def _update_metrics(self) -> None:
        m = self.metrics
        events, size = self.spool.backlog()
        m.spool_events.set(events)
        m.spool_bytes.set(size)
        dropped = self.spool.dropped
        if dropped > self._dropped_seen:
            m.dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped
        m.local.set(1 if self.local else 0)
        if self._model_at is not None:
            m.model_age.set(time.monotonic() - self._model_at)

    def _set_local(self, local: bool, why: str = "") -> None:
        if local and not self.local:
            log.warning("fleet scorer unreachable (%s): alerting locally against the last "
                        "fleet model", why)
        elif not local and self.local:
            log.info("fleet scorer reachable: it scores and alerts again")
        self.local = local

    # -- background threads -----------------------------------------------------------------
    def _send_loop(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            got = self.spool.oldest(0.5)
            if got is None:
                continue
            seg, data = got
            try:
                self.client.send(data)
            except FleetUnavailable as exc:
                self.spool.release()
                self.metrics.errors.labels(reason=exc.reason).inc()
                self._set_local(True, str(exc))
                # Jitter spreads a thousand agents' retries after an outage.
                delay = exc.retry_after if exc.retry_after is not None else backoff
                self._stop.wait(delay * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            except FleetRejected as exc:
                self.metrics.errors.labels(reason=f"http_{exc.status}").inc()
                if exc.status in (401, 403):
                    # A configuration error: keep the events, keep alerting locally.
                    self.spool.release()
                    self._set_local(True, str(exc))
                    log.error("%s: check --fleet-token-file", exc)
                    self._stop.wait(backoff * random.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                log.error("%s; dropping %d events of %s", exc, seg.events, seg.path.name)
                self.spool.done(seg, delivered=False)
                continue
            self.spool.done(seg)
            self.metrics.sent.inc(seg.events)
            self._set_local(False)
            backoff = BACKOFF_MIN

    def _fetch(self) -> bool:
        try:
            etag, state = self.model_client.fetch_model(self._etag)
        except (FleetUnavailable, FleetRejected) as exc:
            self._set_local(True, str(exc))
            if isinstance(exc, FleetUnavailable):
                self.metrics.errors.labels(reason=exc.reason).inc()
            return False
        self._model_at = time.monotonic()
        if state is not None:
            with self._model_lock:
                self._model = state
            self._etag = etag
        self._set_local(False)
        return True

    def _model_loop(self) -> None:
        interval = self.opts.model_interval
        while not self._stop.wait(interval * random.uniform(0.8, 1.2)):
            self._fetch()
