# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Prometheus metrics: names, capped labels, expiring anomaly series, HTTP endpoints."""

import re
import urllib.error
import urllib.request

import pytest
from helpers.imdsw_scenario import baseline_events
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporters.metrics import MetricsExporter
from intake.parser import event_from_ecs
from scoring.endpoints import BUILTIN_ENDPOINTS
from scoring.scorer import Outcome, Scorer
from scoring.settings import ScorerSettings

SECRET_CMD = 'curl -H "X-aws-ec2-metadata-token: AQAEsecret" http://169.254.169.254/'


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def outcome(name="curl", user="www-data", host="node-1", alert=False, suppressed=False,
            score=10.0, detector="rare_process", entity=None, namespace="web", pod="web-1",
            reason=None) -> Outcome:
    doc = {
        "@timestamp": 1714564800, "destination": {"ip": "169.254.169.254", "port": 80},
        "process": {"name": name, "executable": f"/usr/bin/{name}", "command_line": SECRET_CMD},
        "user": {"name": user}, "host": {"name": host},
        "orchestrator": {"namespace": namespace, "resource": {"name": pod}},
    }
    out = Outcome(event_from_ecs(doc), BUILTIN_ENDPOINTS[0])  # a real one; severity follows
    out.score, out.detector, out.entity = score, detector, entity or name
    out.rule_name = "Unusual Linux Process Calling the Metadata Service"
    out.reason = reason or f"{name} is rare"
    out.scores = {detector: score}
    out.alert, out.suppressed = alert, suppressed
    return out


def samples(exporter: MetricsExporter) -> list:
    text = generate_latest(exporter.registry).decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(exporter, name, **labels) -> float | None:
    for s in samples(exporter):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def exporter(clock) -> MetricsExporter:
    return MetricsExporter(CollectorRegistry(), max_series=5, anomaly_ttl=900,
                           host="node-1", clock=clock)


def test_connections_and_anomalies_are_counted(exporter) -> None:
    exporter.observe(outcome())
    exporter.observe(outcome())
    exporter.observe(outcome(name="wget", alert=True, score=91.0))
    assert value(exporter, "imdswatch_metadata_connections_total", process="curl",
                 endpoint="imds", user="www-data", host="node-1", k8s_namespace="web") == 2
    assert value(exporter, "imdswatch_anomalies_total", detector="rare_process",
                 severity="critical") == 1
    assert value(exporter, "imdswatch_events_seen_total") == 3
    exporter.observe_skipped(4)
    exporter.observe_malformed()
    assert value(exporter, "imdswatch_events_seen_total") == 7
    assert value(exporter, "imdswatch_events_skipped_total") == 4
    assert value(exporter, "imdswatch_events_malformed_total") == 1


def test_naming_conventions(exporter) -> None:
    exporter.observe(outcome(alert=True, score=80))
    exporter.set_probe("fentry", fallback=False)
    exporter.set_kernel_counts(5, 1)
    names = {s.name for s in samples(exporter)}
    ours = {n for n in names if n.startswith("imdswatch_")}
    assert {"imdswatch_metadata_connections_total", "imdswatch_anomalies_total",
            "imdswatch_anomaly_score", "imdswatch_build_info", "imdswatch_probe_info",
            "imdswatch_kernel_events_dropped_total", "imdswatch_kernel_connections_total",
            "imdswatch_learning", "imdswatch_probe_fallback"} <= ours
    for name in ours:
        assert re.fullmatch(r"imdswatch_[a-z0-9_]+", name), name
    text = generate_latest(exporter.registry).decode()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    for name, kind in types.items():
        if name.startswith("imdswatch_"):
            # Counters and only counters end in _total; gauges carry no unit suffix that lies.
            assert (kind == "counter") == name.endswith("_total"), (name, kind)


def test_process_name_flood_keeps_newcomers_visible(exporter) -> None:
    for i in range(50):
        exporter.observe(outcome(name=f"rand{i}", user=f"u{i}"))
    procs = {s.labels["process"] for s in samples(exporter)
             if s.name == "imdswatch_metadata_connections_total"}
    # The five most recently updated series, not the first five forever.
    assert procs == {f"rand{i}" for i in range(45, 50)}
    assert value(exporter, "imdswatch_series_evicted_total",
                 metric="imdswatch_metadata_connections") == 45
    # A caller that comes after the flood is visible at once.
    exporter.observe(outcome(name="late-attacker"))
    assert value(exporter, "imdswatch_metadata_connections_total",
                 process="late-attacker") == 1
    # An active series is refreshed by its updates and survives newcomers.
    exporter.observe(outcome(name="rand49", user="u49"))
    for i in range(3):
        exporter.observe(outcome(name=f"new{i}"))
    assert value(exporter, "imdswatch_metadata_connections_total", process="rand49") == 2


def test_series_are_bounded_per_metric_not_per_label() -> None:
    # 200 names x 200 uids: a per-label cap of 200 would still allow 40,000 series.
    exporter = MetricsExporter(CollectorRegistry(), max_series=200, host="n")
    for name in range(200):
        for user in range(0, 200, 7):
            exporter.observe(outcome(name=f"p{name}", user=f"u{user}"))
    series = [s for s in samples(exporter) if s.name == "imdswatch_metadata_connections_total"]
    assert len(series) == 200
    text = generate_latest(exporter.registry)
    assert len(text) < 200_000


def test_anomaly_gauge_expires_after_ttl(exporter, clock) -> None:
    exporter.observe(outcome(name="wget", alert=True, score=91.23))
    assert value(exporter, "imdswatch_anomaly_score", process="wget", entity="wget") == 91.2
    clock.now += 600
    # A suppressed repeat keeps the series alive and keeps its label set.
    exporter.observe(outcome(name="wget", suppressed=True, score=95.0, reason="changed"))
    clock.now += 600
    s = [s for s in samples(exporter) if s.name == "imdswatch_anomaly_score"]
    assert len(s) == 1 and s[0].value == 95.0 and s[0].labels["reason"] == "wget is rare"
    clock.now += 301
    assert value(exporter, "imdswatch_anomaly_score") is None
    # A non-alerting, non-suppressed outcome never creates a series.
    exporter.observe(outcome(name="curl", score=30))
    assert value(exporter, "imdswatch_anomaly_score") is None


def test_anomaly_series_are_bounded(exporter, clock) -> None:
    for i in range(8):
        clock.now += 1
        exporter.observe(outcome(name=f"p{i}", alert=True, score=60 + i))
    entities = {s.labels["entity"] for s in samples(exporter)
                if s.name == "imdswatch_anomaly_score"}
    assert entities == {"p3", "p4", "p5", "p6", "p7"}  # the least recently updated made room
    assert value(exporter, "imdswatch_series_evicted_total",
                 metric="imdswatch_anomaly_score") == 3


def test_a_repeated_anomaly_is_recently_used(exporter, clock) -> None:
    for i in range(5):
        clock.now += 1
        exporter.observe(outcome(name=f"p{i}", alert=True, score=60 + i))
    clock.now += 1
    exporter.observe(outcome(name="p0", suppressed=True, score=70))  # p0 again: newest now
    clock.now += 1
    exporter.observe(outcome(name="p5", alert=True, score=65))
    entities = {s.labels["entity"] for s in samples(exporter)
                if s.name == "imdswatch_anomaly_score"}
    assert entities == {"p0", "p2", "p3", "p4", "p5"}
    # Expiry follows the last update, not the first.
    clock.now += 898.5  # p2-p4 (updated at 3-5) past the TTL; p0 (6) and p5 (7) not
    assert {s.labels["entity"] for s in samples(exporter)
            if s.name == "imdswatch_anomaly_score"} == {"p0", "p5"}


def test_command_lines_never_become_labels(exporter) -> None:
    exporter.observe(outcome(alert=True, score=99,
                             reason='curl ran with -H "X-aws-ec2-metadata-token: AQAEsecret"'))
    text = generate_latest(exporter.registry).decode()
    assert "AQAEsecret" not in text
    assert "169.254.169.254/" not in text
    for s in samples(exporter):
        assert "command_line" not in s.labels
        for v in s.labels.values():
            assert SECRET_CMD not in v


def test_model_probe_kernel_and_build(exporter) -> None:
    scorer = Scorer(ScorerSettings(learning_period=86400))
    for doc in baseline_events(600):
        scorer.process(event_from_ecs(doc))
    exporter.update_model(scorer)
    for detector, size in scorer.model_size().items():
        assert value(exporter, "imdswatch_model_entities", detector=detector) == size
    assert value(exporter, "imdswatch_model_entities", detector="rare_process") == 1
    assert value(exporter, "imdswatch_learning") == 1
    assert value(exporter, "imdswatch_model_hosts") == 3
    exporter.set_probe("kprobe", fallback=True)
    assert value(exporter, "imdswatch_probe_info", mode="kprobe") == 1
    assert value(exporter, "imdswatch_probe_fallback") == 1
    assert value(exporter, "imdswatch_ready") == 1
    exporter.set_kernel_counts(100, 2)
    exporter.set_kernel_counts(150, 2)
    exporter.set_kernel_counts(10, 3)  # maps recreated: the new total counts in full
    assert value(exporter, "imdswatch_kernel_connections_total") == 160
    assert value(exporter, "imdswatch_kernel_events_dropped_total") == 3
    info = [s for s in samples(exporter) if s.name == "imdswatch_build_info"][0]
    assert info.labels["version"] and info.labels["host"] == "node-1"


def test_default_registry_has_process_metrics() -> None:
    a, b = MetricsExporter(), MetricsExporter()  # private registries: no clash
    names = {s.name for s in samples(a)}
    assert "process_resident_memory_bytes" in names or "python_info" in names
    assert b.registry is not a.registry


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_http_endpoints(exporter) -> None:
    server = exporter.serve("127.0.0.1:0")
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/readyz")[0] == 503
        exporter.set_probe("fentry", fallback=False)
        status, body = get(base + "/readyz")
        assert status == 200 and "fentry" in body
        exporter.observe(outcome())
        status, body = get(base + "/metrics")
        assert status == 200 and "imdswatch_metadata_connections_total" in body
        assert get(base + "/nope")[0] == 404
        exporter.health.live_check = lambda: False
        assert get(base + "/healthz")[0] == 503
    finally:
        server.shutdown()
        server.server_close()


def test_bad_address() -> None:
    with pytest.raises(ValueError):
        MetricsExporter(CollectorRegistry()).serve("nonsense")


def test_kernel_counts_by_process_from_map_snapshots(exporter) -> None:
    name = "imdswatch_kernel_connections_by_process_total"
    # cgroup ids are summed away; (process, uid) stay.
    exporter.set_kernel_connection_counts({("curl", 0, 11): 3, ("curl", 0, 12): 4,
                                           ("curl", 33, 11): 1})
    assert value(exporter, name, process="curl", uid="0") == 7
    assert value(exporter, name, process="curl", uid="33") == 1
    # Deltas per map key: only what grew counts.
    exporter.set_kernel_connection_counts({("curl", 0, 11): 5, ("curl", 0, 12): 4,
                                           ("curl", 33, 11): 1})
    assert value(exporter, name, process="curl", uid="0") == 9
    # Maps recreated: a smaller total counts in full; a vanished key is forgotten and
    # counts in full when it comes back.
    exporter.set_kernel_connection_counts({("curl", 0, 11): 2})
    assert value(exporter, name, process="curl", uid="0") == 11
    exporter.set_kernel_connection_counts({("curl", 0, 11): 2, ("curl", 33, 11): 1})
    assert value(exporter, name, process="curl", uid="33") == 2
    assert all(s.labels.keys() == {"process", "uid"} for s in samples(exporter)
               if s.name == name)


def test_kernel_counts_by_process_are_capped(exporter) -> None:
    name = "imdswatch_kernel_connections_by_process_total"
    exporter.set_kernel_connection_counts({(f"rand{i}", 0, 1): 2 for i in range(20)})
    procs = {s.labels["process"]: s.value for s in samples(exporter) if s.name == name}
    assert len(procs) == 5 and set(procs.values()) == {2}
    assert value(exporter, "imdswatch_series_evicted_total",
                 metric="imdswatch_kernel_connections_by_process") == 15
