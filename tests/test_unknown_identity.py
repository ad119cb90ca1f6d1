# Metadata addresses in this file are data (event fields): nothing here connects to them.
"""Unknown is unknown, never new (issue 20, contract section 6): an event that lacks part of
its caller's identity (executable, parent, command line, user), live or in an export, is
judged on what it carries; no detector treats the missing field as a new value."""

from __future__ import annotations

import orjson
from helpers_events import DAY, HOUR, MINUTE, T0, ev, fleet_events, stripped, to_ecs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporters.alerts import build_alert
from intake.parser import event_from_ecs
from scoring.events import Event
from scoring.scorer import Scorer
from scoring.state import model_from_bytes, model_to_bytes

IDENTITY = ("exe", "parent_name", "ppid", "parent_exe", "command_line", "user", "uid")


def warm(events: list[Event]) -> Scorer:
    s = Scorer()
    for e in events:
        s.process(e)
    return s


def test_a_known_caller_whose_repeats_lack_exe_and_parent_stays_quiet():
    """The issue's case: a known curl calls three times in a row, the last two losing the
    race with /proc (no executable, no parent). None alerts."""
    s = warm(fleet_events(hosts=8, days=2))
    t = T0 + 2 * DAY + HOUR
    full = ev(t, "curl", exe="/usr/bin/curl", user="ec2-user", parent="bash", host="node-3")
    outs = [s.process(full)]
    for k in (1, 2):
        outs.append(s.process(stripped(ev(t + k, "curl", exe="/usr/bin/curl", user="ec2-user",
                                          parent="bash", host="node-3"),
                                       ("exe", "parent_name", "command_line"))))
    assert [o.alert for o in outs] == [False, False, False], [o.reason for o in outs]
    assert all(o.score < 50 for o in outs)


def test_a_new_caller_lacking_its_executable_still_alerts_and_says_what_was_missing():
    s = warm(fleet_events(hosts=8, days=2))
    out = s.process(stripped(ev(T0 + 2 * DAY + HOUR, "xmrig", user="nobody", host="node-1"),
                             ("exe", "parent_name")))
    assert out.alert, out
    assert out.detector != "rare_executable" and out.detector != "rare_parent"
    assert "executable and parent unknown: judged without them" in out.reason
    assert "unknown executable" not in out.entity


def test_a_missing_field_is_never_the_value_a_detector_judges():
    s = warm(fleet_events(hosts=8, days=2))
    t = T0 + 2 * DAY + HOUR
    out = s.process(stripped(ev(t, "curl", exe="/usr/bin/curl", user="ec2-user", parent="bash",
                                host="node-2"), ("exe", "parent_name", "user", "uid")))
    # Judged by what is known (curl is common): rare_executable, rare_parent and the user
    # detectors abstain; the combination is judged without executable, parent and user.
    assert set(out.scores) <= {"rare_process", "rare_container", "rare_combination"}
    assert not out.alert


def test_a_known_agent_without_its_executable_is_not_flagged_by_the_no_history_rule():
    """On a fresh node (no history, learning) a known agent's unguarded identity request
    whose executable was lost: the rule needs the catalog's word, which it cannot have."""
    s = Scorer()
    e = stripped(Event(T0, "169.254.169.254", "amazon-ssm-agent", 80, user="root",
                       parent_name="systemd", method="GET", host="n",
                       path="/latest/dynamic/instance-identity/document", guarded=False),
                 ("exe",))
    out = s.process(e)
    assert "unguarded_credential_request" not in out.scores and not out.alert
    # A name no agent has is still judged by the rule without its executable.
    e2 = stripped(Event(T0 + 1, "169.254.169.254", "curl", 80, user="root",
                        parent_name="bash", method="GET", host="n",
                        path="/latest/meta-data/iam/security-credentials/role", guarded=False),
                  ("exe",))
    out2 = s.process(e2)
    assert out2.alert and out2.detector == "unguarded_credential_request", out2


def test_a_catalog_agent_without_its_executable_is_vouched_for_where_it_runs():
    """nodeadm (a host agent of the catalog) boots a new node, its executable lost: the
    name is the agent's where the agent runs, as its complete event would be. The same
    name in a container of another image is not vouched for."""
    s = warm(fleet_events(hosts=8, days=2))
    t = T0 + 2 * DAY + HOUR
    out = s.process(stripped(ev(t, "nodeadm", parent="systemd", host="node-7"),
                             ("exe", "parent_name")))
    assert out.known_caller and not out.alert, out
    out = s.process(stripped(ev(t + 60, "nodeadm", parent="systemd", host="node-6",
                                image="docker.io/evil/tools:1"), ("exe", "parent_name")))
    assert not out.known_caller and out.alert, out
    assert "(unknown executable)" not in out.reason and "unknown parent" not in out.reason


def test_identity_missing_makes_the_named_fields_absent():
    doc = to_ecs(ev(T0, "curl", exe="/usr/bin/curl", parent="bash", user="root"))
    doc["process"]["executable"] = "?"
    doc["imdswatch"] = {"identity": {"missing": ["process.executable", "process.parent.name",
                                                 "process.no.such.field"]}}
    e = event_from_ecs(doc)
    assert e.exe is None and e.parent_name is None and e.user == "root"
    doc["imdswatch"] = {"identity": {"missing": "user.name"}}
    assert event_from_ecs(doc).user is None


def test_the_alert_shows_the_fields_the_join_filled():
    from intake.ecs_schema import decoder
    from intake.join import ProcessJoin
    from intake.parser import read_doc

    join = ProcessJoin()
    proc = {"@timestamp": "2024-05-01T00:00:00Z", "event": {"category": "process"},
            "user": {"name": "www-data", "id": "33"},
            "process": {"entity_id": "P1", "name": "xmrig", "executable": "/tmp/xmrig",
                        "command_line": "xmrig --token=hunter2secret",
                        "parent": {"entity_id": "P0", "name": "bash", "pid": 7}}}
    join.learn(decoder().decode(orjson.dumps(proc)), T0)
    net = {"@timestamp": "2024-05-01T00:00:01Z", "destination": {"ip": "169.254.169.254"},
           "event": {"action": "connection_attempted"},
           "process": {"entity_id": "P1", "name": "xmrig"}}
    line = orjson.dumps(net)
    d = decoder().decode(line)
    e, _ = read_doc(d, raw=line)
    join.fill(e, d)
    s = warm(fleet_events(hosts=4, days=2))
    e.ts = T0 + 2 * DAY + HOUR
    out = s.process(e)
    assert out.alert
    alert = build_alert(out)
    assert alert["process"]["executable"] == "/tmp/xmrig"
    assert alert["process"]["parent"]["name"] == "bash"
    assert "hunter2secret" not in alert["process"]["command_line"]
    assert alert["user"] == {"name": "www-data", "id": "33"}
    assert set(alert["imdswatch"]["identity"]["filled"]) >= {
        "process.executable", "process.command_line", "process.parent.name", "user.name"}


# -- the property, across every detector ---------------------------------------------------

# What an event can lack, as the agent loses it or an export leaves it out.
GROUPS = {"exe": ("exe",), "parent": ("parent_name", "ppid", "parent_exe"),
          "command_line": ("command_line",), "user": ("user", "uid")}
NAMES = ("curl", "wget", "python3", "app", "tool")
USERS = ("root", "app", "www-data", "nobody")
PATHS = (None, "/latest/meta-data/instance-id", "/latest/meta-data/iam/security-credentials/r",
         "/latest/api/token", "/latest/user-data")


def _caller_event(ts: float, name: str, user: str, host: int, path: str | None,
                  guarded: bool, ua: str | None) -> Event:
    # One executable and parent per name: the history knows each caller by its name
    # (and user), so a coarser level holds exactly the complete caller's history.
    k = NAMES.index(name)
    return Event(ts, "169.254.169.254", name, 80, exe=f"/opt/{name}/bin/{name}",
                 command_line=f"{name} --x", ppid=1, parent_name=("bash", "systemd")[k % 2],
                 user=user, uid=str(1000 + USERS.index(user)), host=f"node-{host}",
                 method="GET" if path else None, path=path,
                 guarded=guarded if path else None, user_agent=ua if path else None)


def _request():
    return (st.sampled_from(PATHS), st.booleans(),
            st.sampled_from((None, "curl/8", "python-urllib")))


# Each name has one user here, so even losing the user leaves the caller known.
one_user = st.sampled_from(NAMES).flatmap(
    lambda n: st.tuples(st.just(n), st.just(USERS[NAMES.index(n) % len(USERS)]),
                        st.integers(0, 5), *_request()))
any_user = st.tuples(st.sampled_from(NAMES), st.sampled_from(USERS), st.integers(0, 5),
                     *_request())


def _check(history: list, probe: tuple, drop: set[str]) -> None:
    events = fleet_events(hosts=4, days=1, start=T0)
    events += [_caller_event(T0 + DAY + dt, *c) for dt, c in history]
    events.sort(key=lambda e: e.ts)
    model = model_to_bytes(warm(events))
    full = _caller_event(T0 + 4 * DAY + MINUTE, *probe)
    partial = stripped(full, [f for g in drop for f in GROUPS[g]])
    a, b = Scorer(), Scorer()
    model_from_bytes(a, model)
    model_from_bytes(b, model)
    out_full = a.process(full)
    out_partial = b.process(partial)
    for name, score in out_partial.scores.items():
        # A coarser level has fewer distinct values than the complete one, so its novelty
        # mass is a little smaller: a value that is rare anyway may score a shade higher
        # there, never by a point.
        assert score <= out_full.scores.get(name, 0.0) + 1.0, (name, out_partial, out_full)
    if out_partial.alert:
        assert out_full.anomalous, (out_partial.reason, out_full)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(st.tuples(st.floats(0, 3 * DAY), one_user), min_size=1, max_size=50),
       probe=one_user, drop=st.sets(st.sampled_from(tuple(GROUPS)), min_size=1))
def test_removing_any_identity_field_never_raises_a_score(history, probe, drop):
    """Against one history, an event with identity fields removed scores on no detector
    more than the complete event does (within a point), and alerts only where the complete event is
    anomalous too: a missing field is never a new value."""
    _check(history, probe, drop)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(st.tuples(st.floats(0, 3 * DAY), any_user), min_size=1, max_size=50),
       probe=any_user,
       drop=st.sets(st.sampled_from(("exe", "parent", "command_line")), min_size=1))
def test_losing_exe_parent_or_command_line_never_raises_a_score(history, probe, drop):
    """The short-lived caller's usual loss, with several users per name: judged as name,
    user and container, never above the complete event."""
    _check(history, probe, drop)


def with_uid(e: Event, uid: str, user: str | None) -> Event:
    e.uid, e.user = uid, user
    return e


def uid_fleet() -> list[Event]:
    """The fleet, where ec2-user (uid 1000) runs the aws CLI on node-1 every hour."""
    events = fleet_events(hosts=4, days=2)
    events += [with_uid(ev(T0 + k * HOUR + 17, "aws", exe="/usr/local/bin/aws", host="node-1"),
                        "1000", "ec2-user") for k in range(48)]
    return sorted(events, key=lambda e: e.ts)


def test_a_uid_without_its_name_is_the_user_it_names_there_not_another():
    """`uid:1000` where uid 1000 is ec2-user is ec2-user: the agent that could not read the
    name must not make a new user of it (nor the alert show one)."""
    s = warm(uid_fleet())
    e = with_uid(ev(T0 + 2 * DAY + 10, "aws", exe="/usr/local/bin/aws", host="node-1"),
                 "1000", None)
    out = s.process(e)
    assert e.user == "ec2-user"
    assert not out.alert and out.score < 50, out
    assert not any(d in out.scores and out.scores[d] >= 50
                   for d in ("rare_user", "rare_process_user"))


def test_a_uid_is_named_only_where_that_name_was_seen():
    """uid 1000 is someone else on another host, or in a container image: there it stays
    `uid:1000`, judged as a user of its own."""
    s = warm(uid_fleet())
    elsewhere = with_uid(ev(T0 + 2 * DAY + 10, "aws", exe="/usr/local/bin/aws", host="node-2"),
                         "1000", None)
    in_image = with_uid(ev(T0 + 2 * DAY + 20, "aws", exe="/usr/local/bin/aws", host="node-1",
                           image="amazon/aws-cli:2.15.30", namespace="backup"), "1000", None)
    for e in (elsewhere, in_image):
        s.process(e)
        assert e.user is None


def test_a_uids_name_survives_a_saved_state():
    s = Scorer()
    model_from_bytes(s, model_to_bytes(warm(uid_fleet())))
    e = with_uid(ev(T0 + 2 * DAY + 10, "aws", exe="/usr/local/bin/aws", host="node-1"),
                 "1000", None)
    s.process(e)
    assert e.user == "ec2-user"


def test_a_missing_container_id_is_an_unknown_container_not_the_host():
    doc = to_ecs(ev(T0, "python3", exe="/usr/bin/python3", user="app", parent="supervisord"))
    doc["imdswatch"] = {"identity": {"missing": ["container.id"]}}
    e = event_from_ecs(doc)
    assert e.container_unknown and e.container_id is None
    # A container's image or pod says it runs in one: only the id is missing then.
    in_pod = to_ecs(ev(T0, "python3", image="registry.local/shop/api:2.3.1", namespace="shop"))
    in_pod["imdswatch"] = {"identity": {"missing": ["container.id"]}}
    assert not event_from_ecs(in_pod).container_unknown


def test_an_app_whose_container_is_unknown_is_not_judged_as_a_host_process():
    """The shop's python3 only ever ran in its image: with its container unknown it is not
    "python3 in the host (no container)", a place it never called from."""
    s = warm(fleet_events(hosts=4, days=2))
    e = ev(T0 + 2 * DAY + 10, "python3", exe="/usr/bin/python3", user="app",
           parent="supervisord", host="node-1")
    host = s.process(ev(T0 + 2 * DAY + 5, "python3", exe="/usr/bin/python3", user="app",
                        parent="supervisord", host="node-2"))
    assert host.alert  # read as a host process, it is new there
    e.container_unknown = True
    out = s.process(e)
    assert not out.alert and "rare_container" not in out.scores and \
        "rare_combination" not in out.scores, out


def test_a_caller_with_an_unknown_container_is_still_judged_on_the_rest():
    s = warm(fleet_events(hosts=4, days=2))
    e = ev(T0 + 2 * DAY + 10, "python3", exe="/tmp/python3", user="app", parent="sh",
           host="node-1")
    e.container_unknown = True
    out = s.process(e)
    assert out.alert and out.reason.endswith("(container unknown: judged without it)"), out
