"""Agents in fleet mode: the spool (bounded, oldest dropped and counted, kept across a
restart, delivered after an outage) with a real `imdswatch serve`, and live agents as real
processes with BPF attached, catching connects made in a private network namespace."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest
from fleet_fixtures import ServeProcess, fleet_events
from netns_fixtures import AgentProcess, MetadataNamespace, free_port, require_bcc, wait_for

from exporters.metrics import MetricsExporter
from fleet.sink import FleetOptions, FleetSink
from fleet.spool import Spool
from intake.parser import event_from_ecs
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

IMDS = "169.254.169.254"


def _sample(exporter: MetricsExporter, name: str) -> float:
    return exporter.registry.get_sample_value(name) or 0.0


def test_spool_full_drops_oldest_counts_them_and_delivers_the_rest(tmp_path):
    port = free_port()
    lines = fleet_events()[:3000]
    exporter = MetricsExporter()
    scorer = Scorer(ScorerSettings(learning_period=0))
    opts = FleetOptions(f"http://127.0.0.1:{port}", str(tmp_path / "spool"),
                        spool_max_bytes=96 << 10)
    sink = FleetSink(opts, scorer, exporter)
    sink.spool.segment_events = 100
    sink.start()  # nothing listens: the agent scores locally from the start
    assert sink.local and _sample(exporter, "imdswatch_fleet_scoring_locally") == 1
    for line in lines:
        assert sink.handle(event_from_ecs(orjson.loads(line))) is not None
    sink.spool.seal()
    sink.housekeeping()
    events, size = sink.spool.backlog()
    dropped = _sample(exporter, "imdswatch_fleet_spool_dropped_total")
    assert dropped > 0 and events + dropped == len(lines)
    assert size <= 96 << 10
    sink.close(timeout=0)
    # The backlog survives a restart of the agent.
    again = Spool(tmp_path / "spool")
    again.open()
    assert again.backlog()[0] == events
    # The fleet scorer comes up: the newest events (the ones kept) are delivered.
    serve = ServeProcess(tmp_path, port=port).start()
    try:
        sink = FleetSink(opts, scorer, MetricsExporter())
        sink.start()
        assert wait_for(lambda: sink.spool.backlog()[0] == 0, 60)
        assert serve.metric("imdswatch_ingest_events_total", result="accepted") == events
        assert not sink.local
        sink.close()
        assert serve.stop() == 0
    finally:
        serve.kill()
    state = orjson.loads(serve.state.read_bytes())
    kept_ids = {orjson.loads(x)["event"]["id"] for x in lines[-events:]}
    # Scored, or still waiting in the reorder buffer (saved with the state) for later events.
    assert len(kept_ids) == events
    assert state["events_learned"] + len(state["fleet"]["pending"]) == events


# -- live agents --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS,)) as n:
        yield n


def _pid(ns: MetadataNamespace, argv: list[str]) -> int:
    p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.wait(20)
    return p.pid


def _of(alerts: list[dict], pid: int) -> list[dict]:
    return [a for a in alerts if a.get("process", {}).get("pid") == pid]


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in started:
        p.kill()


def _warm(path):
    from netns_fixtures import warm_state

    warm_state(path)
    return path


@pytest.mark.root
@pytest.mark.bpf
def test_live_agent_sends_and_the_fleet_alerts(ns, tmp_path, procs):
    token = tmp_path / "token"
    token.write_text("fleet-test-token-" + "x" * 20)
    serve = ServeProcess(tmp_path, "--learning-period", "0s", "--token-file", str(token),
                         state=_warm(tmp_path / "fleet-state.json"))
    procs.append(serve.start())
    (tmp_path / "agent").mkdir()
    agent = AgentProcess(tmp_path / "agent", "--learning-period", "0s", "--fleet", serve.url,
                         "--spool", str(tmp_path / "spool"), "--fleet-token-file", str(token))
    procs.append(agent)
    agent.start()
    assert agent.metric("imdswatch_fleet_scoring_locally") == 0
    assert "fleet model applied" in agent.log.read_text()

    curl = _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
    assert wait_for(lambda: _of(serve.alert_lines(), curl), 15)
    (alert,) = _of(serve.alert_lines(), curl)
    assert alert["imdswatch"]["scored_by"] == "fleet"
    assert alert["process"]["name"] == "curl" and alert["destination"]["ip"] == IMDS
    assert agent.metric("imdswatch_fleet_sent_total") >= 1
    assert not _of(agent.alert_lines(), curl), "the agent alerts only while serve is away"
    assert agent.stop()[0] == 0
    assert serve.stop() == 0


@pytest.mark.root
@pytest.mark.bpf
def test_agent_started_while_serve_is_down_alerts_once(ns, tmp_path, procs):
    port = free_port()
    (tmp_path / "agent").mkdir()
    agent = AgentProcess(tmp_path / "agent", "--learning-period", "0s",
                         "--state", str(_warm(tmp_path / "agent-state.json")),
                         "--fleet", f"http://127.0.0.1:{port}", "--spool",
                         str(tmp_path / "spool"))
    procs.append(agent)
    agent.start()
    assert agent.metric("imdswatch_fleet_scoring_locally") == 1

    curl = _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
    assert wait_for(lambda: _of(agent.alert_lines(), curl), 10)
    (local,) = _of(agent.alert_lines(), curl)
    assert local["imdswatch"]["scored_by"] == "agent"

    serve = ServeProcess(tmp_path, "--learning-period", "0s", port=port,
                         state=_warm(tmp_path / "fleet-state.json"))
    procs.append(serve.start())
    # The spooled events reach the fleet, which learns the curl call without alerting again.
    assert wait_for(lambda: serve.metric("imdswatch_fleet_agent_alerted_total") >= 1, 60)
    assert wait_for(lambda: agent.metric("imdswatch_fleet_scoring_locally") == 0, 30)
    time.sleep(1.0)
    assert not _of(serve.alert_lines(), curl)
    # From now on the fleet alerts, and the agent does not.
    wget = _pid(ns, ["wget", "-q", "-O", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
    assert wait_for(lambda: _of(serve.alert_lines(), wget), 30)
    assert _of(serve.alert_lines(), wget)[0]["imdswatch"]["scored_by"] == "fleet"
    assert not _of(agent.alert_lines(), wget)
    assert len(_of(agent.alert_lines(), curl)) == 1
    assert agent.stop()[0] == 0
