"""`imdswatch run --enforce audit` end to end: the real agent with BPF attached, real
clients in a private namespace calling the mock IMDS. Calls the policy would deny are
alert lines (`event.action: would_deny`, the deciding rule) and a metric; every call still
succeeds; a changed file (or SIGHUP) swaps the policy whole, and a broken file leaves the old one in
force."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from netns_fixtures import AgentProcess, MetadataNamespace, require_bcc, wait_for

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
POLICY = """
[policy]
default = "deny"

[[rule]]
name = "no-user-data"
action = "deny"
classes = ["user-data"]

[[rule]]
name = "wget-reads-metadata"
process = "wget"
user = "root"
classes = ["metadata"]
"""


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS,), v6=()) as n:
        yield n


def call(ns: MetadataNamespace, argv: list[str]) -> tuple[int, int]:
    """(pid, exit status) of a client run in the namespace."""
    p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p.pid, p.wait(20)


def policy_lines(agent: AgentProcess, pid: int) -> list[dict]:
    return [a for a in agent.alert_lines()
            if a["process"].get("pid") == pid and a["event"].get("action")]


def test_audit_reports_what_the_policy_would_deny_and_touches_nothing(ns, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    agent = AgentProcess(tmp_path, "--learning-period", "1h", "--enforce", "audit",
                         "--policy", str(policy))
    try:
        agent.start()
        assert agent.metric("imdswatch_enforcement_mode", mode="audit") == 1
        assert agent.metric("imdswatch_policy_rules") == 2

        curl, rc = call(ns, ["curl", "-sf", "-o", "/dev/null",
                             f"http://{IMDS}/latest/meta-data/instance-id"])
        assert rc == 0  # audit touches nothing
        assert wait_for(lambda: policy_lines(agent, curl), 5)
        (line,) = policy_lines(agent, curl)
        assert line["event"]["action"] == "would_deny" and "outcome" not in line["event"]
        assert line["imdswatch"]["policy"] == {"rule": "default", "mode": "audit"}
        assert line["imdswatch"]["endpoint"] == "imds"
        assert line["process"]["name"] == "curl"

        wget_ok, rc = call(ns, ["wget", "-q", "-O", "/dev/null",
                                f"http://{IMDS}/latest/meta-data/instance-id"])
        assert rc == 0
        wget_ud, rc = call(ns, ["wget", "-q", "-O", "/dev/null", f"http://{IMDS}/latest/user-data"])
        assert rc == 0
        assert wait_for(lambda: policy_lines(agent, wget_ud), 5)
        (ud,) = policy_lines(agent, wget_ud)
        assert ud["imdswatch"]["policy"]["rule"] == "no-user-data"
        assert ud["imdswatch"]["request"]["class"] == "user-data"
        assert ud["url"]["path"] == "/latest/user-data"
        assert policy_lines(agent, wget_ok) == []  # the rule allows it
        assert wait_for(lambda: agent.metric("imdswatch_policy_decisions_total",
                                             action="would_deny", rule="no-user-data",
                                             endpoint="imds") >= 1, 3)

        # A broken policy (the changed file is re-read by itself): refused, the old one stays.
        policy.write_text(POLICY + "\n[[rule]]\nname = \"x\"\nclasses = [\"secrets\"]\n")
        assert wait_for(lambda: agent.metric("imdswatch_policy_reload_failures_total") >= 1, 5)
        assert agent.log_lines("keeping the current policy")
        # (another uid: lines are rate-limited per caller, rule and action)
        curl2, _ = call(ns, ["setpriv", "--reuid=65534", "curl", "-s", "-o", "/dev/null",
                             f"http://{IMDS}/latest/meta-data/"])
        assert wait_for(lambda: policy_lines(agent, curl2), 5)

        # A good one, and SIGHUP: applied whole.
        policy.write_text(POLICY.replace('default = "deny"', 'default = "allow"'))
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: agent.log_lines("policy reloaded"), 5)
        curl3, _ = call(ns, ["setpriv", "--reuid=65533", "curl", "-s", "-o", "/dev/null",
                             f"http://{IMDS}/latest/meta-data/"])
        assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total",
                                             process="curl") >= 3, 5)
        time.sleep(0.5)
        assert policy_lines(agent, curl3) == []
        rc, _ = agent.stop(signal.SIGTERM)
        assert rc == 0
    finally:
        agent.kill()


def test_enforce_needs_a_usable_policy(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[policy]\ndefault = "block"\n')
    for args, says in (((), "--enforce audit needs --policy FILE"),
                       (("--policy", str(bad)), "default must be")):
        r = subprocess.run([*AgentProcess(tmp_path).argv, "--enforce", "audit", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
