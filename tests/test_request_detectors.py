# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace.
"""Request-aware detectors, the no-blind-first-day rule and the scoring-level identity
rules (uid:N, empty and odd names), through the
public `Scorer.process` -> Outcome and through `imdswatch replay` on ECS NDJSON."""

import re
import subprocess
from pathlib import Path

import orjson
import pytest
from helpers_events import DAY, MINUTE, T0, rfc3339, write_ndjson
from hypothesis import given, settings
from hypothesis import strategies as st

from intake.parser import event_from_ecs
from scoring.detectors import DETECTOR_NAMES, REQUEST_DETECTORS, request_class, user_of
from scoring.events import Event
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

IMDS = "169.254.169.254"
ROOT = Path(__file__).resolve().parent.parent
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"
HOSTS = 8
END = T0 + 2 * DAY
STORE_IMG = "123456789012.dkr.ecr.us-east-1.amazonaws.com/storefront:3.2.0"
GCP_IMG = "us-docker.pkg.dev/acme/web/checkout:5.3.0"
CREDS = "/latest/meta-data/iam/security-credentials/storefront-role"
BOTO = "Boto3/1.34.0 md/Botocore#1.34.0 ua/2.0 os/linux#6.1 lang/python#3.11.8"


def req(ts, name, exe, user, method, path, *, guarded, ua, host="node-0", image=None,
        query=None, parent="containerd-shim", dst_ip=IMDS, dst_port=80, uid=None,
        command_line=None):
    return Event(ts, dst_ip, name, dst_port=dst_port, exe=exe, user=user, uid=uid,
                 parent_name=parent, host=host, image=image,
                 container_id=("c0ffee" + name) if image else None,
                 namespace="shop" if image else None, action="http_request", method=method,
                 path=path, query=query, user_agent=ua, guarded=guarded,
                 command_line=command_line)


YUM_CMD = "/usr/bin/python2 /usr/bin/yum -q makecache fast"


# (period, [request templates]) per caller: every call is a few requests, as SDKs make them.
def storefront(ts, host):
    return [req(ts, "python3", "/usr/local/bin/python3.11", "app", "PUT", "/latest/api/token",
                guarded=True, ua=BOTO, host=host, image=STORE_IMG),
            req(ts + 0.01, "python3", "/usr/local/bin/python3.11", "app", "GET",
                "/latest/meta-data/placement/region", guarded=True, ua=BOTO, host=host,
                image=STORE_IMG)]


def backup(ts, host):
    aws = ("aws", "/usr/local/bin/aws", "root")
    ua = "aws-cli/2.15.30 Python/3.11.8 Linux/6.1 exe/x86_64.amzn.2023"
    return [req(ts, *aws, "PUT", "/latest/api/token", guarded=True, ua=ua, host=host,
                parent="cron"),
            req(ts + 0.01, *aws, "GET", "/latest/meta-data/iam/security-credentials/backup",
                guarded=True, ua=ua, host=host, parent="cron")]


def ssm(ts, host):
    a = ("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root")
    ua = "aws-sdk-go/1.44.0 (go1.21; linux; amd64)"
    return [req(ts, *a, "PUT", "/latest/api/token", guarded=True, ua=ua, host=host,
                parent="systemd"),
            req(ts + 0.01, *a, "GET", "/latest/meta-data/instance-id", guarded=True, ua=ua,
                host=host, parent="systemd"),
            req(ts + 0.02, *a, "GET", "/latest/meta-data/iam/security-credentials/node",
                guarded=True, ua=ua, host=host, parent="systemd")]


def fluentbit(ts, host):
    return [req(ts, "fluent-bit", "/fluent-bit/bin/fluent-bit", "root", "GET",
                "/latest/meta-data/instance-id", guarded=True, ua=None, host=host,
                image="cr.fluentbit.io/fluent/fluent-bit:3.0.4")]


def gcp_app(ts, host):
    return [req(ts, "node", "/usr/local/bin/node", "node", "GET",
                "/computeMetadata/v1/instance/service-accounts/default/token", guarded=True,
                ua="google-api-nodejs-client/9.0.0", host=host, image=GCP_IMG)]


def exthandler(ts, host):
    return [req(ts, "python3", "/usr/bin/python3.10", "root", "GET", "/metadata/instance",
                query="api-version=2021-02-01", guarded=True, ua="WALinuxAgent/2.11.1.4",
                host=host, parent="waagent")]


def yum(ts, host):
    return [req(ts, "yum", "/usr/bin/python2.7", "root", "GET",
                "/latest/dynamic/instance-identity/document", guarded=False,
                ua="urlgrabber/3.10 yum/3.4.3", host=host, parent="bash",
                command_line=YUM_CMD)]


CALLERS = ((storefront, 10 * MINUTE), (ssm, 15 * MINUTE), (fluentbit, 60 * MINUTE),
           (gcp_app, 15 * MINUTE), (exthandler, 10 * MINUTE), (yum, 6 * 3600.0),
           (backup, 3600.0))


def history(hosts=HOSTS, days=2.0, start=T0):
    out = []
    for h in range(hosts):
        for k, (make, period) in enumerate(CALLERS):
            t = start + (h * 13 + k * 7) % period
            while t < start + days * DAY:
                out.extend(make(t, f"node-{h}"))
                t += period
        # a connection whose request was not seen (TLS, or a probe without request capture)
        t = start + h
        while t < start + days * DAY:
            out.append(Event(t, IMDS, "kubelet", dst_port=80, exe="/usr/bin/kubelet",
                             user="root", parent_name="systemd", host=f"node-{h}"))
            t += 30 * MINUTE
    out.sort(key=lambda e: e.ts)
    return out


@pytest.fixture(scope="module")
def trained():
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    outs = [scorer.process(e) for e in history()]
    return scorer, outs


def fresh():
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    for e in history():
        scorer.process(e)
    return scorer


def numbers_in(text):
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


def assert_alert(out, detectors):
    assert out is not None and out.alert, out
    assert out.detector in detectors, (out.detector, out.scores)
    assert out.score >= 50
    assert out.reason and "\n" not in out.reason and len(numbers_in(out.reason)) >= 2
    # The reason names the class, never the path (the path may carry a secret and the
    # reason becomes a metric label).
    assert "/latest/" not in out.reason and "/computeMetadata" not in out.reason


def test_the_request_history_itself_raises_no_alert_after_learning(trained):
    _, outs = trained
    late = [o for o in outs if o.event.ts >= T0 + DAY]
    assert late and not any(o.alert for o in late), [o for o in late if o.alert][:3]


def test_connection_events_are_scored_as_before(trained):
    scorer, outs = trained
    conns = [o for o in outs if not o.event.is_request]
    assert conns
    for o in conns:
        assert not set(o.scores) & REQUEST_DETECTORS
    assert request_class(conns[0].event) is None
    # A scorer fed only connection events keeps the request detectors' tables empty.
    only = Scorer(ScorerSettings(learning_period=DAY))
    for o in conns:
        only.process(o.event)
    sizes = only.model_size()
    assert all(sizes[d] == 0 for d in REQUEST_DETECTORS)
    # exe_mismatch judges the kernel's executable, which these synthetic events lack.
    assert all(sizes[d] > 0 for d in DETECTOR_NAMES
               if d not in REQUEST_DETECTORS and d != "exe_mismatch")


# -- five SSRF cases: a legitimate caller made to fetch what it never fetches ------------------

def test_storefront_asking_its_role_credentials_without_a_token():
    scorer = fresh()
    out = scorer.process(req(END, "python3", "/usr/local/bin/python3.11", "app", "GET", CREDS,
                             guarded=False, ua=BOTO, host="node-3", image=STORE_IMG))
    assert_alert(out, {"rare_request_class", "unguarded_request",
                       "unguarded_credential_request"})
    assert out.scores["rare_request_class"] >= 50
    assert out.scores["unguarded_credential_request"] >= 50


def test_gcp_app_asking_a_token_without_metadata_flavor():
    scorer = fresh()
    out = scorer.process(req(END, "node", "/usr/local/bin/node", "node", "GET",
                             "/computeMetadata/v1/instance/service-accounts/default/token",
                             guarded=False, ua="google-api-nodejs-client/9.0.0",
                             host="node-2", image=GCP_IMG))
    assert_alert(out, {"unguarded_request", "unguarded_credential_request"})
    assert out.scores["unguarded_request"] >= 50
    assert "without the anti-SSRF header" in out.reason


def test_azure_agent_python3_asking_a_managed_identity_token():
    scorer = fresh()
    out = scorer.process(req(END, "python3", "/usr/bin/python3.10", "root", "GET",
                             "/metadata/identity/oauth2/token",
                             query="api-version=2018-02-01&resource=https://vault.azure.net",
                             guarded=True, ua="WALinuxAgent/2.11.1.4", host="node-4",
                             parent="waagent"))
    assert_alert(out, {"rare_request_class"})
    assert "asked the metadata service for token" in out.reason
    assert "metadata" in out.reason  # what it usually asks for


def test_another_python3_asking_for_tokens_does_not_teach_the_azure_agent_to():
    """python3 as root on the host is also an operator's script: its token requests (here
    a burst from an ssh shell, itself an anomaly) must not make tokens usual for the
    agent's extension handler, which is python3 started by waagent (the caller includes
    the parent, or an operator's python3 would teach it tokens)."""
    scorer = fresh()
    for k in range(40):
        scorer.process(req(END + k, "python3", "/usr/bin/python3.10", "root", "GET",
                           "/metadata/identity/oauth2/token",
                           query="api-version=2018-02-01&resource=https://vault.azure.net",
                           guarded=True, ua="python-requests/2.31.0", host="node-7",
                           parent="bash"))
    out = scorer.process(req(END + 3 * 3600, "python3", "/usr/bin/python3.10", "root", "GET",
                             "/metadata/identity/oauth2/token",
                             query="api-version=2018-02-01&resource=https://vault.azure.net",
                             guarded=True, ua="WALinuxAgent/2.11.1.4", host="node-4",
                             parent="waagent"))
    assert_alert(out, {"rare_request_class"})
    assert "from waagent" in out.reason and "asked the metadata service for token" in out.reason


def test_monitoring_agent_fetching_the_node_role_credentials():
    scorer = fresh()
    out = scorer.process(req(END, "fluent-bit", "/fluent-bit/bin/fluent-bit", "root", "GET",
                             "/latest/meta-data/iam/security-credentials/node", guarded=True,
                             ua=None, host="node-5",
                             image="cr.fluentbit.io/fluent/fluent-bit:3.0.4"))
    assert_alert(out, {"rare_request_class"})


def test_backup_job_aws_cli_falling_back_to_imdsv1():
    scorer = fresh()
    out = scorer.process(req(END, "aws", "/usr/local/bin/aws", "root", "GET",
                             "/latest/meta-data/iam/security-credentials/backup",
                             guarded=False,
                             ua="aws-cli/2.15.30 Python/3.11.8 Linux/6.1 exe/x86_64.amzn.2023",
                             host="node-6", parent="cron"))
    assert_alert(out, {"unguarded_credential_request", "unguarded_request"})
    assert out.scores["unguarded_credential_request"] >= 50


def test_a_new_user_agent_for_a_caller():
    scorer = fresh()
    out = scorer.process(req(END, "python3", "/usr/local/bin/python3.11", "app", "GET",
                             "/latest/meta-data/placement/region", guarded=True,
                             ua="curl/8.5.0", host="node-1", image=STORE_IMG))
    assert_alert(out, {"new_user_agent"})
    assert "'curl/8.5.0'" in out.reason and BOTO in out.reason


def test_evasive_path_spelling_is_still_a_credential_request():
    scorer = fresh()
    out = scorer.process(req(END, "python3", "/usr/local/bin/python3.11", "app", "GET",
                             "/latest//meta-data/./iam/%73ecurity-credentials/x",
                             guarded=False, ua=BOTO, host="node-3", image=STORE_IMG))
    assert out.alert and out.scores["unguarded_credential_request"] >= 50


def test_a_caller_that_starts_sending_the_header_is_not_an_anomaly():
    scorer = fresh()
    out = scorer.process(req(END, "yum", "/usr/bin/python2.7", "root", "GET",
                             "/latest/dynamic/instance-identity/document", guarded=True,
                             ua="urlgrabber/3.10 yum/3.4.3", host="node-1", parent="bash",
                             command_line=YUM_CMD))
    assert not out.alert, out
    assert "unguarded_request" not in out.scores


# -- no blind first day ------------------------------------------------------------------------

def test_no_blind_first_day_unguarded_credentials_alert_with_no_history():
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    out = scorer.process(req(T0, "curl", "/usr/bin/curl", "ubuntu", "GET",
                             "/latest/meta-data/iam/security-credentials/", guarded=False,
                             ua="curl/7.88.1", host="fresh-node", parent="bash"))
    assert out.learning  # the very first event of a fresh node
    assert out.alert and out.detector == "unguarded_credential_request", out
    assert out.score >= 50 and out.severity in ("high", "critical")
    assert "no history needed" in out.reason and "not a known agent" in out.reason
    assert out.rule_name == ("Credentials Requested From the Metadata Service Without the "
                             "Anti-SSRF Header")
    # the same curl with the token: nothing on its own, and learning says nothing yet
    out = scorer.process(req(T0 + 60, "curl", "/usr/bin/curl", "ubuntu", "GET",
                             "/latest/meta-data/iam/security-credentials/", guarded=True,
                             ua="curl/7.88.1", host="fresh-node", parent="bash"))
    assert not out.alert


@pytest.mark.parametrize("path", [
    "/computeMetadata/v1/instance/service-accounts/default/token",
    "/metadata/identity/oauth2/token",
    "/latest/dynamic/instance-identity/pkcs7",
])
def test_no_blind_first_day_tokens_and_identity(path):
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    out = scorer.process(req(T0, "python3", "/usr/bin/python3", "www-data", "GET", path,
                             guarded=False, ua="python-requests/2.31", host="n"))
    assert out.alert and out.detector == "unguarded_credential_request"


def test_no_blind_first_day_spares_known_agents_plain_metadata_and_unknown_guard():
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    t = T0
    for e in (
        # yum's IMDSv1 plugin is a known agent
        req(t, "yum", "/usr/bin/python2.7", "root", "GET",
            "/latest/dynamic/instance-identity/document", guarded=False, ua="yum", host="n",
            command_line=YUM_CMD),
        # unguarded, but only the instance id
        req(t + 1, "curl", "/usr/bin/curl", "root", "GET", "/latest/meta-data/instance-id",
            guarded=False, ua="curl/7.88.1", host="n"),
        # the header's presence was not seen: no claim either way
        req(t + 2, "curl", "/usr/bin/curl", "root", "GET", CREDS, guarded=None,
            ua="curl/7.88.1", host="n"),
        # a connection event
        Event(t + 3, IMDS, "curl", dst_port=80, exe="/usr/bin/curl", user="root", host="n"),
    ):
        out = scorer.process(e)
        assert not out.alert, out


def test_the_rule_learns_a_caller_that_only_speaks_imdsv1():
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    old = ("legacy", "/opt/legacy/bin/legacy", "svc")
    first = scorer.process(req(T0, *old, "GET", CREDS, guarded=False, ua="legacy/1", host="a"))
    assert first.alert and first.detector == "unguarded_credential_request"
    # After the suppression window, on another host: learnt, not alerted again.
    again = scorer.process(req(T0 + 2 * 3600, *old, "GET", CREDS, guarded=False, ua="legacy/1",
                               host="b"))
    assert not again.alert and again.scores.get("unguarded_credential_request", 0) == 0


# -- identity at the scoring level: uids without names, empty and odd names ----------------------

def test_uid_without_a_name_keeps_the_user_detectors_on(trained):
    scorer = fresh()
    e = Event(END, IMDS, "amazon-ssm-agent", dst_port=80, exe="/usr/bin/amazon-ssm-agent",
              user=None, uid="4242", parent_name="systemd", host="node-1")
    assert user_of(e) == "uid:4242"
    out = scorer.process(e)
    assert out.scores["rare_process_user"] >= 50 and out.alert
    assert "uid:4242" in out.reason


@pytest.mark.parametrize("name", ["", " ", "evil\n", "\x1b[31mred", "kworker/0:1"])
def test_empty_and_odd_names_are_scored_never_dropped(name):
    scorer = fresh()
    out = scorer.process(Event(END, IMDS, name, dst_port=80, exe="/tmp/x", user="root",
                               parent_name="bash", host="node-1"))
    assert out is not None and out.alert, out
    assert "\n" not in out.reason
    if name != "kworker/0:1":
        assert repr(name) in out.reason


REQ_TEXT = st.one_of(st.none(), st.text(max_size=80))


@settings(max_examples=150, deadline=None)
@given(REQ_TEXT, REQ_TEXT, REQ_TEXT, REQ_TEXT, st.sampled_from([True, False, None]),
       st.text(max_size=20), st.one_of(st.none(), st.text(max_size=10)))
def test_the_scorer_takes_any_request_fields(method, path, query, ua, guarded, name, uid):
    scorer = Scorer(ScorerSettings(learning_period=0))
    for k in range(3):
        out = scorer.process(Event(T0 + k, IMDS, name, dst_port=80, exe=None, user=None,
                                   uid=uid, method=method, path=path, query=query,
                                   user_agent=ua, guarded=guarded))
        assert out is not None and 0 <= out.score <= 100


# -- replay reads the request fields from ECS exports ------------------------------------------

def ecs(e, n):
    doc = {"@timestamp": rfc3339(e.ts), "event": {"id": f"r-{n}", "action": e.action},
           "destination": {"ip": e.dst_ip, "port": e.dst_port},
           "process": {"name": e.name, "executable": e.exe,
                       "parent": {"name": e.parent_name}},
           "user": {"name": e.user}, "host": {"name": e.host}}
    if e.command_line:
        doc["process"]["command_line"] = e.command_line
    if e.image:
        doc["container"] = {"id": e.container_id, "image": {"name": e.image}}
    if e.is_request:
        doc["http"] = {"request": {"method": e.method}}
        doc["url"] = {"path": e.path, **({"query": e.query} if e.query else {})}
        if e.user_agent:
            doc["user_agent"] = {"original": e.user_agent}
        if e.guarded is not None:
            doc["imdswatch"] = {"request": {"guarded": e.guarded}}
    else:
        doc["event"]["action"] = "connection_attempted"
    return doc


def test_ecs_round_trip_keeps_the_request_fields():
    e = req(T0, "curl", "/usr/bin/curl", "root", "GET", CREDS, guarded=False, ua="curl/8",
            query="a=b")
    back = event_from_ecs(orjson.loads(orjson.dumps(ecs(e, 0))))
    assert (back.method, back.path, back.query, back.user_agent, back.guarded, back.action) == (
        "GET", CREDS, "a=b", "curl/8", False, "http_request")


def test_replay_reads_request_fields_from_an_ecs_export(tmp_path):
    hist = history(hosts=3, days=1.2)
    attack = req(T0 + 1.1 * DAY, "python3", "/usr/local/bin/python3.11", "app", "GET", CREDS,
                 guarded=False, ua=BOTO, host="node-1", image=STORE_IMG)
    fresh_node = req(T0 + 5, "curl", "/usr/bin/curl", "ubuntu", "GET", CREDS, guarded=False,
                     ua="curl/7.88.1", host="node-9", parent="bash")
    events = sorted([*hist, attack, fresh_node], key=lambda e: e.ts)
    path = write_ndjson(tmp_path / "requests.ndjson.gz",
                        [ecs(e, n) for n, e in enumerate(events)])
    r = subprocess.run([str(IMDSWATCH), "replay", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    alerts = [orjson.loads(line) for line in r.stdout.splitlines()]
    by_detector = {a["anomaly"]["detector"] for a in alerts}
    assert "unguarded_credential_request" in by_detector, alerts
    # The fresh node's curl during the learning period, and the storefront's SSRF after it.
    hosts = {a["host"]["name"] for a in alerts}
    assert {"node-9", "node-1"} <= hosts, alerts
    assert len(alerts) == 2, [(a["host"]["name"], a["anomaly"]["reason"]) for a in alerts]


# -- alerts and metrics carry the class, never the path as a label ------------------------------

def test_alert_document_and_metrics_of_a_request_alert():
    from prometheus_client import CollectorRegistry, generate_latest

    from exporters.alerts import build_alert
    from exporters.metrics import MetricsExporter

    scorer = Scorer(ScorerSettings(learning_period=DAY))
    e = req(T0, "curl", "/usr/bin/curl", "ubuntu", "GET", CREDS, query="token=s3cr3tvalue",
            guarded=False, ua="curl/7.88.1", host="fresh-node", parent="bash")
    e._doc = ecs(e, 0)
    out = scorer.process(e)
    alert = build_alert(out)
    assert alert["anomaly"]["detector"] == "unguarded_credential_request"
    assert alert["imdswatch"]["request"] == {"class": "credentials", "guarded": False}
    assert alert["url"]["path"] == CREDS and "s3cr3tvalue" not in alert["url"]["query"]
    assert alert["http"]["request"]["method"] == "GET"
    assert alert["user_agent"]["original"] == "curl/7.88.1"

    exp = MetricsExporter(CollectorRegistry(), host="n")
    exp.observe(out)
    exp.observe(scorer.process(req(T0 + 1, "curl", "/usr/bin/curl", "ubuntu", "PUT",
                                   "/latest/api/token", guarded=True, ua="curl/7.88.1",
                                   host="fresh-node", parent="bash")))
    exp.observe(scorer.process(Event(T0 + 2, IMDS, "curl", dst_port=80, exe="/usr/bin/curl")))
    text = generate_latest(exp.registry).decode()
    assert ('imdswatch_metadata_requests_total{class="credentials",endpoint="imds",'
            'guarded="false"} 1.0') in text
    assert ('imdswatch_metadata_requests_total{class="session",endpoint="imds",'
            'guarded="true"} 1.0') in text
    assert ('imdswatch_anomalies_total{detector="unguarded_credential_request",'
            'severity="critical"} 1.0') in text or (
        'imdswatch_anomalies_total{detector="unguarded_credential_request",'
        'severity="high"} 1.0') in text
    requests_lines = [x for x in text.splitlines()
                      if x.startswith("imdswatch_metadata_requests_total{")]
    assert len(requests_lines) == 2  # the connection event is no request
    assert not any("/latest" in x for x in requests_lines)


def test_two_nameless_uids_are_two_entities():
    """A common caller run by uid 1000 (no passwd name) must not vouch, through the
    scorer's entity cache, for the same caller run by uid 0 without a name."""
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    t = T0
    for h in range(HOSTS):
        for k in range(300):
            scorer.process(Event(t + k * 600 + h, IMDS, "app", dst_port=80, exe="/app/app",
                                 user=None, uid="1000", parent_name="init",
                                 host=f"node-{h}"))
    e = Event(t + 300 * 600 + 5, IMDS, "app", dst_port=80, exe="/app/app", user=None,
              uid="0", parent_name="init", host="node-1")
    assert e.signature() != Event(0, IMDS, "app", exe="/app/app", uid="1000",
                                  parent_name="init", host="node-1").signature()
    out = scorer.process(e)
    assert out.alert and "uid:0" in out.reason, out
