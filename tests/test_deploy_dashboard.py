"""The Grafana dashboard is importable JSON with a datasource variable, node and namespace
filters, and the panels operators need."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASH = json.loads((ROOT / "deploy" / "grafana" / "imdswatch-dashboard.json").read_text())


def all_panels() -> list[dict]:
    out = []
    for p in DASH["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_variables() -> None:
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("node", "namespace"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["multi"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_query_uses_the_datasource_variable_and_filters() -> None:
    for panel in all_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            expr = target["expr"]
            if "imdswatch_" in expr:
                # Every imdswatch query follows the node filter.
                assert "$node" in expr, (panel["title"], expr)


def test_panels_cover_the_issue() -> None:
    titles = " | ".join(p["title"].lower() for p in all_panels())
    for needle in ("by process", "by endpoint", "by detector and severity",
                   "top anomalous entities", "probe mode", "dropped", "memory"):
        assert needle in titles, needle
    exprs = " ".join(t["expr"] for p in all_panels() for t in p.get("targets", []))
    assert "imdswatch_learning" in exprs and "reason" in exprs


def test_ids_and_layout() -> None:
    ids = [p["id"] for p in all_panels()]
    assert len(ids) == len(set(ids))
    for p in all_panels():
        g = p["gridPos"]
        assert 0 <= g["x"] < 24 and g["x"] + g["w"] <= 24 and g["h"] > 0
    assert DASH["uid"] and DASH["schemaVersion"] >= 36
