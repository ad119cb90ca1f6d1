"""Prometheus metrics of the agent (and of a replay, when one is served).

Naming follows Prometheus conventions: every name starts with `imdswatch_`, counters end
in `_total`, units are base units. Label values come from the traced machine (process, user,
namespace, ...), so every metric that carries them holds at most `max_series` series, the
least recently updated evicted first (`exporters.series`): a fork bomb of random process
names can neither explode the Prometheus server nor hide the callers that come after it.
Command lines are never labels: they are unbounded and may carry secrets; they travel only
in the (redacted) alerts NDJSON.

Metric catalog (the alert rules and the Grafana dashboard rely on these names):

- `imdswatch_metadata_connections_total{host,endpoint,process,user,k8s_namespace}`
- `imdswatch_metadata_requests_total{endpoint,class,guarded}` - HTTP requests seen on
  metadata connections, by what they asked for (a class of scoring.endpoints, never the path)
  and whether they carried the anti-SSRF header (`true`, `false`, `unknown`)
- `imdswatch_anomalies_total{detector,severity}` - alerts written
- `imdswatch_anomaly_score{detector,severity,rule,host,process,executable,user,k8s_namespace,
  k8s_pod,entity,reason}` - latest score of each currently anomalous entity; a series
  disappears `anomaly_ttl` seconds after its last update so Prometheus alerts resolve
- `imdswatch_events_seen_total`, `imdswatch_events_skipped_total`,
  `imdswatch_events_malformed_total`
- `imdswatch_model_entities{detector}`, `imdswatch_model_hosts`, `imdswatch_learning`,
  `imdswatch_learning_end_timestamp_seconds` (event time),
  `imdswatch_learning_end_estimate_timestamp_seconds` (wall clock)
- `imdswatch_alerts_held_back_total` - alert lines held back by the alert-line cap
- `imdswatch_events_failed_total`, `imdswatch_log_lines_suppressed_total`
- `imdswatch_build_info{version,python_version,host}`, `imdswatch_probe_info{mode}`,
  `imdswatch_probe_fallback`, `imdswatch_ready`, `imdswatch_request_capture_enabled`,
  `imdswatch_request_capture_nat_enabled`,
  `imdswatch_kernel_identity_enabled`, `imdswatch_kernel_identity_record_enabled`,
  `imdswatch_kernel_segments_dropped_total`
- `imdswatch_kernel_connections_total`, `imdswatch_kernel_events_dropped_total`
- `imdswatch_kernel_connections_by_process_total{process,uid}` - the kernel's per-(comm, uid,
  cgroup) counts summed over cgroups (cgroup ids are too many to be labels); counted before
  the ring buffer, so it equals the connects made even when events are dropped
- `imdswatch_series_evicted_total{metric}` - series dropped to keep a metric under its cap
- `process_*`, `python_*` from prometheus-client's default collectors
"""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporters.httpserver import HealthState, MetricsServer, start_server
from exporters.redact import redact
from exporters.series import BoundedCounter
from scoring.scorer import Outcome, Scorer

# Label values are names and paths; anything longer is noise that bloats every scrape.
MAX_LABEL_LENGTH = 200
MAX_REASON_LENGTH = 400
# Series per metric: a busy node has a few dozen distinct callers; 1000 leaves room for a
# large fleet behind `imdswatch serve` while a scrape stays well under a megabyte.
DEFAULT_MAX_SERIES = 1000

ANOMALY_LABELS = ("detector", "severity", "rule", "host", "process", "executable", "user",
                  "k8s_namespace", "k8s_pod", "entity", "reason")


def _version() -> str:
    try:
        return metadata.version("imdswatch")
    except metadata.PackageNotFoundError:
        return "unknown"


def _text(value: Any, limit: int = MAX_LABEL_LENGTH) -> str:
    if value is None:
        return ""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Anomaly:
    labels: tuple[str, ...]
    score: float
    updated: float


class AnomalyScoreCollector(Collector):
    """`imdswatch_anomaly_score`: one series per currently anomalous entity.

    A plain Gauge would keep the last score forever, so a Prometheus alert on it would never
    resolve. Here every series carries its wall-clock update time and vanishes `ttl` seconds
    later (evaluated at scrape time); Prometheus then marks it stale and the alert resolves.
    At most `max_series` entities are kept; the least recently updated one makes room.
    """

    def __init__(self, ttl: float, max_series: int, on_evict: Callable[[], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.max_series = max_series
        self._on_evict = on_evict
        self._clock = clock
        self._entries: dict[tuple[str, str, str], _Anomaly] = {}
        self._lock = threading.Lock()

    def update(self, key: tuple[str, str, str], labels: tuple[str, ...], score: float,
               keep_labels: bool) -> None:
        """Record `score` for `key`. With `keep_labels` an existing series keeps its label
        set (only its value and age change), so a repeated anomaly does not churn series."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            # The dict is kept in update order (an update moves its entry to the end), so
            # the least recently updated entry is the first: expiry and eviction cost
            # O(1) per anomaly, not a scan of every series (a name flood made each
            # anomaly scan max_series entries twice).
            entry = self._entries.pop(key, None)
            if entry is None and len(self._entries) >= self.max_series:
                del self._entries[next(iter(self._entries))]
                self._on_evict()
            # A wall clock stepped back must not break the order the dict relies on.
            last = next(reversed(self._entries.values()), None)
            stamp = now if last is None else max(now, last.updated)
            if entry is None:
                entry = _Anomaly(labels, score, stamp)
            else:
                entry.score = score
                entry.updated = stamp
                if not keep_labels:
                    entry.labels = labels
            self._entries[key] = entry

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key = next(iter(entries))
            if now - entries[key].updated <= self.ttl:
                break  # oldest first: the rest are younger
            del entries[key]

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "imdswatch_anomaly_score",
            "Latest anomaly score (0-100) of each currently anomalous entity; a series "
            "expires when the entity has not been anomalous for the anomaly TTL.",
            labels=ANOMALY_LABELS,
        )
        with self._lock:
            self._expire(self._clock())
            rows = [(e.labels, e.score) for e in self._entries.values()]
        for labels, score in rows:
            family.add_metric(list(labels), score)
        yield family

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry would call collect() at registration time.
        yield GaugeMetricFamily("imdswatch_anomaly_score", "", labels=ANOMALY_LABELS)


class MetricsExporter:
    """Turns scorer Outcomes and agent state into Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 max_series: int | None = None, anomaly_ttl: float = 900.0, *,
                 host: str | None = None, clock: Callable[[], float] = time.time) -> None:
        max_series = max_series or DEFAULT_MAX_SERIES
        # `*_created` series double the series count of every counter and no rule or panel
        # here reads them; the switch is process-wide, which is what the agent wants anyway.
        disable_created_metrics()
        if registry is None:
            # A private registry (not prometheus_client's global one) so that several
            # exporters can coexist in one process (tests, replay + serve), with the
            # agent's own process/GC/platform metrics added explicitly.
            registry = CollectorRegistry()
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.registry = registry
        self.health = HealthState()
        # In a pod the hostname is the pod's name; the DaemonSet passes the node's as NODE_NAME.
        self.host = host or os.environ.get("NODE_NAME") or socket.gethostname()
        r = registry

        self.max_series = max_series
        self._evicted = Counter(
            "imdswatch_series_evicted", "Series dropped (least recently updated first) to keep "
            "a metric under its cap of series; a steady rate means more distinct callers than "
            "the cap.", ["metric"], registry=r)

        def evicted(metric: str, n: int) -> None:
            self._evicted.labels(metric=metric).inc(n)

        self._connections = BoundedCounter(
            "imdswatch_metadata_connections",
            "Connections to a cloud metadata endpoint, by endpoint and calling process.",
            ("host", "endpoint", "process", "user", "k8s_namespace"), max_series, evicted)
        r.register(self._connections)
        # Bounded by construction: endpoints come from the catalog, classes and guarded
        # from fixed sets.
        self._requests = Counter(
            "imdswatch_metadata_requests",
            "HTTP requests to a cloud metadata endpoint, by endpoint, class of what was asked "
            "and presence of the anti-SSRF header.",
            ["endpoint", "class", "guarded"], registry=r)
        self._anomalies = Counter(
            "imdswatch_anomalies", "Anomaly alerts written, by detector and severity.",
            ["detector", "severity"], registry=r)
        self._seen = Counter("imdswatch_events_seen", "Events read (scored or skipped).",
                             registry=r)
        self._skipped = Counter(
            "imdswatch_events_skipped",
            "Events skipped because their destination is not a metadata endpoint.", registry=r)
        self._malformed = Counter(
            "imdswatch_events_malformed", "Input lines or records that were not usable events.",
            registry=r)
        self._model_entities = Gauge(
            "imdswatch_model_entities", "Entities tracked by the rarity model, per detector.",
            ["detector"], registry=r)
        self._model_hosts = Gauge("imdswatch_model_hosts",
                                  "Hosts seen by the rarity model.", registry=r)
        self._learning = Gauge(
            "imdswatch_learning", "1 while the model is in its learning period (no alerts).",
            registry=r)
        self._learning_end = Gauge(
            "imdswatch_learning_end_timestamp_seconds",
            "Event time (Unix seconds) at which the learning period ends; NaN until the first "
            "metadata call starts it.", registry=r)
        self._learning_end_wall = Gauge(
            "imdswatch_learning_end_estimate_timestamp_seconds",
            "Wall-clock estimate (Unix seconds) of the end of the learning period.", registry=r)
        self._learning_end.set(float("nan"))
        self._learning_end_wall.set(float("nan"))
        self._held_back = Counter(
            "imdswatch_alerts_held_back",
            "Alert lines not written because the alert-line cap was reached (the anomalies "
            "are still in imdswatch_anomalies_total and imdswatch_anomaly_score).", registry=r)
        self._failed = Counter(
            "imdswatch_events_failed",
            "Events whose scoring raised an error (logged, rate-limited, and skipped).",
            registry=r)
        self._log_suppressed = Counter(
            "imdswatch_log_lines_suppressed",
            "Log lines dropped by the log rate limit (reported in summary lines).", registry=r)
        self._log_suppressed_last = 0
        self._build = Info("imdswatch_build", "Version of the running imdswatch.", registry=r)
        self._build.info({"version": _version(), "python_version": platform.python_version(),
                          "host": self.host})
        self._probe = Info("imdswatch_probe", "Kernel probe attachment in use.", registry=r)
        self._probe_fallback = Gauge(
            "imdswatch_probe_fallback",
            "1 when the agent fell back from the preferred probe to a less precise one.",
            registry=r)
        self._ready = Gauge("imdswatch_ready", "1 once the kernel probe is attached.",
                            registry=r)
        self._request_capture = Gauge(
            "imdswatch_request_capture_enabled",
            "1 when HTTP requests on metadata connections are read (cgroup_skb egress); 0 when "
            "the kernel refused it and connections are reported without their requests.",
            registry=r)
        self._request_capture_nat = Gauge(
            "imdswatch_request_capture_nat_enabled",
            "1 when request capture also follows connections sent to a metadata address only "
            "by NAT (a DNAT rule); 0 when it does not (the kernel refuses task helpers in "
            "cgroup_skb programs: only connections made to a metadata address are followed) "
            "or request capture is off.", registry=r)
        self._kernel_identity = Gauge(
            "imdswatch_kernel_identity_enabled",
            "1 when the probe reads the process's leader name and executable in the kernel; 0 "
            "when the kernel has no BTF or refused those reads (names and executables then "
            "come from /proc only).", registry=r)
        self._identity_record = Gauge(
            "imdswatch_kernel_identity_record_enabled",
            "1 when the kernel keeps each process's identity record (executable path, command "
            "line, parent, start; written at exec and fork) and copies it into every event; 0 "
            "when it cannot (no BTF, or the kernel refused the programs): those fields then "
            "come from /proc only, and are missing for processes that exit first.",
            registry=r)
        self._segments_dropped = Counter(
            "imdswatch_kernel_segments_dropped",
            "Request-capture records lost in the kernel because the buffer was full.",
            registry=r)
        self._segments_dropped_last = 0
        self._kernel_connections = Counter(
            "imdswatch_kernel_connections",
            "Metadata connections counted in the kernel (includes those later dropped).",
            registry=r)
        self._kernel_dropped = Counter(
            "imdswatch_kernel_events_dropped",
            "Events lost in the kernel because the ring buffer was full.", registry=r)
        self._kernel_last = {"connections": 0, "dropped": 0}
        self._kernel_by_process = BoundedCounter(
            "imdswatch_kernel_connections_by_process",
            "Metadata connections counted in the kernel, by process name (comm) and real uid; "
            "includes those whose events were dropped.", ("process", "uid"), max_series,
            evicted)
        r.register(self._kernel_by_process)
        self._kernel_keys_last: dict[tuple[str, int, int], int] = {}

        self.anomaly_scores = AnomalyScoreCollector(
            anomaly_ttl, max_series,
            on_evict=lambda: evicted("imdswatch_anomaly_score", 1), clock=clock)
        r.register(self.anomaly_scores)

    # -- events -------------------------------------------------------------------------

    def observe(self, outcome: Outcome) -> None:
        """Count one scored metadata connection and, if it alerts, the anomaly."""
        event = outcome.event
        self._seen.inc()
        endpoint = outcome.endpoint.id
        self._connections.inc((
            _text(event.host or self.host), _text(endpoint), _text(event.name),
            _text(event.user if event.user is not None else event.uid),
            _text(event.namespace)))
        if event.is_request:
            guarded = event.guarded
            self._requests.labels(
                endpoint=_text(endpoint), **{"class": outcome.request_class},
                guarded="unknown" if guarded is None else str(bool(guarded)).lower(),
            ).inc()
        alerting = outcome.alert
        if alerting:
            self._anomalies.labels(detector=_text(outcome.detector),
                                   severity=_text(outcome.severity)).inc()
        # A suppressed outcome would have alerted: it keeps the entity's series alive (and
        # the Prometheus alert firing) for as long as the anomaly goes on.
        if alerting or outcome.suppressed:
            self._update_anomaly(outcome, keep_labels=not alerting)

    def _update_anomaly(self, outcome: Outcome, keep_labels: bool) -> None:
        event = outcome.event
        host = _text(event.host or self.host)
        # Redacted before truncation: a cut must not leave the first half of a secret.
        entity = _text(redact(outcome.entity or ""))
        labels = (
            _text(outcome.detector), _text(outcome.severity), _text(outcome.rule_name), host,
            _text(redact(event.name or "")), _text(redact(event.exe or "")),
            _text(event.user or event.uid), _text(event.namespace), _text(event.pod), entity,
            _text(redact(outcome.reason or ""), MAX_REASON_LENGTH),
        )
        key = (labels[0], entity, host)
        self.anomaly_scores.update(key, labels, round(float(outcome.score), 1), keep_labels)

    def observe_skipped(self, n: int = 1) -> None:
        self._seen.inc(n)
        self._skipped.inc(n)

    def observe_malformed(self, n: int = 1) -> None:
        self._malformed.inc(n)

    # -- agent state --------------------------------------------------------------------

    def update_model(self, scorer: Scorer) -> None:
        """Copy model size and learning state from the scorer (call after a batch)."""
        for detector, size in scorer.model_size().items():
            self._model_entities.labels(detector=detector).set(size)
        self._learning.set(1 if scorer.learning else 0)
        self._model_hosts.set(scorer.hosts_seen)

    def set_learning_end(self, event_ts: float | None, wall_ts: float | None) -> None:
        self._learning_end.set(float("nan") if event_ts is None else event_ts)
        self._learning_end_wall.set(float("nan") if wall_ts is None else wall_ts)

    def observe_held_back(self, n: int = 1) -> None:
        self._held_back.inc(n)

    def observe_failed(self, n: int = 1) -> None:
        self._failed.inc(n)

    def set_log_suppressed(self, total: int) -> None:
        """Advance the counter to `total`, the log rate limit's running count."""
        if total > self._log_suppressed_last:
            self._log_suppressed.inc(total - self._log_suppressed_last)
            self._log_suppressed_last = total

    def set_probe(self, mode: str, fallback: bool) -> None:
        """Record the attached probe; an attached probe makes the agent ready."""
        self._probe.info({"mode": mode})
        self._probe_fallback.set(1 if fallback else 0)
        self.set_ready(True, f"probe {mode} attached")

    def set_request_capture(self, enabled: bool, segments_dropped: int | None = None,
                            follows_nat: bool | None = None) -> None:
        """Whether request capture runs (and whether it follows NAT'ed connections), and
        the kernel's running total of its lost records."""
        self._request_capture.set(1 if enabled else 0)
        if follows_nat is not None:
            self._request_capture_nat.set(1 if enabled and follows_nat else 0)
        if segments_dropped is not None and segments_dropped > self._segments_dropped_last:
            self._segments_dropped.inc(segments_dropped - self._segments_dropped_last)
            self._segments_dropped_last = segments_dropped

    def set_kernel_identity(self, enabled: bool, record: bool = False) -> None:
        self._kernel_identity.set(1 if enabled else 0)
        self._identity_record.set(1 if record else 0)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.health.set_ready(ready, reason)
        self._ready.set(1 if ready else 0)

    def set_kernel_counts(self, connections_total: int, dropped_total: int) -> None:
        """Advance the kernel counters to the absolute totals read from the BPF maps.

        A total smaller than the last one means the maps were recreated (probe re-attached):
        the new total then counts entirely, as Prometheus' own counter-reset handling would.
        """
        for name, total, counter in (
            ("connections", connections_total, self._kernel_connections),
            ("dropped", dropped_total, self._kernel_dropped),
        ):
            last = self._kernel_last[name]
            delta = total - last if total >= last else total
            if delta > 0:
                counter.inc(delta)
            self._kernel_last[name] = total

    def set_kernel_connection_counts(self, counts: Mapping[tuple[str, int, int], int]) -> None:
        """Advance `imdswatch_kernel_connections_by_process_total` to a snapshot of the
        kernel's `conn_counts` map: {(comm, uid, cgroup id): total} (Tracer.connection_counts).

        Deltas are taken per map key, then summed per (process, uid) label pair. A key whose
        total went down, or that is new, counts in full (maps recreated); keys gone from the
        snapshot are forgotten, so memory is bounded by the map's size.
        """
        last = self._kernel_keys_last
        deltas: dict[tuple[str, str], int] = {}
        for key, total in counts.items():
            before = last.get(key, 0)
            delta = total - before if total >= before else total
            if delta > 0:
                comm, uid, _cgroup = key
                labels = (_text(comm), _text(uid))
                deltas[labels] = deltas.get(labels, 0) + delta
        self._kernel_keys_last = dict(counts)
        for labels, delta in deltas.items():
            self._kernel_by_process.inc(labels, delta)

    # -- serving ------------------------------------------------------------------------

    def serve(self, address: str) -> MetricsServer:
        """Serve `/metrics`, `/healthz` and `/readyz` on `HOST:PORT` from a daemon thread."""
        return start_server(address, self.registry, self.health)
