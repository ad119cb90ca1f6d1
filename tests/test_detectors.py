"""The six detectors and the alert policy, through the public `Scorer.process` -> Outcome.

A fleet of 8 nodes with periodic agents (tests/helpers_events.py) is learned for two days
with a one-day learning period; then each attack is scored against that history.
"""

import math
import re

import pytest
from helpers_events import DAY, HOUR, MINUTE, T0, Agent, ev, fleet_events

from scoring.allowlist import parse_exception
from scoring.detectors import DETECTOR_NAMES
from scoring.events import Event
from scoring.known_callers import KnownCallerCatalog, script_of
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

HOSTS = 8
END = T0 + 2 * DAY  # the fleet history ends here
RULE_PROCESS = "Unusual Linux Process Calling the Metadata Service"
RULE_USER = "Unusual Linux User Calling the Metadata Service"


@pytest.fixture(scope="module")
def history():
    return fleet_events(hosts=HOSTS, days=2)


def train(history, exceptions=(), **settings):
    settings.setdefault("learning_period", DAY)
    scorer = Scorer(ScorerSettings(**settings), exceptions=exceptions)
    outcomes = [scorer.process(e) for e in history]
    return scorer, outcomes


@pytest.fixture(scope="module")
def baseline(history):
    """(scorer, outcomes) after the history; tests that mutate it must train their own."""
    return train(history)


def fresh(history, **kw):
    return train(history, **kw)[0]


def numbers_in(text):
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


def assert_alert(out, detector, threshold=50.0):
    """`detector` fires on this event and the event is an alert with a numeric reason."""
    assert out is not None
    assert out.alert, out
    assert out.scores[detector] >= threshold, out.scores
    assert out.score >= 50 and out.detector in out.scores
    assert out.scores[out.detector] == out.score
    assert not (out.learning or out.suppressed or out.excepted)
    # One sentence that carries the numbers behind it: span of history and host count.
    assert out.reason and "\n" not in out.reason
    assert f"on {HOSTS} hosts" in out.reason, out.reason
    assert "2 days of history" in out.reason, out.reason
    assert len(numbers_in(out.reason)) >= 2
    assert out.severity in ("medium", "high", "critical")
    assert out.entity


# Raise every other detector's threshold out of reach, so `name` alone can alert.
def only(*names):
    return {d: 101.0 for d in DETECTOR_NAMES if d not in names}


# -- the quiet fleet ------------------------------------------------------------------------

def test_the_fleet_history_itself_raises_no_alert(baseline):
    _, outcomes = baseline
    assert all(o is not None for o in outcomes)
    assert not any(o.alert for o in outcomes)


def test_no_alerts_during_the_learning_period(history):
    # An attack 20 hours in: scored (and anomalous), but learning, so no alert.
    start = [e for e in history if e.ts < T0 + 20 * HOUR]
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    for e in start:
        assert not scorer.process(e).alert
    assert scorer.learning
    out = scorer.process(ev(T0 + 20 * HOUR, "xmrig", exe="/tmp/xmrig", host="node-1"))
    assert out.learning and not out.alert
    assert out.detector == "rare_process" and out.score >= 50
    # The same kind of attack once a day of event time has passed does alert.
    for e in history:
        if T0 + 20 * HOUR <= e.ts < T0 + DAY + HOUR:
            scorer.process(e)
    assert not scorer.learning
    out = scorer.process(ev(T0 + DAY + HOUR, "kinsing", exe="/tmp/kinsing", host="node-1"))
    assert out.alert and not out.learning and out.detector == "rare_process"


def test_learning_period_is_event_time_from_the_first_event():
    scorer = Scorer(ScorerSettings(learning_period=HOUR))
    assert scorer.learning
    for i in range(60):
        scorer.process(ev(T0 + i * MINUTE, "kubelet", exe="/usr/bin/kubelet"))
    assert scorer.learning  # 59 minutes seen
    scorer.process(ev(T0 + HOUR, "kubelet", exe="/usr/bin/kubelet"))
    assert not scorer.learning


def test_off_target_events_are_not_scored(baseline):
    scorer, _ = baseline
    assert scorer.process(ev(END, "curl", dst_ip="169.254.169.253", dst_port=53)) is None
    assert scorer.process(ev(END, "curl", dst_ip="10.0.0.1")) is None


# -- the six detectors, each on its own attack ---------------------------------------------

def test_rare_process_new_name(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "xmrig", exe="/tmp/xmrig", user="root", parent="bash",
                            host="node-3"))
    assert_alert(out, "rare_process")
    assert out.detector == "rare_process"
    assert out.rule_name == RULE_PROCESS
    assert "xmrig has never called the metadata service" in out.reason
    assert out.entity == "xmrig"
    # None of the detectors that judge a value *within* a process name has a say on a name
    # never seen before.
    for det in ("rare_executable", "rare_process_user", "rare_parent", "rare_container"):
        assert out.scores[det] < 50, out.scores


def test_rare_executable_masquerading_agent(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "amazon-ssm-agent", exe="/tmp/amazon-ssm-agent", user="root",
                            parent="systemd", host="node-3"))
    assert_alert(out, "rare_executable")
    assert out.detector == "rare_executable"
    assert "/tmp/amazon-ssm-agent" in out.reason
    assert "/usr/bin/amazon-ssm-agent" in out.reason  # where it usually runs from
    assert out.scores["rare_process"] < 50  # the name alone is perfectly common
    assert not out.known_caller  # name matches the catalog, executable does not


def test_rare_process_user_known_tool_run_by_www_data(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "curl", exe="/usr/bin/curl", user="www-data", parent="bash",
                            host="node-3"))
    assert_alert(out, "rare_process_user")
    assert "www-data" in out.reason
    assert "ec2-user" in out.reason  # who usually runs it
    # www-data is a known fleet user (node-probe), so the user rule stays quiet.
    assert out.scores["rare_user"] < 50
    assert out.scores["rare_process"] < 50


def test_rare_user_new_user_across_the_fleet(history):
    scorer = fresh(history)
    # `aws` is run by six operators, so one more user of `aws` is not remarkable; a user the
    # fleet has never seen call the metadata service is.
    out = scorer.process(ev(END, "aws", exe="/usr/local/bin/aws", user="mallory",
                            parent="bash", host="node-2"))
    assert_alert(out, "rare_user", threshold=75)
    assert "mallory" in out.reason
    assert out.scores["rare_process_user"] < 50


def test_rare_parent_python_started_by_nginx(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "python3", exe="/usr/bin/python3", user="app", parent="nginx",
                            image="registry.local/shop/api:2.3.1", namespace="shop",
                            host="node-4"))
    assert_alert(out, "rare_parent")
    assert "nginx" in out.reason


def test_rare_container_tool_in_unexpected_image_and_namespace(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "python3", exe="/usr/bin/python3", user="app",
                            parent="supervisord", image="docker.io/evil/miner:1",
                            namespace="default", host="node-4"))
    assert_alert(out, "rare_container")
    assert "docker.io/evil/miner" in out.reason and "default" in out.reason


def test_rare_container_unexpected_namespace_alone(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "python3", exe="/usr/bin/python3", user="app",
                            parent="supervisord", image="registry.local/shop/api:2.3.1",
                            namespace="kube-system", host="node-4"))
    assert_alert(out, "rare_container")


SPECIFIC_ATTACKS = {
    # detector: (event, words its reason must carry, rule name or None)
    "rare_process_user": (dict(name="curl", exe="/usr/bin/curl", user="www-data",
                               parent="bash", host="node-3"),
                          ["curl run by www-data", "ec2-user"], None),
    "rare_user": (dict(name="aws", exe="/usr/local/bin/aws", user="mallory", parent="bash",
                       host="node-2"), ["user mallory", "aws"], RULE_USER),
    "rare_parent": (dict(name="python3", exe="/usr/bin/python3", user="app", parent="nginx",
                         image="registry.local/shop/api:2.3.1", namespace="shop",
                         host="node-4"), ["python3 started by nginx", "supervisord"], None),
    "rare_container": (dict(name="python3", exe="/usr/bin/python3", user="app",
                            parent="supervisord", image="docker.io/evil/miner:1",
                            namespace="default", host="node-4"),
                       ["docker.io/evil/miner", "default", "registry.local/shop/api"], None),
}


def _specific(history, detector, **settings):
    kw, words, rule = SPECIFIC_ATTACKS[detector]
    kw = dict(kw)
    scorer = fresh(history, **settings)
    out = scorer.process(ev(END, kw.pop("name"), **kw))
    return out, words, rule


@pytest.mark.parametrize("detector", sorted(SPECIFIC_ATTACKS))
def test_each_detector_names_itself_when_it_alone_may_alert(history, detector):
    out, words, rule = _specific(history, detector, detector_thresholds=only(detector))
    assert_alert(out, detector, threshold=75 if detector == "rare_user" else 50)
    assert out.detector == detector
    for w in words:
        assert w in out.reason, out.reason
    if rule:
        assert out.rule_name == rule


@pytest.mark.parametrize("detector", sorted(SPECIFIC_ATTACKS))
def test_each_detector_names_itself_with_default_settings(history, detector):
    out, words, rule = _specific(history, detector)
    assert out.alert
    assert out.detector == detector, out
    for w in words:
        assert w in out.reason, out.reason


def test_a_new_image_tag_is_not_a_new_image(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "python3", exe="/usr/bin/python3", user="app",
                            parent="supervisord", image="registry.local/shop/api:2.4.0@sha256:ab",
                            namespace="shop", host="node-4"))
    assert not out.alert
    assert out.scores["rare_container"] < 50


def test_normal_behaviour_after_the_history_scores_low(history):
    scorer = fresh(history)
    for agent_event in fleet_events(hosts=HOSTS, days=0.1, start=END):
        out = scorer.process(agent_event)
        assert not out.alert and out.score < 50
        assert out.reason == ""


def test_rare_user_threshold_is_75(history):
    assert ScorerSettings().threshold_for("rare_user") == 75
    assert ScorerSettings().threshold_for("rare_process") == 50
    # The global threshold still applies when it is higher.
    assert ScorerSettings(threshold=80).threshold_for("rare_user") == 80
    # A smaller history, where a new user scores between 50 and 75; the other detectors'
    # thresholds are out of reach so that the user rule alone decides.
    small = fleet_events(hosts=3, days=2)
    scorer, _ = train(small, detector_thresholds={**only("rare_user"), "rare_user": 75.0})
    attack = ev(T0 + 2 * DAY, "aws", exe="/usr/local/bin/aws", user="mallory", host="node-0")
    out = scorer.process(attack)
    assert 50 <= out.scores["rare_user"] < 75, out.scores
    assert not out.alert
    # With the user rule lowered to the global 50, the very same event alerts.
    scorer, _ = train(small, detector_thresholds={**only("rare_user"), "rare_user": 50.0})
    out = scorer.process(attack)
    assert out.alert and out.detector == "rare_user"


def test_detector_threshold_can_be_raised(history):
    scorer = fresh(history, detector_thresholds={d: 99.9 for d in DETECTOR_NAMES})
    out = scorer.process(ev(END, "xmrig", exe="/tmp/xmrig", host="node-3"))
    assert out.scores["rare_process"] >= 50
    assert not out.alert and not out.reason


def test_global_threshold_higher_means_fewer_alerts(history):
    attacks = [
        ev(END, "xmrig", exe="/tmp/xmrig", host="node-3"),
        ev(END + 1, "amazon-ssm-agent", exe="/tmp/amazon-ssm-agent", parent="systemd"),
        ev(END + 2, "curl", exe="/usr/bin/curl", user="www-data", host="node-1"),
        ev(END + 3, "python3", exe="/usr/bin/python3", user="app", parent="nginx",
           image="registry.local/shop/api:2.3.1", namespace="shop"),
    ]
    counts = {}
    for threshold in (50.0, 85.0, 99.9):
        scorer = fresh(history, threshold=threshold)
        counts[threshold] = sum(scorer.process(a).alert for a in attacks)
    assert counts[50.0] == 4
    assert counts[50.0] > counts[85.0] > counts[99.9] == 0


def test_scores_are_within_0_and_100(baseline, history):
    _, outcomes = baseline
    scorer = fresh(history)
    outcomes = outcomes + [
        scorer.process(ev(END + i, f"tool{i}", exe=f"/tmp/t{i}", user=f"u{i}", parent=f"p{i}",
                          image=f"img{i}", namespace=f"ns{i}", host=f"node-{i % 9}"))
        for i in range(50)
    ]
    for o in outcomes:
        assert 0.0 <= o.score <= 100.0
        assert set(o.scores) <= set(DETECTOR_NAMES)
        for v in o.scores.values():
            assert 0.0 <= v <= 100.0 and not math.isnan(v)
        if o.score > 0:
            assert o.detector in o.scores and o.score == o.scores[o.detector]
        else:
            # Nothing above the noise floor: no detector is named, and no alert.
            assert o.detector is None and not o.alert and not o.reason


def test_severity_follows_score(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "xmrig", exe="/tmp/xmrig", host="node-3"))
    expected = ("critical" if out.score >= 90 else "high" if out.score >= 75 else "medium")
    assert out.severity == expected


# -- population awareness ----------------------------------------------------------------

def test_name_seen_on_most_hosts_is_not_rare(history):
    scorer = fresh(history)
    # A boot-time helper ran once on 6 of the 8 nodes, yesterday.
    for h in range(6):
        scorer.process(ev(END - DAY + h * HOUR, "node-bootstrap", exe="/opt/boot/node-bootstrap",
                          host=f"node-{h}"))
    # It runs on node-7 at its boot now, and on a brand new node joining the fleet.
    for host in ("node-7", "node-new"):
        out = scorer.process(ev(END, "node-bootstrap", exe="/opt/boot/node-bootstrap",
                                host=host))
        assert not out.alert
        assert out.scores["rare_process"] < 50


def test_collector_rollout_stops_alerting_once_on_several_hosts(history):
    scorer = fresh(history)
    collector = Agent("otelcol-contrib", "/otelcol-contrib", "root", "containerd-shim",
                      5 * MINUTE, image="otel/opentelemetry-collector-contrib:0.98.0",
                      namespace="observability")
    # Rolled out to every node within 16 minutes, then calling every 5 minutes for 6 hours.
    rollout = []
    for h in range(HOSTS):
        t = END + h * 2 * MINUTE
        while t < END + 6 * HOUR:
            rollout.append(ev(t, collector.name, exe=collector.exe, user=collector.user,
                              parent=collector.parent, image=collector.image,
                              namespace=collector.namespace, host=f"node-{h}"))
            t += collector.period
    rollout += fleet_events(hosts=HOSTS, days=0.25, start=END)
    rollout.sort(key=lambda e: e.ts)
    alerts_by_host: dict[str, int] = {}
    hosts_seen: set[str] = set()
    for e in rollout:
        out = scorer.process(e)
        if e.name != collector.name:
            assert not out.alert
            continue
        if e.host not in hosts_seen and len(hosts_seen) >= HOSTS // 2:
            # Once on half the fleet, a new node starting it is not rare.
            assert out.score < 50, (e.host, out)
        hosts_seen.add(e.host)
        if out.alert:
            alerts_by_host[e.host] = alerts_by_host.get(e.host, 0) + 1
    assert all(n == 1 for n in alerts_by_host.values()), alerts_by_host
    assert len(alerts_by_host) <= HOSTS // 2
    # The first node of the rollout is new behaviour and may alert; the point is that the
    # rollout does not alert on every node.
    assert len(alerts_by_host) < HOSTS


def test_same_attack_on_a_second_host_still_alerts(history):
    scorer = fresh(history)
    first = scorer.process(ev(END, "curl", exe="/usr/bin/curl", user="www-data", host="node-3"))
    assert first.alert and first.detector == "rare_process_user"
    # The first host is no evidence that the value is common across the fleet, so the
    # second host still scores as anomalous; within the suppression window it does not
    # alert again but shows in the anomaly metrics with its host.
    second = scorer.process(ev(END + 5 * MINUTE, "curl", exe="/usr/bin/curl", user="www-data",
                               host="node-5"))
    assert second.suppressed and second.reason and second.score >= 50, second


# -- decay ----------------------------------------------------------------------------------

def test_decay_lowers_the_weight_of_old_history(history):
    # A migration job called the metadata service 200 times on every node in the first
    # hour, then never again. Two days later it runs once more.
    def run(half_life):
        migration = [ev(T0 + 60 + i * 15 + h, "db-migrate", exe="/opt/app/db-migrate",
                        host=f"node-{h}") for h in range(HOSTS) for i in range(200)]
        scorer = Scorer(ScorerSettings(learning_period=DAY, half_life=half_life))
        for e in sorted(history + migration, key=lambda e: e.ts):
            scorer.process(e)
        return scorer.process(ev(END, "db-migrate", exe="/opt/app/db-migrate", host="node-1"))

    remembered = run(14 * DAY)
    faded = run(3 * HOUR)  # 16 half-lives later: the 1,600 calls weigh ~0.02
    assert remembered.scores["rare_process"] == pytest.approx(0.0, abs=1.0)
    assert faded.scores["rare_process"] > remembered.scores["rare_process"] + 15


def test_tiny_half_life_over_a_long_time_stays_finite(history):
    # 2 days at a 60 s half-life: thousands of half-lives; weights must stay finite.
    scorer, outcomes = train(history, half_life=60.0)
    new = scorer.process(ev(END, "xmrig", exe="/tmp/xmrig", host="node-3"))
    common = scorer.process(ev(END + 1, "kubelet", exe="/usr/bin/kubelet", user="root",
                               parent="systemd", host="node-3"))
    for o in [*outcomes, new, common]:
        assert 0.0 <= o.score <= 100.0
        assert all(0.0 <= v <= 100.0 and not math.isnan(v) for v in o.scores.values())
    # A minute of memory is too little to call anything rare, but the order holds.
    assert new.score >= common.score
    assert not common.alert


# -- suppression ------------------------------------------------------------------------------

def _big_fleet_scorer():
    # 40 nodes, threshold 5: an entity seen on one node keeps scoring ~7.6 on repeats, so the
    # suppression policy (not the model) decides whether the repeat is an alert.
    hist = fleet_events(hosts=40, days=1.1, agents=(
        Agent("kubelet", "/usr/bin/kubelet", "root", "systemd", 10 * MINUTE),
        Agent("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root", "systemd", 10 * MINUTE),
    ))
    scorer = Scorer(ScorerSettings(learning_period=DAY, threshold=5.0,
                                   suppression_window=HOUR))
    for e in hist:
        scorer.process(e)
    return scorer, hist[-1].ts + 1


def test_suppression_one_alert_per_entity_per_host_per_window():
    scorer, t = _big_fleet_scorer()

    def call(dt, host="node-3"):
        return scorer.process(ev(t + dt, "xmrig", exe="/tmp/xmrig", host=host))

    first = call(0)
    assert first.alert and first.detector == "rare_process"
    repeat = call(10 * MINUTE)
    assert repeat.detector == "rare_process" and repeat.score >= 5.0
    assert repeat.suppressed and not repeat.alert and repeat.reason
    assert call(59 * MINUTE).suppressed
    # After the window, the same entity on the same host alerts again...
    again = call(HOUR + 1)
    assert again.alert and not again.suppressed, again
    # ... and opens a new window.
    assert call(HOUR + 2 * MINUTE).suppressed


def test_suppression_is_fleet_wide():
    # A rollout or a worm reaching several nodes within the window raises one alert.
    scorer, t = _big_fleet_scorer()
    assert scorer.process(ev(t, "xmrig", exe="/tmp/xmrig", host="node-3")).alert
    other = scorer.process(ev(t + 5 * MINUTE, "xmrig", exe="/tmp/xmrig", host="node-7"))
    assert other.suppressed and not other.alert and other.reason, other


def test_suppression_is_per_entity():
    scorer, t = _big_fleet_scorer()
    assert scorer.process(ev(t, "xmrig", exe="/tmp/xmrig", host="node-3")).alert
    other = scorer.process(ev(t + 5 * MINUTE, "kinsing", exe="/tmp/kinsing", host="node-3"))
    assert other.alert and not other.suppressed, other


def test_suppression_window_is_configurable():
    scorer, t = _big_fleet_scorer()
    assert scorer.process(ev(t, "xmrig", exe="/tmp/xmrig", host="node-3")).alert
    assert scorer.process(ev(t + 2 * HOUR, "xmrig", exe="/tmp/xmrig", host="node-3")).alert


# -- exceptions -----------------------------------------------------------------------------

BACKUP = {"name": "backup-agent", "executable": "/opt/backup/bin/backup-agent"}


def backup_event(t=END, **kw):
    kw.setdefault("exe", "/opt/backup/bin/backup-agent")
    kw.setdefault("user", "backup")
    kw.setdefault("host", "node-2")
    return ev(t, "backup-agent", **kw)


def test_exception_by_name_and_executable_allows(history):
    scorer = fresh(history, exceptions=(parse_exception(BACKUP),))
    out = scorer.process(backup_event())
    assert out.excepted and not out.alert
    assert out.detector == "rare_process" and out.score >= 50  # still scored
    assert out.reason


def test_exception_never_allows_the_same_name_from_another_path(history):
    scorer = fresh(history, exceptions=(parse_exception(BACKUP),))
    out = scorer.process(backup_event(exe="/tmp/backup-agent"))
    assert out.alert and not out.excepted


def test_exception_for_another_name_does_not_match(history):
    scorer = fresh(history, exceptions=(parse_exception(BACKUP),))
    out = scorer.process(ev(END, "backup-agent2", exe="/opt/backup/bin/backup-agent"))
    assert out.alert and not out.excepted


def test_exception_narrowed_by_user(history):
    rule = parse_exception({**BACKUP, "user": "backup"})
    assert fresh(history, exceptions=(rule,)).process(backup_event(user="backup")).excepted
    out = fresh(history, exceptions=(rule,)).process(backup_event(user="root"))
    assert out.alert and not out.excepted


def test_exception_narrowed_by_image_and_namespace_globs(history):
    rule = parse_exception({**BACKUP, "image": "registry.local/agents/*",
                            "namespace": "ops-*"})

    def outcome(**kw):
        return fresh(history, exceptions=(rule,)).process(backup_event(**kw))

    ok = outcome(image="registry.local/agents/backup:1", namespace="ops-prod")
    assert ok.excepted and not ok.alert
    wrong_image = outcome(image="docker.io/backup:1", namespace="ops-prod")
    assert not wrong_image.excepted and wrong_image.alert
    wrong_ns = outcome(image="registry.local/agents/backup:1", namespace="default")
    assert not wrong_ns.excepted and wrong_ns.alert
    no_container = outcome()
    assert not no_container.excepted and no_container.alert


def test_exception_restricted_to_detectors(history):
    rule = parse_exception({**BACKUP, "detectors": ["rare_user"]})
    scorer = fresh(history, exceptions=(rule,))
    out = scorer.process(backup_event())
    assert out.detector == "rare_process"
    assert out.alert and not out.excepted


def test_exception_matches_truncated_comm(history):
    rule = parse_exception({"name": "company-backup-agent",
                            "executable": "/opt/backup/bin/company-backup-agent"})
    scorer = fresh(history, exceptions=(rule,))
    out = scorer.process(ev(END, "company-backup-", exe="/opt/backup/bin/company-backup-agent",
                            host="node-2"))
    assert out.excepted and not out.alert


def test_excepted_event_is_still_learned(history):
    scorer = fresh(history, exceptions=(parse_exception(BACKUP),))
    assert scorer.process(backup_event()).excepted
    # Learned: the second call's reason counts the first one, and is excepted again.
    again = scorer.process(backup_event(t=END + 60))
    assert "1 time" in again.reason, again.reason
    assert again.excepted and not again.alert


@pytest.mark.parametrize(("spec", "words"), [
    ({"name": "backup-agent"}, "executable"),
    ({"executable": "/opt/backup/bin/backup-agent"}, "name"),
    ({"name": "backup-agent", "executable": ""}, "executable"),
    ({"name": "backup-agent", "executable": "backup-agent"}, "absolute"),
    ({"name": "backup-agent", "executable": "*/backup-agent"}, "absolute"),
    ({"name": "backup-agent", "executable": "/*"}, "absolute"),
    ({**BACKUP, "usr": "backup"}, "usr"),
    ({**BACKUP, "detectors": "rare_user"}, "detectors"),
])
def test_exception_validation(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_exception(spec)


# -- known callers --------------------------------------------------------------------------

EBS_IMAGE = "public.ecr.aws/ebs-csi-driver/aws-ebs-csi-driver:v1.30.0"
CNI_IMAGE = "602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni:v1.18.1@sha256:ab"
CNS_IMAGE = "mcr.microsoft.com/containernetworking/azure-cns:v1.5.26"
GMS_IMAGE = "gke.gcr.io/gke-metadata-server:20240425_2300_RC0"


@pytest.mark.parametrize(("name", "exe", "image", "known"), [
    ("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", None, True),
    ("amazon-ssm-agent", "/snap/amazon-ssm-agent/7993/amazon-ssm-agent", None, True),
    ("amazon-ssm-agent", "/tmp/amazon-ssm-agent", None, False),
    ("amazon-ssm-agent", None, None, False),
    ("kubelet", "/usr/bin/kubelet", None, True),
    ("kubelet", "/home/user/kubelet", None, False),
    ("curl", "/usr/bin/curl", None, False),
    ("google_guest_agent", "/usr/bin/google_guest_agent", None, True),
    # comm is 15 bytes: google_osconfig_agent -> google_osconfig
    ("google_osconfig", "/usr/bin/google_osconfig_agent", None, True),
    ("google_osconfig_agent", "/usr/bin/google_osconfig_agent", None, True),
    ("google_osconfig", "/tmp/google_osconfig_agent", None, False),
    ("ecr-credential-", "/etc/eks/image-credential-provider/ecr-credential-provider", None,
     True),
    ("waagent", "/usr/sbin/waagent", None, True),
    ("cloud-init", "/usr/bin/cloud-init", None, True),
    ("yum", "/usr/bin/python2.7", None, False),  # an interpreter alone: anyone's script
    ("kubelet", "/usr/bin/amazon-ssm-agent", None, False),  # a known path under another name
    # Agents shipped as images are bound to their vendor's repositories: the
    # path alone is one any image can use.
    ("aws-ebs-csi-dri", "/bin/aws-ebs-csi-driver", EBS_IMAGE, True),
    ("aws-ebs-csi-dri", "/bin/aws-ebs-csi-driver", None, False),
    ("aws-ebs-csi-dri", "/bin/aws-ebs-csi-driver", "evil.io/aws-ebs-csi-driver:1", False),
    ("aws-k8s-agent", "/app/aws-k8s-agent", CNI_IMAGE, True),
    ("aws-k8s-agent", "/app/aws-k8s-agent", "docker.io/attacker/amazon-k8s-cni:v1", False),
    ("aws-k8s-agent", "/app/aws-k8s-agent",
     "123456789012.dkr.ecr.us-east-1.amazonaws.com/amazon-k8s-cni:v1", False),
    ("azure-cns", "/usr/local/bin/azure-cns", CNS_IMAGE, True),
    ("gke-metadata-se", "/gke-metadata-server", GMS_IMAGE, True),
    ("gke-metadata-se", "/gke-metadata-server", None, False),
    # A host agent's path from inside a container is not the host agent.
    ("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "docker.io/library/ubuntu:22.04", False),
    ("kubelet", "/usr/bin/kubelet", "registry.local/kubelet:1", False),
])
def test_known_caller_catalog_binds_name_executable_and_place(name, exe, image, known):
    assert (KnownCallerCatalog().lookup(name, exe, image, image is not None) is not None
            ) is known
    scorer = Scorer(ScorerSettings(learning_period=0))
    out = scorer.process(ev(T0, name, exe=exe or "/x", image=image))
    if exe is not None:
        assert out.known_caller is known


@pytest.mark.parametrize(("name", "exe", "command_line", "known"), [
    ("yum", "/usr/bin/python2.7", "/usr/bin/python2 /usr/bin/yum -q makecache fast", True),
    ("yum", "/usr/bin/python3.9", "/usr/bin/python3 -s /usr/bin/yum install -y jq", True),
    # the shebang-run form an export may keep: the first word is the script itself
    ("yum", "/usr/bin/python3.9", "/usr/bin/yum makecache", True),
    ("dnf", "/usr/libexec/platform-python3.6", "/usr/libexec/platform-python /usr/bin/dnf "
     "makecache", True),
    ("cloud-init", "/usr/bin/python3.11", "/usr/bin/python3 -Es /usr/bin/cloud-init init",
     True),
    ("waagent", "/usr/bin/python3.10", "python3 -u /usr/sbin/waagent -daemon", True),
    # a script of its own at /tmp/yum, run through its shebang or by hand
    ("yum", "/usr/bin/python3.9", "/usr/bin/python3 /tmp/yum", False),
    ("yum", "/usr/bin/python3.9", "/tmp/yum makecache", False),
    ("waagent", "/usr/bin/python3.10", "python3 -u /home/u/waagent -daemon", False),
    ("cloud-init", "/usr/bin/python3.11", "python3 -c 'import os'", False),
    ("cloud-init", "/usr/bin/python3.11", "python3 -m cloudinit.cmd.main", False),
    ("yum", "/usr/bin/python3.9", "python3 yum", False),  # relative: no file to vouch for
    ("yum", "/usr/bin/python3.9", None, False),
    # the real script, but not run by an interpreter of the vendor's
    ("yum", "/tmp/python3", "/tmp/python3 /usr/bin/yum", False),
    ("yum", "/usr/bin/perl", "/usr/bin/perl /usr/bin/yum", False),
])
def test_interpreted_agents_are_their_interpreter_and_their_script(name, exe, command_line,
                                                                   known):
    e = ev(T0, name, exe=exe, command_line=command_line)
    assert (KnownCallerCatalog().lookup_event(e) is not None) is known
    assert Scorer(ScorerSettings(learning_period=0)).process(e).known_caller is known


@pytest.mark.parametrize(("command_line", "script"), [
    ("/usr/bin/python3 /usr/bin/yum", "/usr/bin/yum"),
    ("/usr/bin/python3 -W ignore -X dev /usr/bin/yum x", "/usr/bin/yum"),
    ("python3 -- /usr/bin/yum", "/usr/bin/yum"),
    ("/usr/bin/yum -y", "/usr/bin/yum"),
    ("python3 'unbalanced", None),
    ("python3", None),
    ("", None),
])
def test_script_of(command_line, script):
    assert script_of("/usr/bin/python3.11", command_line) == script


def test_fake_yum_credential_request_gets_no_discount():
    """The reviewer's case: /tmp/yum with a python3 shebang asks for the role's credentials
    without the header on a fresh node; the genuine yum is discounted, the script is not."""
    def creds(script, ts):
        return Event(ts, "169.254.169.254", "yum", dst_port=80, exe="/usr/bin/python3.9",
                     command_line=f"/usr/bin/python3 {script} makecache", user="root",
                     parent_name="bash", host="n", method="GET",
                     path="/latest/meta-data/iam/security-credentials/role", guarded=False,
                     user_agent="python-requests/2.31")
    real = Scorer(ScorerSettings(learning_period=86400)).process(creds("/usr/bin/yum", T0))
    fake = Scorer(ScorerSettings(learning_period=86400)).process(creds("/tmp/yum", T0))
    assert real.known_caller and not real.alert
    assert not fake.known_caller
    assert fake.alert and fake.detector == "unguarded_credential_request"
    assert fake.score >= 90


@pytest.mark.parametrize(("image", "known"), [
    ("602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni:v1.18.1", True),
    ("602401143452.dkr.ecr.eu-north-1.amazonaws.com/amazon-k8s-cni:v1.18.1", True),
    ("602401143452.dkr.ecr.evil.example/x.amazonaws.com/amazon-k8s-cni:v1", False),
    ("602401143452.dkr.ecr.evil.amazonaws.com/amazon-k8s-cni:v1", False),
    ("602401143452.dkr.ecr.us-west-2.amazonaws.com.evil.example/amazon-k8s-cni:v1", False),
    ("602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni-evil:v1", False),
])
def test_eks_registry_hosts_are_matched_exactly_per_region(image, known):
    assert (KnownCallerCatalog().lookup("aws-k8s-agent", "/app/aws-k8s-agent", image, True)
            is not None) is known


def test_a_container_id_without_an_image_is_still_a_container():
    # Some exports carry container.id but no image name: a host path there is not the agent.
    e = ev(T0, "amazon-ssm-agent", exe="/usr/bin/amazon-ssm-agent")
    e.container_id = "c0ffee"
    assert KnownCallerCatalog().lookup_event(e) is None
    e.container_id = None
    assert KnownCallerCatalog().lookup_event(e) is not None


def test_known_caller_lowers_score_but_impostor_alerts(history):
    # An AWS fleet has never seen the GCP guest agent; the genuine binary is vouched for.
    scorer = fresh(history)
    genuine = scorer.process(ev(END, "google_guest_agent", exe="/usr/bin/google_guest_agent",
                                user="root", parent="systemd", host="node-1"))
    assert genuine.known_caller
    assert not genuine.alert and genuine.score < 50
    scorer = fresh(history)
    impostor = scorer.process(ev(END, "google_guest_agent", exe="/tmp/google_guest_agent",
                                 user="root", parent="systemd", host="node-1"))
    assert not impostor.known_caller
    assert impostor.alert and impostor.detector == "rare_process"
    # The factor is 0.3 by default: the genuine score is the impostor's scaled down.
    assert genuine.scores["rare_process"] == pytest.approx(
        0.3 * impostor.scores["rare_process"], rel=1e-6)


def test_known_caller_with_an_unusual_user_still_alerts(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "amazon-ssm-agent", exe="/usr/bin/amazon-ssm-agent",
                            user="www-data", parent="systemd", host="node-1"))
    assert out.known_caller
    assert_alert(out, "rare_process_user")


def test_known_caller_with_an_unusual_parent_still_alerts(history):
    scorer = fresh(history)
    out = scorer.process(ev(END, "amazon-ssm-agent", exe="/usr/bin/amazon-ssm-agent",
                            user="root", parent="nginx", host="node-1"))
    assert out.known_caller
    assert_alert(out, "rare_parent")


def test_known_caller_factor_one_disables_the_discount(history):
    scorer = fresh(history, known_caller_factor=1.0)
    out = scorer.process(ev(END, "google_guest_agent", exe="/usr/bin/google_guest_agent",
                            user="root", parent="systemd", host="node-1"))
    assert out.known_caller and out.alert
