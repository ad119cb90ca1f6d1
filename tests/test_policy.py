# Metadata addresses in this file are data (event fields): nothing here connects to them.
"""The policy package: the file (read, checked, written), the decision, learning from a
model, and planning against history; `imdswatch policy generate|plan` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers_events import DAY, HOUR, T0, ev, fleet_events, to_ecs, write_ndjson

from policy.learn import LearnOptions, learn_policy
from policy.model import ALLOW, DENY, Caller, Decision, Policy, Rule
from policy.plan import plan_events, plan_state, render
from policy.toml_file import PolicyError, dump_policy, parse_policy
from scoring.endpoints import EndpointCatalog
from scoring.events import Event
from scoring.scorer import Scorer
from scoring.state import save_state

CATALOG = EndpointCatalog.from_config()


def request(ts: float, name: str, path: str, *, method: str = "GET", guarded: bool = True,
            host: str = "node-0", image: str | None = None, user: str = "root",
            exe: str | None = None) -> Event:
    e = ev(ts, name, host=host, image=image, user=user, exe=exe,
           namespace="shop" if image else None)
    e.method, e.path, e.guarded, e.action = method, path, guarded, "http_request"
    return e


def learned_scorer(extra: list[Event] = ()) -> Scorer:
    scorer = Scorer()
    events = fleet_events(hosts=4, days=3)
    # The shop's python asks for its role's credentials and the instance id, guarded.
    for i in range(40):
        for h in range(4):
            events.append(request(T0 + i * HOUR + h, "python3", "/latest/meta-data/iam/"
                                  "security-credentials/role", host=f"node-{h}",
                                  image="registry.local/shop/api:2.3.1", user="app"))
            events.append(request(T0 + i * HOUR + h + 1, "python3",
                                  "/latest/meta-data/instance-id", host=f"node-{h}",
                                  image="registry.local/shop/api:2.3.1", user="app"))
    events.extend(extra)
    events.sort(key=lambda e: e.ts)
    for e in events:
        scorer.process(e)
    return scorer


# -- the file ------------------------------------------------------------------------------

def test_a_learned_policy_survives_writing_and_reading_back() -> None:
    pol = learn_policy(learned_scorer())
    text = dump_policy(pol)
    again = parse_policy(text, "p.toml", CATALOG)
    assert again.rules == pol.rules and again.default == ALLOW
    assert "learned" in text and "# learned" in text


@pytest.mark.parametrize("text, says", [
    ("[policy]\ndefault = \"block\"\n", "default must be"),
    ("[policy]\nversion = 9\n", "version 9"),
    ("[policy]\ncolour = 1\n", "unknown key 'colour'"),
    ("[[rule]]\naction = \"allow\"\n", "rule 1: 'name' is required"),
    ("[[rule]]\nname = \"a\"\nclasses = [\"passwords\"]\n", "rule 1 (a): classes entry"),
    ("[[rule]]\nname = \"a\"\nendpoints = [\"10.0.0.1\"]\n", "endpoints entry '10.0.0.1'"),
    ("[[rule]]\nname = \"a\"\n[[rule]]\nname = \"a\"\n", "rule 2: name 'a' is used"),
    ("[[rule]]\nname = \"a\"\nexe = \"/bin/x\"\n", "unknown key 'exe'"),
    ("[[rule]]\nname = \"a\"\naction = \"maybe\"\n", "action must be"),
    ("[[rule]]\nname = \"a\"\ncontainer = \"yes\"\n", "'container' must be true or false"),
    ("[[rule]]\nname = \"a\"\nhosts = -1\n", "'hosts' must be a whole number"),
    ("[[rule]]\nname = \"a\"\norigin = \"guess\"\n", "origin must be one of"),
    ("[[rule]\nname = \"a\"\n", "not valid TOML"),
    ("rule = 3\n", "array of tables"),
])
def test_a_bad_policy_is_refused_with_where_and_why(text: str, says: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.toml", CATALOG)
    assert says in str(err.value) and str(err.value).startswith("p.toml")


def test_a_policy_that_is_not_text_is_refused() -> None:
    with pytest.raises(PolicyError, match="not UTF-8"):
        parse_policy(b"\xff\xfe[policy]", "p.toml")


# -- deciding ------------------------------------------------------------------------------

SHOP = Caller("python3", "/usr/bin/python3", "app", "1000", "registry.local/shop/api:2.4",
              "shop", True)
CURL = Caller("curl", "/usr/bin/curl", "root", "0")


def test_the_first_covering_rule_decides_and_the_default_covers_the_rest() -> None:
    pol = Policy((
        Rule("no-user-data", DENY, classes=("user-data",)),
        Rule("shop", ALLOW, image="registry.local/shop/*", namespace="shop",
             classes=("metadata", "credentials")),
    ), default=DENY)
    assert pol.decide(SHOP, "imds", "credentials").action == ALLOW
    assert pol.decide(SHOP, "imds", "user-data").rule == "no-user-data"
    assert pol.decide(SHOP, "imds", "identity").rule == "default"
    assert pol.decide(SHOP, "imds", None).action == ALLOW  # may connect
    assert pol.decide(CURL, "imds", None).denied  # no rule lets curl connect
    assert pol.decide(CURL, "imds", "user-data").rule == "no-user-data"


def test_without_default_deny_only_deny_rules_deny() -> None:
    pol = Policy((Rule("shop", ALLOW, image="registry.local/shop/*", classes=("metadata",)),))
    assert not pol.decide(CURL, "imds", "credentials").denied
    assert not pol.decide(SHOP, "imds", "credentials").denied


def test_a_rule_names_users_by_name_or_uid_and_endpoints_by_id_or_address() -> None:
    pol = Policy((Rule("u", ALLOW, user="uid:0", endpoints=("169.254.169.254",)),),
                 default=DENY)
    assert not pol.decide(CURL, "imds", None, "169.254.169.254").denied
    assert pol.decide(CURL, "aws-ecs-task-metadata", None, "169.254.170.2").denied
    assert not Policy((Rule("n", ALLOW, user="root"),), DENY).decide(CURL, "x", None).denied
    assert Policy((Rule("n", ALLOW, container=True),), DENY).decide(CURL, "x", None).denied


# -- learning ------------------------------------------------------------------------------

def test_learning_allows_the_fleets_callers_with_their_classes_not_a_one_off() -> None:
    attack = request(T0 + 2 * DAY, "curl", "/latest/meta-data/iam/security-credentials/r",
                     guarded=False, user="www-data", host="node-2")
    pol = learn_policy(learned_scorer([attack]), LearnOptions(catalog=False))
    by_exe = {(r.executable, r.user): r for r in pol.rules}
    ssm = by_exe[("/usr/bin/amazon-ssm-agent", "root")]
    assert ssm.origin.kind == "learned" and ssm.origin.hosts == 4
    assert ssm.origin.vendor == "aws" and ssm.origin.since.startswith("2024-05-01")
    assert ssm.classes == ("*",)  # connections only: nothing to narrow it by
    shop = by_exe[("/usr/bin/python3", "app")]
    assert shop.classes == ("credentials", "metadata")
    assert shop.image == "registry.local/shop/api" and shop.container is True
    assert ("/usr/bin/curl", "www-data") not in by_exe
    assert any("curl (/usr/bin/curl) user www-data" in line for line in pol.not_learned)
    assert all(r.origin.kind == "learned" for r in pol.rules)


def test_the_catalog_adds_the_known_agents_by_path_and_image() -> None:
    pol = learn_policy(Scorer())
    cat = [r for r in pol.rules if r.origin.kind == "catalog"]
    assert any(r.executable == "/usr/bin/amazon-ssm-agent" and r.container is False
               for r in cat)
    assert any(r.process == "aws-k8s-agent" and r.image and r.container for r in cat)
    assert Policy(tuple(cat), DENY).decide(
        Caller("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root"), "imds", None
    ).action == ALLOW
    assert Policy(tuple(cat), DENY).decide(
        Caller("amazon-ssm-agent", "/tmp/amazon-ssm-agent", "root"), "imds", None).denied


# -- planning ------------------------------------------------------------------------------

def test_plan_lists_what_would_be_denied_and_the_hardening_questions() -> None:
    pol = parse_policy(dump_policy(learn_policy(learned_scorer(), LearnOptions(catalog=False)))
                       .replace('default = "allow"', 'default = "deny"'), "p", CATALOG)
    events = [
        (request(T0 + 5 * DAY, "curl", "/latest/meta-data/iam/security-credentials/r",
                 guarded=False, user="www-data", host="node-2"), CATALOG.match("169.254.169.254")),
        (request(T0 + 5 * DAY + 60, "curl", "/latest/meta-data/iam/security-credentials/r",
                 guarded=False, user="www-data", host="node-3"), CATALOG.match("169.254.169.254")),
        (request(T0 + 5 * DAY + 90, "python3", "/latest/user-data", host="node-1",
                 image="registry.local/shop/api:2.3.1", user="app"),
         CATALOG.match("169.254.169.254")),
        (request(T0 + 5 * DAY + 95, "python3", "/latest/api/token", method="PUT",
                 host="node-1", image="registry.local/shop/api:2.3.1", user="app"),
         CATALOG.match("169.254.169.254")),
        (ev(T0 + 5 * DAY + 99, "amazon-ssm-agent", host="node-1"),
         CATALOG.match("169.254.169.254")),
    ]
    plan = plan_events(pol, events, "trace")
    rows = {(r.caller.split(" ")[0], r.what): r for r in plan.denied.rows.values()}
    curl = rows[("curl", "connect to imds")]
    assert curl.count == 2 and curl.n_hosts == 2 and curl.rule == "default"
    assert curl.first < curl.last
    assert ("python3", "user-data on imds") in rows
    assert ("python3", "session on imds") in rows  # the learned rule has no session class
    assert len(rows) == 3  # the SSM agent is allowed
    assert [r.caller.split(" ")[0] for r in plan.imdsv2.rows.values()] == ["curl"]
    assert [r.caller.split(" ")[0] for r in plan.hop_limit.rows.values()] == ["python3"]
    text = render(plan)
    assert "would be denied:" in text and "curl (/usr/bin/curl) user www-data" in text
    assert "2 calls on 2 hosts" in text


def test_plan_of_a_state_judges_the_models_callers() -> None:
    attack = request(T0 + 2 * DAY, "curl", "/latest/meta-data/iam/security-credentials/r",
                     guarded=False, user="www-data", host="node-2")
    scorer = learned_scorer([attack])
    pol = learn_policy(scorer, LearnOptions(catalog=False))
    pol = Policy(pol.rules, DENY)
    plan = plan_state(pol, scorer, "state")
    callers = {r.caller.split(" ")[0] + " " + r.caller.split(" ")[3]
               for r in plan.denied.rows.values()}
    assert callers == {"curl www-data"}
    assert [r.caller.split(" ")[0] for r in plan.imdsv2.rows.values()] == ["curl"]
    assert "a state keeps no endpoints" in render(plan)


# -- the commands --------------------------------------------------------------------------

def imdswatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imdswatch.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_generate_then_plan_on_the_command_line(tmp_path: Path) -> None:
    attack = request(T0 + 2 * DAY, "curl", "/latest/meta-data/iam/security-credentials/r",
                     guarded=False, user="www-data", host="node-2")
    state = tmp_path / "state.json.gz"
    save_state(state, learned_scorer([attack]))
    out = tmp_path / "policy.toml"
    r = imdswatch("policy", "generate", "--state", str(state), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "callers learned" in r.stderr and out.exists()
    text = out.read_text()
    assert "amazon-ssm-agent" in text and "# learned" in text
    out.write_text(text.replace('default = "allow"', 'default = "deny"'))
    trace = write_ndjson(tmp_path / "trace.ndjson", [
        to_ecs(ev(T0 + 4 * DAY, "curl", user="www-data", host="node-9")),
        to_ecs(ev(T0 + 4 * DAY + 1, "kubelet", host="node-9")),
    ] + ["{broken"])  # type: ignore[list-item]
    r = imdswatch("policy", "plan", "--policy", str(out), str(trace))
    assert r.returncode == 0, r.stderr
    assert "curl (/usr/bin/curl) user www-data on the host: connect to imds (rule default)" \
        in r.stdout
    assert "kubelet" not in r.stdout.split("if IMDSv2")[0]
    assert "malformed" in r.stderr
    r = imdswatch("policy", "plan", "--policy", str(out), "--state", str(state))
    assert r.returncode == 0 and "curl" in r.stdout, r.stderr


@pytest.mark.parametrize("args, says", [
    (("policy", "generate"), "one of --state FILE or --fleet URL"),
    (("policy", "generate", "--state", "/nonexistent/s.json"), "/nonexistent/s.json"),
    (("policy", "plan", "--policy", "/nonexistent/p.toml", "--state", "x"),
     "/nonexistent/p.toml: cannot read"),
    (("policy", "plan", "--policy", "x"), "needs a TRACE or --state"),
])
def test_unusable_arguments_exit_2_with_a_message(args: tuple, says: str) -> None:
    r = imdswatch(*args)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_bad_policy_file_exits_2_naming_the_rule(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text('[[rule]]\nname = "x"\nclasses = ["secrets"]\n')
    r = imdswatch("policy", "plan", "--policy", str(p), "--state", str(tmp_path / "s"))
    assert r.returncode == 2 and "rule 1 (x): classes entry 'secrets'" in r.stderr, r.stderr


def test_the_nodes_agents_are_never_denied_by_the_default_unless_the_policy_says_so() -> None:
    ssm = Caller("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root")
    copy = Caller("amazon-ssm-agent", "/tmp/amazon-ssm-agent", "root")
    pol = Policy((Rule("curl", ALLOW, process="curl"),), default=DENY)
    assert pol.decide(ssm, "imds", "credentials") == Decision(ALLOW, "known-agent")
    assert pol.decide(copy, "imds", None).denied  # not the agent: another path
    named = Policy((Rule("ssm", ALLOW, process="amazon-ssm-agent", classes=("metadata",)),),
                   default=DENY)
    assert named.decide(ssm, "imds", "credentials").rule == "default"  # the rule speaks
    strict = parse_policy('[policy]\ndefault = "deny"\nagents = "policy"\n', "p", CATALOG)
    assert strict.decide(ssm, "imds", None).denied
    with pytest.raises(PolicyError, match="agents must be"):
        parse_policy('[policy]\nagents = "never"\n', "p")
