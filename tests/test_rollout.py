# Metadata addresses in this file are data (event fields): nothing here connects to them.
"""A fleet-wide rollout is one event (issue 20): a new caller spreading over the fleet, or a
known caller's new version on every node, gives at most one alert; an attacker's one-off in
the middle of it still alerts."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_events import DAY, HOUR, MINUTE, T0, Agent, ev, fleet_events, stripped
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.detectors import version_key
from scoring.scorer import Scorer
from scoring.state import model_from_bytes, model_to_bytes

HOSTS = 12
ACME = Agent("acme-agent", "/opt/acme/agent-2.4.1/bin/acme-agent", "root", "systemd",
             10 * MINUTE)
SNAPPY = Agent("snappy", "/snap/snappy/1234/bin/snappy", "root", "systemd", 10 * MINUTE)


def history() -> list:
    from helpers_events import FLEET_AGENTS
    return fleet_events(hosts=HOSTS, days=3, agents=(*FLEET_AGENTS, ACME, SNAPPY))


def spread(start: float, name: str, exe: str, *, image=None, namespace=None, user="root",
           parent="systemd", hosts: int = HOSTS, every: float = 10 * MINUTE,
           step: float = 12 * MINUTE, until: float = 8 * HOUR) -> list:
    """`exe` arriving on one more host every `step`, each calling every `every`."""
    out = []
    for h in range(hosts):
        t = start + h * step
        while t < start + until:
            out.append(ev(t, name, exe=exe, user=user, parent=parent, host=f"node-{h}",
                          image=image, namespace=namespace))
            t += every
    return out


def run(scorer: Scorer, events: list) -> list:
    events = sorted(events, key=lambda e: e.ts)
    return [o for o in (scorer.process(e) for e in events) if o is not None and o.alert]


def warm() -> Scorer:
    s = Scorer()
    run(s, history())
    return s


T = T0 + 3 * DAY + HOUR


def test_version_key():
    assert version_key("/snap/amazon-ssm-agent/1234/amazon-ssm-agent") == \
        version_key("/snap/amazon-ssm-agent/5678/amazon-ssm-agent")
    assert version_key("/usr/bin/python3.11") == version_key("/usr/bin/python3.12")
    assert version_key("/usr/bin/python3") is None  # no version: the path is its own key
    # Where anyone can write, a path is never another version of a known one.
    assert version_key("/tmp/1234/curl") is None
    assert version_key("/dev/shm/agent-2.4.1/agent") is None


def test_a_new_daemonset_on_every_node_is_one_alert():
    # Nodes pick it up every 3 hours and it calls every 6: past the fleet-wide suppression
    # window, each new node's first call would alert again were it not folded.
    s = warm()
    alerts = run(s, spread(T, "fluent-bit", "/fluent-bit/bin/fluent-bit",
                           image="cr.fluentbit.io/fluent/fluent-bit:3.0.4", namespace="logging",
                           step=3 * HOUR, every=6 * HOUR, until=40 * HOUR))
    assert len(alerts) == 1, [a.reason for a in alerts]
    assert alerts[0].event.host == "node-0"
    folded = [o for o in (s.process(e) for e in spread(
        T + 40 * HOUR, "fluent-bit", "/fluent-bit/bin/fluent-bit",
        image="cr.fluentbit.io/fluent/fluent-bit:3.0.4", namespace="logging", hosts=1,
        until=MINUTE)) if o is not None]
    assert all(not o.alert for o in folded)


def test_an_upgrade_of_a_known_agent_is_one_low_severity_alert_naming_it():
    s = warm()
    alerts = run(s, spread(T, "acme-agent", "/opt/acme/agent-2.5.0/bin/acme-agent"))
    assert len(alerts) == 1, [a.reason for a in alerts]
    assert alerts[0].severity == "low"
    assert alerts[0].reason.startswith("upgrade of acme-agent: /opt/acme/agent-2.5.0/bin/")
    assert "/opt/acme/agent-2.4.1/bin/acme-agent" in alerts[0].reason


def test_a_snap_revision_on_every_node_is_one_low_severity_alert():
    s = warm()
    alerts = run(s, spread(T, "snappy", "/snap/snappy/5678/bin/snappy"))
    assert [a.severity for a in alerts] == ["low"], [a.reason for a in alerts]


def test_an_attackers_one_off_in_the_middle_of_a_rollout_still_alerts():
    s = warm()
    events = spread(T, "acme-agent", "/opt/acme/agent-2.5.0/bin/acme-agent")
    events += spread(T + 5 * MINUTE, "fluent-bit", "/fluent-bit/bin/fluent-bit",
                     image="cr.fluentbit.io/fluent/fluent-bit:3.0.4", namespace="logging")
    mid = T + 2 * HOUR + 30
    one_offs = [
        ev(mid, "acme-agent", exe="/tmp/.x/agent-2.5.0/bin/acme-agent", parent="systemd",
           host="node-5"),
        ev(mid + 60, "fluent-bit", exe="/dev/shm/fluent-bit", parent="bash", user="www-data",
           host="node-6"),
        ev(mid + 120, "curl", exe="/usr/bin/curl", user="nobody", parent="sh", host="node-7"),
    ]
    alerts = run(s, events + one_offs)
    caught = {(a.event.name, a.event.exe) for a in alerts if a.event in one_offs}
    assert caught == {(e.name, e.exe) for e in one_offs}, [a.reason for a in alerts]
    for a in alerts:
        if a.event in one_offs:
            assert a.severity != "low" and not a.rollout
    assert len(alerts) == 2 + len(one_offs), [a.reason for a in alerts]


@pytest.mark.parametrize("events", ["spread", "daemonset"])
def test_a_rollout_in_progress_survives_a_saved_state(events):
    """A restart (or a fleet scorer's failover) in the middle of a rollout: its further
    hosts are folded into the alert made before, not alerted again."""
    made = (spread(T, "fluent-bit", "/fluent-bit/bin/fluent-bit",
                   image="cr.fluentbit.io/fluent/fluent-bit:3.0.4", namespace="logging",
                   step=3 * HOUR, every=6 * HOUR, until=40 * HOUR)
            if events == "spread" else daemonset(T))
    made.sort(key=lambda e: e.ts)
    cut = next(i for i, e in enumerate(made) if e.host == "node-2")
    s = warm()
    before = run(s, made[:cut])
    assert len(before) == 1 and s.rollouts
    t = Scorer()
    model_from_bytes(t, model_to_bytes(s))
    assert {k: (r.kind, r.name, r.hosts) for k, r in t.rollouts.items()} == {
        k: (r.kind, r.name, r.hosts) for k, r in s.rollouts.items()}
    after = run(t, made[cut:])
    assert after == [], [a.reason for a in after]


def test_versions_survive_a_saved_state():
    s = Scorer()
    model_from_bytes(s, model_to_bytes(warm()))
    alerts = run(s, spread(T, "acme-agent", "/opt/acme/agent-2.5.0/bin/acme-agent"))
    assert [a.severity for a in alerts] == ["low"]


@settings(deadline=None, max_examples=12)
@given(st.sampled_from(("/usr/bin/curl", "/bin/sh", "/usr/local/bin/aws")),
       st.sampled_from(("nobody", "www-data")))
def test_a_known_tool_run_by_a_new_user_is_never_an_upgrade(exe, user):
    s = Scorer()
    run(s, fleet_events(hosts=4, days=2))
    out = s.process(ev(T0 + 2 * DAY + HOUR, exe.rsplit("/", 1)[1], exe=exe, user=user,
                       host="node-1"))
    assert not out.rollout


def test_at_threshold_0_a_detector_that_did_not_score_does_not_rule_out_an_upgrade():
    """`--threshold 0` shows every score: a detector that did not score the event (no value
    for it) must not count as having reached the threshold (issue 21's class of bug)."""
    from scoring.endpoints import EndpointCatalog
    from scoring.scorer import Outcome
    from scoring.settings import ScorerSettings

    s = Scorer(ScorerSettings(threshold=0))
    model_from_bytes(s, model_to_bytes(warm()))
    e = ev(T, "acme-agent", exe="/opt/acme/agent-2.5.0/bin/acme-agent", parent="systemd",
           host="node-1")
    out = Outcome(e, EndpointCatalog.from_config().match(e.dst_ip, e.dst_port))
    out.scores.update({"rare_executable": 80.0, "rare_combination": 70.0})
    assert s._upgrade_of(out) == version_key(e.exe)


# -- a new workload's rollout (a DaemonSet or Deployment the fleet has never seen) ----------

VECTOR = "timberio/vector:0.38.0-debian"


def in_pod(e, pod: str):
    e.pod = pod
    return e


def daemonset(start: float, hosts: int = HOSTS, step: float = 25 * MINUTE,
              until: float = 10 * HOUR) -> list:
    """A new DaemonSet's pods reaching one more node every `step` (a rolling start)."""
    return [in_pod(e, f"vector-{'bcdfg'[int(e.host.split('-')[1]) % 5] * 5}")
            for e in spread(start, "vector", "/usr/bin/vector", image=VECTOR,
                            namespace="observability", parent="containerd-shim", hosts=hosts,
                            step=step, until=until)]


def test_workload_of():
    from scoring.detectors import workload_of

    def w(pod, image="a/b:1", namespace="ns"):
        return workload_of(in_pod(ev(T, "x", image=image, namespace=namespace), pod))

    assert w("vector-x7k2p") == "vector"  # a DaemonSet's or a Job's pod
    assert w("web-frontend-6d4cf56db6-x7k2p") == "web-frontend"  # a Deployment's
    assert w("nightly-backup-28512345-x7k2p") == "nightly-backup"  # a CronJob's
    assert w("postgres-0") == "postgres"  # a StatefulSet's
    assert w("debug") is None  # made by hand: no controller
    assert w("vector-x7k2p", image=None) is None
    assert w("vector-x7k2p", namespace=None) is None


def test_a_new_daemonset_is_one_low_severity_alert_naming_the_workload():
    from exporters.alerts import build_alert

    s = warm()
    alerts = run(s, daemonset(T))
    assert len(alerts) == 1, [a.reason for a in alerts]
    a = alerts[0]
    assert a.severity == "low" and a.rollout == 1 and a.rollout_kind == "workload"
    assert a.event.host == "node-0"
    assert a.reason.startswith("new workload observability/vector (image timberio/vector:")
    doc = build_alert(a)
    assert doc["imdswatch"]["rollout"] == {"kind": "workload", "name": "observability/vector",
                                           "hosts": 1}
    assert doc["anomaly"]["severity"] == "low"


def test_a_known_workloads_new_caller_is_not_a_new_workload():
    """Once the fleet has seen the image call, a new caller in it is judged as any other."""
    s = warm()
    run(s, daemonset(T, hosts=1, until=HOUR))
    e = in_pod(ev(T + 5 * HOUR, "curl", exe="/usr/bin/curl", image=VECTOR,
                  namespace="observability", parent="containerd-shim", host="node-3"),
               "vector-hhhhh")
    out = s.process(e)
    assert out.alert and not out.rollout and out.severity != "low", out


def test_attackers_one_offs_in_the_middle_of_a_new_daemonset_still_alert_at_their_severity():
    s = warm()
    events = daemonset(T)
    mid = T + 2 * HOUR + 30
    one_offs = [
        # The workload's name on the host, from /tmp, started by a shell.
        ev(mid, "vector", exe="/tmp/.v/vector", parent="bash", host="node-2"),
        # A new image in a pod made by hand (no controller).
        in_pod(ev(mid + 60, "python3", exe="/usr/local/bin/python3.12", image="evil/tool:1",
                  namespace="default", parent="sh", host="node-4"), "debug"),
        # A new workload's pod whose caller runs from a path anyone can write.
        in_pod(ev(mid + 120, "x", exe="/dev/shm/x", image="evil/miner:2",
                  namespace="default", parent="containerd-shim", host="node-6"),
               "miner-x7k2p"),
    ]
    alerts = run(s, events + one_offs)
    caught = [a for a in alerts if a.event in one_offs]
    assert len(caught) == len(one_offs), [a.reason for a in alerts]
    for a in caught:
        assert a.severity != "low" and not a.rollout, a.reason
    assert len(alerts) == 1 + len(one_offs), [a.reason for a in alerts]


def test_a_new_workload_survives_a_saved_state_as_known():
    s = warm()
    run(s, daemonset(T, hosts=1, until=HOUR))
    t = Scorer()
    model_from_bytes(t, model_to_bytes(s))
    e = in_pod(ev(T + 30 * HOUR, "vector-helper", exe="/usr/bin/vector-helper", image=VECTOR,
                  namespace="observability", parent="containerd-shim", host="node-3"),
               "vector-hhhhh")
    out = t.process(e)
    assert out.alert and out.rollout_kind != "workload", out


def test_replay_of_a_generated_fleet_with_rollouts(tmp_path):
    """`imdswatch replay` over the bench's rollout scenario (bench/variants.py): each rollout
    (a new DaemonSet, an agent's upgrade, a new interpreter with a node image) is at most one
    low-severity alert naming it, and each attacker's one-off in the middle of one is caught
    at its own severity."""
    import subprocess

    import orjson

    from bench.evaluate import labels_of
    from bench.variants import ROLLOUT_SOURCES, rollouts

    sc = rollouts(seed=3, scale=0.3)
    labels = labels_of(sc)
    path = tmp_path / "rollouts.ndjson.gz"
    sc.write(path, labels=False)
    imdswatch = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "imdswatch"
    r = subprocess.run([str(imdswatch), "replay", str(path)], capture_output=True,
                       timeout=600, check=True)
    alerts = [orjson.loads(line) for line in r.stdout.splitlines() if line.strip()]
    by_actor: dict[str, list] = {}
    for a in alerts:
        n = int(a["event"]["id"].rsplit("-", 1)[1])
        by_actor.setdefault(labels.actor[n], []).append(a)
    for source in ROLLOUT_SOURCES:
        got = by_actor.get(source, [])
        assert len(got) <= 1, [a["anomaly"]["reason"] for a in got]
        for a in got:
            assert a["anomaly"]["severity"] == "low"
            assert a["imdswatch"]["rollout"]["kind"] in ("workload", "upgrade")
    assert by_actor.get("benign/rollout-vector"), "the new DaemonSet's first host alerts"
    assert by_actor["benign/rollout-vector"][0]["imdswatch"]["rollout"]["name"] == \
        "observability/vector"
    one_offs = [a.id for a in sc.actors if a.kind == "rollout_one_off"]
    assert len(one_offs) == 3
    for aid in one_offs:
        got = by_actor.get(aid)
        assert got, f"{aid} not caught"
        assert got[0]["anomaly"]["severity"] != "low" and "rollout" not in got[0]["imdswatch"]


# -- node bring-up: what runs at every new node's boot, days apart --------------------------

def boot(t: float, host: str, parent: str = "part-001", user: str = "root") -> list:
    """A node joining at `t`: its agents start, its user data curls the metadata service."""
    from helpers_events import FLEET_AGENTS, agent_event

    out = [agent_event(a, t + 5 + i, host) for i, a in enumerate(FLEET_AGENTS[:3])]
    out += [ev(t + 45 + k * 0.3, "curl", exe="/usr/bin/curl", user=user, parent=parent,
               host=host) for k in range(3)]
    return out


def test_a_boot_caller_on_every_new_node_alerts_once():
    s = warm()
    outs = [s.process(e) for e in sorted(
        boot(T, "node-new-1") + boot(T + 2 * DAY, "node-new-2") + boot(T + 5 * DAY, "node-new-3"),
        key=lambda e: e.ts)]
    curls = [o for o in outs if o is not None and o.event.name == "curl"]
    alerts = [o for o in curls if o.alert]
    assert [a.event.host for a in alerts] == ["node-new-1"], [o.reason for o in curls]
    folded = [o for o in curls if o.event.host == "node-new-2" and o.anomalous]
    assert folded and all(o.rollout_kind == "bring-up" and o.suppressed for o in folded)
    assert folded[0].reason.startswith("node bring-up: curl (/usr/bin/curl) anomalous in "
                                       "node-new-2's first 30 minutes, as it was at the boot "
                                       "of 1 other host before")


def test_a_boot_caller_outside_a_boot_still_alerts():
    """Seen at a node's boot is no licence on a running node, nor for another caller."""
    s = warm()
    run(s, boot(T, "node-new-1"))
    later = [
        ev(T + DAY, "curl", exe="/usr/bin/curl", parent="part-001", host="node-3"),
        *boot(T + 2 * DAY, "node-new-2", parent="bash"),  # a shell at a new node's boot
    ]
    alerts = run(s, later)
    assert {a.event.host for a in alerts if a.event.name == "curl"} == {"node-3", "node-new-2"}
    assert all(not a.rollout for a in alerts)


def test_bring_up_survives_a_saved_state():
    s = warm()
    run(s, boot(T, "node-new-1"))
    t = Scorer()
    model_from_bytes(t, model_to_bytes(s))
    alerts = run(t, boot(T + 2 * DAY, "node-new-2"))
    assert not [a for a in alerts if a.event.name == "curl"], [a.reason for a in alerts]


def _lost(events: list, name: str) -> list:
    """`events` where `name`'s lack executable, parent and command line."""
    return [stripped(e, ("exe", "parent_name", "command_line")) if e.name == name else e
            for e in events]


def test_a_boot_caller_without_its_executable_folds_by_name_user_and_image():
    """Unknown is judged by what is known: a boot caller whose executable an export lost is
    folded into the boots its known executable alerted at, never a new alert."""
    s = warm()
    first = [o for o in run(s, boot(T, "node-new-1")) if o.event.name == "curl"]
    assert [a.event.host for a in first] == ["node-new-1"]
    outs = [s.process(e) for e in _lost(boot(T + 2 * DAY, "node-new-2"), "curl")]
    curls = [o for o in outs if o is not None and o.event.name == "curl" and o.anomalous]
    assert curls and not [o for o in curls if o.alert], [o.reason for o in curls]
    assert curls[0].rollout_kind == "bring-up"
    assert curls[0].reason.startswith("node bring-up: curl (executable unknown) anomalous in "
                                      "node-new-2's first 30 minutes; by name, user and image")
    # Past a node's boot the fallback is no licence: nothing is folded as bring-up there.
    (late,) = _lost([ev(T + 3 * DAY, "curl", parent="part-001", host="node-3")], "curl")
    out = s.process(late)
    assert out is None or out.rollout_kind != "bring-up"
    # Boots from a writable path lend nothing to a caller whose executable is unknown.
    t = warm()
    run(t, [ev(e.ts, "curl", exe="/tmp/curl", parent="part-001", host=e.host)
            if e.name == "curl" else e for e in boot(T, "node-new-1")])
    later = run(t, _lost(boot(T + 2 * DAY, "node-new-2"), "curl"))
    assert [a.event.host for a in later if a.event.name == "curl"] == ["node-new-2"]
