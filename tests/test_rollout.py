# Metadata addresses in this file are data (event fields): nothing here connects to them.
"""A fleet-wide rollout is one event (issue 20): a new caller spreading over the fleet, or a
known caller's new version on every node, gives at most one alert; an attacker's one-off in
the middle of it still alerts."""

from __future__ import annotations

from helpers_events import DAY, HOUR, MINUTE, T0, Agent, ev, fleet_events
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
