"""Prometheus metrics of the fleet transport, registered beside the exporter's own
(`exporters.metrics.MetricsExporter.registry`), so serve and agents keep one /metrics.

Fleet scorer (`imdswatch serve`):
- `imdswatch_ingest_requests_total{code}` - ingest and model requests by HTTP status
- `imdswatch_ingest_events_total{result}` - accepted, duplicate, malformed, skipped
- `imdswatch_ingest_queue_events` - events acknowledged and waiting for the scorer
- `imdswatch_fleet_events_scored_total` - events scored by the fleet model (serve's
  `imdswatch_metadata_connections_total` and `imdswatch_events_seen_total` count only
  anomalous events: the per-process connection counts come from the agents)
- `imdswatch_fleet_wal_bytes` - write-ahead log on disk
- `imdswatch_fleet_late_events_total` - scored out of time order (later than the window)
- `imdswatch_fleet_agent_alerted_total` - alerts the fleet did not repeat because the
  agent had already raised them while the fleet scorer was away
- `imdswatch_fleet_checkpoint_seconds`, `imdswatch_fleet_checkpoint_timestamp_seconds`
- `imdswatch_fleet_leader` - 1 on the replica that scores (always, without --bus), 0 on the
  others
- With `--bus` (contract section 8), per replica:
  - `imdswatch_fleet_bus_connected` - 1 while connected to the bus
  - `imdswatch_fleet_bus_lag_messages` - stream messages not yet read by the scoring
    replica (0 on the others); `imdswatch_fleet_bus_lag_seconds` - while some are, how old
    the last one read is
  - `imdswatch_fleet_bus_skipped_messages_total{reason}` - stream messages skipped:
    `foreign` (not an imdswatch batch), `corrupt` (unreadable lines), `missing` (deleted
    before they were scored)
  - `imdswatch_fleet_takeovers_total` - times this replica started scoring
  - `imdswatch_fleet_checkpoint_fallbacks_total` - unusable checkpoints passed over

Agent in fleet mode (`imdswatch run --fleet`):
- `imdswatch_fleet_spool_events`, `imdswatch_fleet_spool_bytes` - backlog not yet acknowledged
- `imdswatch_fleet_spool_dropped_total` - events dropped from a full spool (oldest first)
- `imdswatch_fleet_sent_total` - events acknowledged by the fleet scorer
- `imdswatch_fleet_send_errors_total{reason}` - failed sends (unreachable, http_5xx, ...)
- `imdswatch_fleet_scoring_locally` - 1 while the fleet scorer is unreachable and the agent
  alerts from its own copy of the fleet model
- `imdswatch_fleet_model_age_seconds` - since the fleet model was last fetched (-1: never)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.policy_refused = Counter(
            "imdswatch_fleet_policy_refused",
            "Changes of serve's --policy file refused (the last good policy stays published).",
            registry=r)
        self.requests = Counter("imdswatch_ingest_requests",
                                "Requests to the fleet scorer's API, by HTTP status.",
                                ["code"], registry=r)
        self.events = Counter("imdswatch_ingest_events",
                              "Events received by the fleet scorer, by result.",
                              ["result"], registry=r)
        self.scored = Counter("imdswatch_fleet_events_scored",
                              "Events scored by the fleet model.", registry=r)
        self.queue = Gauge("imdswatch_ingest_queue_events",
                           "Events acknowledged and waiting for the scorer.", registry=r)
        self.wal_bytes = Gauge("imdswatch_fleet_wal_bytes",
                               "Size of the fleet scorer's write-ahead log.", registry=r)
        self.late = Counter("imdswatch_fleet_late_events",
                            "Events that arrived after later events were already scored "
                            "(scored at once, out of time order).", registry=r)
        self.agent_alerted = Counter(
            "imdswatch_fleet_agent_alerted",
            "Alerts not repeated because the agent raised them while scoring locally.",
            registry=r)
        self.checkpoint_seconds = Gauge("imdswatch_fleet_checkpoint_seconds",
                                        "Duration of the last state checkpoint.", registry=r)
        self.checkpoint_time = Gauge("imdswatch_fleet_checkpoint_timestamp_seconds",
                                     "Unix time of the last state checkpoint.", registry=r)
        self.leader = Gauge("imdswatch_fleet_leader",
                            "1 on the replica that scores the fleet's events, 0 on the others.",
                            registry=r)
        self.bus_connected = Gauge("imdswatch_fleet_bus_connected",
                                   "1 while this replica is connected to the bus (--bus).",
                                   registry=r)
        self.bus_lag_messages = Gauge("imdswatch_fleet_bus_lag_messages",
                                      "Stream messages the scoring replica has not read yet.",
                                      registry=r)
        self.bus_lag_seconds = Gauge("imdswatch_fleet_bus_lag_seconds",
                                     "While the scoring replica is behind the stream: age of "
                                     "the last message it read.", registry=r)
        self.bus_skipped = Counter("imdswatch_fleet_bus_skipped_messages",
                                   "Stream messages skipped: foreign, corrupt, missing.",
                                   ["reason"], registry=r)
        self.takeovers = Counter("imdswatch_fleet_takeovers",
                                 "Times this replica started scoring.", registry=r)
        self.checkpoint_fallbacks = Counter(
            "imdswatch_fleet_checkpoint_fallbacks",
            "Checkpoints found unusable at a takeover (the one before was used).", registry=r)
        for reason in ("foreign", "corrupt", "missing"):
            self.bus_skipped.labels(reason=reason)
        for code in ("200", "401", "413", "503"):
            self.requests.labels(code=code)
        for result in ("accepted", "duplicate", "malformed", "skipped"):
            self.events.labels(result=result)


class AgentFleetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.spool_events = Gauge("imdswatch_fleet_spool_events",
                                  "Events in the spool, not yet acknowledged by the fleet "
                                  "scorer.", registry=r)
        self.spool_bytes = Gauge("imdswatch_fleet_spool_bytes", "Size of the spool.",
                                 registry=r)
        self.dropped = Counter("imdswatch_fleet_spool_dropped",
                               "Events dropped, oldest first, because the spool was full.",
                               registry=r)
        self.sent = Counter("imdswatch_fleet_sent",
                            "Events acknowledged by the fleet scorer.", registry=r)
        self.errors = Counter("imdswatch_fleet_send_errors",
                              "Failed sends to the fleet scorer, by reason.", ["reason"],
                              registry=r)
        self.local = Gauge("imdswatch_fleet_scoring_locally",
                           "1 while the fleet scorer is unreachable and this agent alerts "
                           "from its copy of the fleet model.", registry=r)
        self.model_age = Gauge("imdswatch_fleet_model_age_seconds",
                               "Seconds since the fleet model was last fetched (-1: never).",
                               registry=r)
        self.model_age.set(-1)
