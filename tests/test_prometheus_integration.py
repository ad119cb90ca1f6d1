"""A real Prometheus server on loopback scrapes a running exporter fed through the real
scorer, evaluates the shipped rules, fires the seed alert with its reason, and resolves it
when the anomaly series expires."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers.imdsw_scenario import attack_event, baseline_events

from exporters.metrics import MetricsExporter
from intake.parser import event_from_ecs
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "imdswatch-rules.yaml"
PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus server not installed (scripts/setup.sh installs "
                               "Debian's prometheus package)")


class Clock:
    """Wall clock for the anomaly TTL that the test can jump forward."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.time() + self.skew


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.load(resp)
    assert doc["status"] == "success", doc
    return doc["data"]


def wait_until(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # server still starting
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture
def exporter_server():
    clock = Clock()
    exporter = MetricsExporter(host="node-2", clock=clock)
    scorer = Scorer(ScorerSettings(learning_period=600))
    alerts = []
    for doc in [*baseline_events(), attack_event()]:
        outcome = scorer.process(event_from_ecs(doc))
        if outcome is None:
            exporter.observe_skipped()
            continue
        exporter.observe(outcome)
        if outcome.alert:
            alerts.append(outcome)
    exporter.update_model(scorer)
    exporter.set_probe("kprobe", fallback=False)
    assert [a.event.name for a in alerts] == ["curl"], alerts
    server = exporter.serve("127.0.0.1:0")
    yield exporter, clock, server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def prometheus(tmp_path, exporter_server):
    _, _, exporter_port = exporter_server
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "imdswatch",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until("prometheus to be ready",
                   lambda: urllib.request.urlopen(base + "/-/ready", timeout=2).status == 200)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def firing(base: str, name: str) -> list[dict]:
    return [a for a in api(base, "alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == "firing"]


def test_seed_alert_fires_with_reason_and_resolves(exporter_server, prometheus) -> None:
    _, clock, _ = exporter_server
    base = prometheus
    wait_until("a successful scrape", lambda: [
        r for r in api(base, "query", query='up{job="imdswatch"}')["result"]
        if r["value"][1] == "1"])

    alert = wait_until("the seed alert to fire",
                       lambda: firing(base, "UnusualLinuxProcessCallingMetadataService"))[0]
    labels, annotations = alert["labels"], alert["annotations"]
    assert labels["process"] == "curl" and labels["user"] == "www-data"
    assert labels["host"] == "node-2" and labels["k8s_pod"] == "shop-7d9f"
    assert labels["severity"] == "low" and labels["risk_score"] == "21"
    assert labels["mitre_technique"] == "T1552.005"
    assert "curl" in labels["reason"]
    assert labels["reason"] in annotations["description"]
    assert "AQAEsecretvalue" not in json.dumps(alert)

    # Every rule evaluates without error against real exporter output.
    groups = api(base, "rules")["groups"]
    assert {g["name"] for g in groups} == {"imdswatch-anomalies", "imdswatch-fleet",
                                           "imdswatch-agent", "imdswatch-fleet-scorer",
                                           "imdswatch-fleet-bus", "imdswatch-enforcement"}
    wait_until("every rule evaluated", lambda: all(
        r.get("lastEvaluation", "").startswith("20") and r["health"] == "ok"
        for g in api(base, "rules")["groups"] for r in g["rules"]))
    bad = [(r["name"], r.get("lastError")) for g in api(base, "rules")["groups"]
           for r in g["rules"] if r["health"] != "ok"]
    assert bad == []
    # The recording rules see the fleet the exporter reported.
    hosts = wait_until("the recording rules", lambda: api(
        base, "query", query="imdswatch:process_hosts:count")["result"])
    assert {r["metric"]["process"]: r["value"][1] for r in hosts} == {
        "amazon-ssm-agen": "3", "curl": "1"}
    # A healthy agent raises no health alert.
    for name in ("ImdswatchAgentDown", "ImdswatchEventsDropped", "ImdswatchProbeFallback"):
        assert firing(base, name) == []

    # The anomaly TTL passes: the series leaves /metrics and the alert resolves.
    clock.skew = 10_000
    wait_until("the seed alert to resolve",
               lambda: not firing(base, "UnusualLinuxProcessCallingMetadataService"))
