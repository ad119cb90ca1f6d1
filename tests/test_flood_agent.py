"""A name flood against the live agent: real BPF, the real `imdswatch run`, and in
a private namespace one process that renames itself (prctl on its thread-group leader, so
the kernel's comm changes) before each of 20,000 connects. Asserted: every connect is
accounted for (scored, or dropped at the ring buffer and counted: nothing silently lost),
the model stays within its cap, the saved state stays bounded, the agent stays responsive,
and a real attack right after the flood still alerts. The 200k-name flood with the agent's
memory measured against its targets is in `make bench` (bench/agent_flood.py). Bounded:
20,000 connects, 60 s."""

from __future__ import annotations

import secrets
import signal

import pytest
from netns_fixtures import (
    LAB,
    AgentProcess,
    MetadataNamespace,
    require_bcc,
    wait_for,
    warm_state,
)

from lab.flood_attack import unusual_curl
from scoring.scorer import Scorer
from scoring.state import load_state

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
NAMES = 20_000
MAX_SECONDS = 60
CAP = 20_000  # the model's cap on entries for this agent: the flood must pass it
STATE_MAX = 20 * 1024 * 1024


def flood(ns: MetadataNamespace, prefix: str, names: int = NAMES, port: int = 9,
          max_seconds: float = MAX_SECONDS) -> tuple[int, float]:
    """(connects made, seconds) of one process connecting once per name PREFIX<n>."""
    r = ns.run(["python3", str(LAB / "name_flood_client.py"), IMDS, str(port), str(names),
                str(max_seconds), prefix], timeout=max_seconds + 30)
    assert r.returncode == 0, r.stderr
    made, seconds = r.stdout.split()
    return int(made), float(seconds)


COUNTERS = ("imdswatch_events_seen_total", "imdswatch_kernel_connections_total",
            "imdswatch_kernel_events_dropped_total")


def counters(agent: AgentProcess) -> dict[str, float]:
    return {n: agent.metric(n) for n in COUNTERS}


def test_name_flood_is_counted_bounded_and_does_not_hide_an_attack(tmp_path):
    require_bcc()
    state = tmp_path / "state.json"
    warm_state(state)
    config = tmp_path / "imdswatch.toml"
    config.write_text(f"[scoring]\nmax_entities = {CAP}\n")
    with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
        agent = AgentProcess(tmp_path, "--config", str(config), "--state", str(state),
                             "--learning-period", "0s")
        try:
            agent.start()
            before = counters(agent)
            prefix = f"q{secrets.token_hex(2)}"  # 5 chars + up to 4 base-36 digits
            made, _ = flood(ns, prefix)
            assert made == NAMES  # bounded in time, but it must have run in full

            def delta() -> dict[str, float]:
                now = counters(agent)
                return {n: now[n] - before[n] for n in COUNTERS}

            # The kernel counts every connect (machine-wide: other tests' calls add to it),
            # and each one is either read and scored or dropped at the ring buffer and
            # counted. `>=`: a connection carrying several requests is several events.
            def accounted() -> bool:
                d = delta()
                seen, kernel, dropped = (d[n] for n in COUNTERS)
                return kernel >= made and seen + dropped >= kernel

            assert wait_for(accounted, 120, 0.5), delta()
            d = delta()
            assert d["imdswatch_events_seen_total"] > 0
            # The model is within its cap (one event's entries may pass it until the
            # next maintenance), and it was full: the flood reached the cap.
            entities = agent.metric("imdswatch_model_entities")
            assert entities <= CAP + 16, entities
            assert agent.metric("imdswatch_ready") == 1

            # The attack right after the flood: a copy of curl under a new name, run by a
            # new uid, asks for the role's credentials without the anti-SSRF header.
            pid, attacker, uid = unusual_curl(ns, tmp_path / "attack")

            def attack() -> list[dict]:
                return [a for a in agent.alert_lines() if a["process"].get("pid") == pid]

            assert wait_for(attack, 30), agent.log.read_text()[-2000:]
            alert = attack()[0]
            assert alert["process"]["name"] == attacker
            assert alert["user"]["id"] == str(uid)
            assert alert["anomaly"]["score"] >= 50
            # The flood itself is a handful of alert lines (a burst), not one per name.
            flood_alerts = [a for a in agent.alert_lines()
                            if a["process"].get("name", "").startswith(prefix)]
            assert 1 <= len(flood_alerts) <= 10, len(flood_alerts)

            rc, seconds = agent.stop(signal.SIGTERM, timeout=60)
            assert rc == 0
            assert "Traceback" not in agent.log.read_text()
        finally:
            agent.kill()
    size = state.stat().st_size
    assert size <= STATE_MAX, size
    scorer = Scorer()
    load_state(state, scorer)
    assert scorer.entities <= CAP + 16
    assert scorer.events_learned >= 3000 + d["imdswatch_events_seen_total"] - 1


def test_name_flood_client_names_are_distinct():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nfc", LAB / "name_flood_client.py")
    nfc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nfc)
    names = {nfc.name("q1a2", i) for i in range(200_000)}
    assert len(names) == 200_000 and max(map(len, names)) <= 15
    with pytest.raises(SystemExit):
        nfc.name("a-prefix-too-long", 10)
