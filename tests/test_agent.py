"""`imdswatch run` end to end as a real process: BPF attached, real clients in a private
namespace calling a mock IMDS, alerts NDJSON, scraped Prometheus metrics, state save on
SIGTERM, live config reload on SIGHUP, fail-fast exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from netns_fixtures import AgentProcess, MetadataNamespace, require_bcc, wait_for, warm_state

from scoring.scorer import Scorer
from scoring.state import load_state
from tracer import kernel

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"


def _pid(ns: MetadataNamespace, argv: list[str]) -> int:
    p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.wait(20)
    return p.pid


def _alerts_of(agent: AgentProcess, pid: int) -> list[dict]:
    # The agent sees the whole machine: other metadata traffic must not confuse the test.
    return [a for a in agent.alert_lines() if a["process"].get("pid") == pid]


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS,), v6=("fd00:ec2::254",)) as n:
        yield n


@pytest.fixture
def agent_factory(tmp_path):
    agents: list[AgentProcess] = []

    def make(*args: str) -> AgentProcess:
        a = AgentProcess(tmp_path, *args)
        agents.append(a)
        return a.start()

    yield make
    for a in agents:
        a.kill()


def test_warm_agent_alerts_on_a_rare_caller(ns, tmp_path, agent_factory):
    state = tmp_path / "state.json"
    warm_state(state)
    size_before = state.stat().st_size
    agent = agent_factory("--state", str(state), "--learning-period", "0s")
    assert agent.metric("imdswatch_ready") == 1 and agent.metric("imdswatch_probe_info") == 1
    assert "probe auto chose" in agent.log.read_text()

    curl = _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
    assert wait_for(lambda: _alerts_of(agent, curl), 5)
    (alert,) = _alerts_of(agent, curl)
    assert alert["event"]["kind"] == "alert"
    assert alert["process"]["name"] == "curl"
    assert alert["destination"]["ip"] == IMDS
    assert alert["anomaly"]["score"] >= 50 and alert["anomaly"]["detector"]
    assert "curl" in alert["anomaly"]["reason"]

    _pid(ns, ["setpriv", "--reuid=65534", "wget", "-q", "-O", "/dev/null",
              f"http://{IMDS}/latest/meta-data/"])
    # >=: a system-wide agent also counts any other metadata traffic on this machine
    assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total",
                                         process="wget", user="nobody") >= 1, 5)
    assert agent.metric("imdswatch_metadata_connections_total", process="curl") >= 1
    assert agent.metric("imdswatch_anomalies_total") >= 1
    assert wait_for(lambda: agent.metric("imdswatch_kernel_connections_total") >= 2, 5)
    assert agent.metric("imdswatch_kernel_events_dropped_total") == 0

    rc, seconds = agent.stop(signal.SIGTERM)
    assert rc == 0 and seconds < 5
    scorer = Scorer()
    load_state(state, scorer)
    assert scorer.events_learned >= 3002 and state.stat().st_size != size_before


def test_learning_period_holds_alerts_back(ns, agent_factory):
    agent = agent_factory("--learning-period", "1h")
    curl = _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/"])
    bash = _pid(ns, ["bash", "-c", f"exec 3<>/dev/tcp/{IMDS}/80"])
    assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total") >= 2, 5)
    assert agent.metric("imdswatch_learning") == 1
    assert _alerts_of(agent, curl) == _alerts_of(agent, bash) == []
    rc, _ = agent.stop(signal.SIGINT)
    assert rc == 0


def test_sighup_reloads_endpoints_into_the_kernel(ns, tmp_path, agent_factory):
    config = tmp_path / "imdswatch.toml"
    config.write_text('[endpoints]\nremove = ["imds"]\n')
    agent = agent_factory("--config", str(config), "--learning-period", "1h")
    _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/"])
    time.sleep(1.5)  # kernel counters are published every second
    before = agent.metric("imdswatch_metadata_connections_total", endpoint="imds")
    assert before == 0
    # the kernel filter held it back: had it been emitted, the scorer would count it skipped
    assert agent.metric("imdswatch_events_skipped_total") == 0
    config.write_text("[endpoints]\nremove = []\n")
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "config reloaded" in agent.log.read_text(), 5)
    _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/"])
    assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total",
                                         process="curl", endpoint="imds") >= 1, 5)
    assert agent.stop()[0] == 0


def test_ipv6_endpoint_scored_live(ns, tmp_path, agent_factory):
    state = tmp_path / "state.json"
    warm_state(state)
    agent = agent_factory("--state", str(state), "--learning-period", "0s")
    py = _pid(ns, ["/usr/bin/python3", "-c", "import socket; s=socket.socket(socket.AF_INET6); "
                   "s.connect(('fd00:ec2::254', 80))"])
    assert wait_for(lambda: _alerts_of(agent, py), 5)
    (alert,) = _alerts_of(agent, py)
    assert alert["destination"]["ip"] == "fd00:ec2::254"
    assert alert["process"]["name"] == "python3"
    assert agent.stop()[0] == 0


def test_unavailable_probe_fails_fast(tmp_path):
    require_bcc()
    if kernel.kprobes_available():
        pytest.skip("this kernel has kprobes, so --probe kprobe does not fail here")
    a = AgentProcess(tmp_path, "--probe", "kprobe")
    t0 = time.monotonic()
    r = subprocess.run(a.argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "CONFIG_KPROBES" in r.stderr and "fix:" in r.stderr
    assert time.monotonic() - t0 < 30
    assert not os.path.exists(a.alerts) or a.alerts.read_text() == ""
