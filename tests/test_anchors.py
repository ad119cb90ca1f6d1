# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Each anchor on tiny hand-made streams: it fires, or not, as its public definition says."""

from __future__ import annotations

from bench.anchors import (
    ElasticNewTermsImds,
    ElasticRareMetadataProcess,
    FalcoMetadataFromContainer,
    PathRuleUnguardedCredentials,
    next_run,
)
from scoring.events import Event

T0 = 1_772_409_600.0  # a quarter-hour boundary
IMDS = "169.254.169.254"


def ev(ts, name="kubelet", dst=IMDS, port=80, exe=None, host="n1", cid=None, ns=None,
       user="root"):
    return Event(ts, dst, name, dst_port=port, exe=exe or f"/usr/bin/{name}", host=host,
                 container_id=cid, namespace=ns, user=user)


def run(anchor, events):
    for n, e in enumerate(events):
        anchor.observe(n, e)
    return anchor.finish()


# -- Falco ---------------------------------------------------------------------------
def test_falco_fires_for_container_outside_kube_system_at_event_time():
    dets = run(FalcoMetadataFromContainer(), [ev(T0 + 5, "python3", cid="c1", ns="web")])
    assert [(d.n, d.alert_ts) for d in dets] == [(0, T0 + 5)]


def test_falco_ignores_host_kube_system_and_other_addresses():
    dets = run(FalcoMetadataFromContainer(), [
        ev(T0, "curl"),  # not in a container
        ev(T0, "aws-k8s-agent", cid="c2", ns="kube-system"),  # the default exception
        ev(T0, "curl", dst="fd00:ec2::254", cid="c3", ns="web"),  # fd.sip is IPv4 IMDS only
        ev(T0, "wget", dst="169.254.170.2", cid="c3", ns="web"),
    ])
    assert dets == []


# -- Elastic ML rare ---------------------------------------------------------------------
def history(anchor, buckets, names=("kubelet", "amazon-ssm-agen")):
    events = [ev(T0 + b * 900 + 10, name) for b in range(buckets) for name in names]
    for n, e in enumerate(events):
        anchor.observe(n, e)
    return len(events)


def test_elastic_rare_never_seen_name_scores_at_least_50_after_a_day():
    a = ElasticRareMetadataProcess()
    assert a.score("never-seen", 96) >= 50
    assert a.score("never-seen", 672) > a.score("never-seen", 96)


def test_elastic_rare_fires_on_new_name_after_bucket_close_plus_delay():
    a = ElasticRareMetadataProcess()
    n = history(a, 100)
    ts = T0 + 100 * 900 + 30  # inside bucket 100
    a.observe(n, ev(ts, "curl", user="ec2-user"))
    dets = a.finish()
    assert [d.n for d in dets] == [n]
    bucket_end = T0 + 101 * 900
    assert dets[0].alert_ts >= bucket_end + a.query_delay
    assert dets[0].alert_ts - ts <= 30 * 60 + a.query_delay  # at most two rule periods
    assert (dets[0].alert_ts - a.rule_phase) % a.rule_interval == 0  # on the rule schedule


def test_elastic_rare_common_names_do_not_fire_and_recurrence_decays():
    a = ElasticRareMetadataProcess()
    history(a, 100)
    assert a.finish() == []
    assert a.score("kubelet", 100) < 5
    a.buckets_with["weekly"] = 1
    once = a.score("weekly", 700)
    a.buckets_with["weekly"] = 20
    assert a.score("weekly", 700) < once


def test_elastic_rare_is_ipv4_imds_only_and_waits_for_history():
    a = ElasticRareMetadataProcess()
    n = history(a, 100)
    a.observe(n, ev(T0 + 100 * 900 + 1, "curl", dst="fd00:ec2::254"))
    a.observe(n + 1, ev(T0 + 100 * 900 + 2, "wget", dst="168.63.129.16"))
    assert a.finish() == []
    young = ElasticRareMetadataProcess()
    n = history(young, 4)
    young.observe(n, ev(T0 + 4 * 900 + 1, "curl"))
    assert young.finish() == []  # fewer than min_buckets of history


def test_elastic_record_covers_every_event_of_the_name_in_the_bucket():
    a = ElasticRareMetadataProcess()
    n = history(a, 100)
    base = T0 + 100 * 900
    a.observe(n, ev(base + 1, "perl", host="n1"))
    a.observe(n + 1, ev(base + 500, "perl", host="n2"))
    dets = a.finish()
    assert sorted(d.n for d in dets) == [n, n + 1]
    assert len({d.key for d in dets}) == 1


# -- Elastic new_terms -----------------------------------------------------------------
def test_new_terms_fires_once_per_new_host_executable_then_stays_quiet():
    a = ElasticNewTermsImds()
    dets = run(a, [ev(T0 + 10, "curl"), ev(T0 + 2000, "curl"), ev(T0 + 4000, "curl", host="n2")])
    assert [d.n for d in dets] == [0, 2]
    assert dets[0].alert_ts >= T0 + 10 + a.ingest_delay
    assert dets[0].alert_ts - (T0 + 10) <= a.interval + a.ingest_delay


def test_new_terms_query_filters():
    a = ElasticNewTermsImds()
    dets = run(a, [
        ev(T0, "kubelet"),  # not a listed name, normal path
        ev(T0, "amazon-ssm-agen", exe="/tmp/.x/amazon-ssm-agent"),  # /tmp/*: in the query
        ev(T0, "python3", exe="/usr/bin/python3.11"),  # python*: in the query
        ev(T0, "curl", port=8080),  # destination.port must be 80
        ev(T0, "curl", dst="169.254.170.2"),  # only 169.254.169.254
        ev(T0, "agent", exe="/home/ops/bin/agent"),  # /home/*/*
        ev(T0, "agent", exe="/homework"),
    ])
    assert [d.n for d in dets] == [1, 2, 5]


def test_new_terms_history_window_is_seven_days():
    a = ElasticNewTermsImds()
    day = 86400.0
    dets = run(a, [ev(T0, "curl"), ev(T0 + 3 * day, "curl"), ev(T0 + 10.5 * day, "curl")])
    assert [d.n for d in dets] == [0, 2]


def test_next_run_schedule():
    assert next_run(T0 + 1, 900, 420) == T0 + 420
    assert next_run(T0 + 420, 900, 420) == T0 + 420
    assert next_run(T0 + 421, 900, 420) == T0 + 1320


# -- the fixed path rule -------------------------------------------------------------------

def req(ts, path, guarded, name="curl"):
    e = ev(ts, name)
    e.method, e.path, e.guarded = "GET", path, guarded
    return e


def test_path_rule_fires_on_unguarded_credentials_and_tokens_only():
    events = [
        req(T0, "/latest/meta-data/iam/security-credentials/role", False),
        req(T0 + 1, "/computeMetadata/v1/instance/service-accounts/default/token", False),
        req(T0 + 2, "/metadata/identity/oauth2/token", False),
        req(T0 + 3, "/v2/credentials/abc", False),
        req(T0 + 4, "/latest/meta-data/iam/security-credentials/role", True),  # guarded
        req(T0 + 5, "/latest/meta-data/instance-id", False),  # not a secret
        req(T0 + 6, "/latest/dynamic/instance-identity/document", False),  # not in the rule
        req(T0 + 7, "/latest/meta-data/iam/security-credentials/role", None),  # not seen
        ev(T0 + 8),  # a connection event
    ]
    dets = run(PathRuleUnguardedCredentials(), events)
    assert [d.n for d in dets] == [0, 1, 2, 3]
    assert all(d.alert_ts == events[d.n].ts for d in dets)  # inline, at event time
    assert len({d.key for d in dets}) == 4  # one alert per event: no history, no dedup
