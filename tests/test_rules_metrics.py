"""Every metric the alert rules and the Grafana dashboard query exists in the exporter's
output (with the labels they match on), so a renamed metric cannot silently blind an
alert or empty a panel."""

import json
import re
from pathlib import Path

import yaml
from helpers.imdsw_scenario import attack_event, baseline_events
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporters.metrics import MetricsExporter
from fleet.metrics import AgentFleetMetrics, ServeMetrics
from intake.parser import event_from_ecs
from policy.metrics import PolicyMetrics
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy/prometheus/imdswatch-rules.yaml"
DASHBOARD = ROOT / "deploy/grafana/imdswatch-dashboard.json"
# Series Prometheus itself creates.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "offset", "bool", "inf", "nan", "atan2"}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for each vector selector in `expr`."""
    expr = re.sub(r"\$\{?\w+\}?", "x", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = []
    pattern = r'(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?'
    for m in re.finditer(pattern, expr):
        name, matchers = m.group(1), m.group(2) or ""
        rest = expr[m.end():].lstrip()
        if name in KEYWORDS or (rest.startswith("(") and not matchers):
            continue
        if m.start() > 0 and expr[m.start() - 1].isdigit():
            continue  # a duration such as 7d after offset
        labels = set(re.findall(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"', matchers))
        found.append((name, labels))
    return found


def rule_exprs() -> tuple[list[str], set[str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return [r["expr"] for r in rules], {r["record"] for r in rules if "record" in r}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels: list) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert m, query
            exprs.append(f'{m.group(1)}{{{m.group(2)}=~".*"}}')
    return exprs


def exported_series() -> dict[str, set[str]]:
    """Metric name -> label names, from an exporter fed by the real scorer."""
    exporter = MetricsExporter(host="node-1")
    scorer = Scorer(ScorerSettings(learning_period=600))
    for doc in [*baseline_events(), attack_event()]:
        outcome = scorer.process(event_from_ecs(doc))
        if outcome is None:
            exporter.observe_skipped()
        else:
            exporter.observe(outcome)
    exporter.observe_malformed()
    # The fleet scorer's and the fleet-mode agent's metrics, on the same registry as in
    # `imdswatch serve` and `imdswatch run --fleet`.
    ServeMetrics(exporter.registry)
    AgentFleetMetrics(exporter.registry)
    # The enforcement's (imdswatch run --enforce).
    pm = PolicyMetrics(exporter.registry)
    pm.set_mode("deny", "deny")
    pm.set_policy(3)
    pm.decided("connection_denied", "default", "imds", None)
    exporter.update_model(scorer)
    exporter.set_probe("fentry", fallback=False)
    exporter.set_kernel_counts(10, 1)
    for i in range(exporter.max_series + 1):  # one eviction, so that family has a sample
        exporter.set_kernel_connection_counts({(f"p{i}", 0, 1): 1})
    names: dict[str, set[str]] = {}
    text = generate_latest(exporter.registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            names.setdefault(s.name, set()).update(s.labels)
    # Prometheus adds these target labels to every scraped series.
    for labels in names.values():
        labels.update({"job", "instance", "node"})
    return names


def test_scenario_produces_an_anomaly() -> None:
    assert "imdswatch_anomaly_score" in exported_series()


def test_every_metric_in_rules_and_dashboard_is_exported() -> None:
    exported = exported_series()
    exprs, recorded = rule_exprs()
    exprs += dashboard_exprs()
    checked = set()
    for expr in exprs:
        for name, labels in selectors(expr):
            if name in recorded:
                continue
            if name in PROMETHEUS_SERIES:
                continue
            assert name in exported, f"{name} (in {expr!r}) is not exported"
            missing = labels - exported[name]
            assert not missing, f"{name} has no label(s) {missing} (in {expr!r})"
            checked.add(name)
    # The check saw the metrics that matter, i.e. the parser did not skip everything.
    assert {"imdswatch_anomaly_score", "imdswatch_metadata_connections_total",
            "imdswatch_kernel_events_dropped_total", "imdswatch_probe_fallback",
            "imdswatch_learning", "imdswatch_build_info", "imdswatch_anomalies_total",
            "process_resident_memory_bytes", "imdswatch_probe_info"} <= checked


def test_selector_parser() -> None:
    got = selectors('sum by (a) (rate(foo_total{x="1", y=~"$v"}[5m])) unless on (p) '
                    'max_over_time(bar:rec[7d] offset 1h) and on () count(baz offset 7d) > 0')
    assert got == [("foo_total", {"x", "y"}), ("bar:rec", set()), ("baz", set())]
    assert selectors('topk(5, x{a="}"}) or vector(0)') == [("x", {"a"})]
