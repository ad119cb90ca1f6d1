"""`imdswatch run --enforce deny` end to end: the real agent links its connect programs to a
cgroup this test creates and fills with its own clients only (removed in teardown, also on
failure), real curl and wget in a private namespace calling the mock IMDS.

A caller the policy allows connects; one it does not gets curl's own EPERM and an alert
line; a client outside the cgroup is untouched; break glass lets everything through within
a second and back; a reload swaps the kernel's rules; SIGKILL of the agent leaves nothing
attached (fail open); denials spreading past the bound disarm the node; each call the
policy denies is reported once, whether the kernel refused it or let it through."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from netns_fixtures import (  # noqa: F401 - enforce_cgroup: a fixture
    AgentProcess,
    MetadataNamespace,
    enforce_cgroup,
    in_cgroup,
    require_bcc,
    wait_for,
)

from lab.agent_process import COMMAND
from tracer import cgroup_attach

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
URL = f"http://{IMDS}/latest/meta-data/instance-id"


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS,), v6=()) as n:
        yield n


@pytest.fixture
def cgroup(enforce_cgroup):  # noqa: F811 - the fixture imported above
    return enforce_cgroup


def client(ns: MetadataNamespace, argv: list[str], cgroup: Path | None = None
           ) -> tuple[int, int, str]:
    """(pid, exit status, stderr) of a client run in the namespace and, when given, in the
    cgroup (it moves itself there before it execs)."""
    p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                 preexec_fn=in_cgroup(cgroup) if cgroup is not None else None)
    _, err = p.communicate(timeout=20)
    return p.pid, p.returncode, err


def curl(*extra: str) -> list[str]:
    return [*extra, "curl", "-sS", "-o", "/dev/null", "--max-time", "5", URL]


def deny_lines(agent: AgentProcess, pid: int) -> list[dict]:
    return [a for a in agent.alert_lines() if a["process"].get("pid") == pid
            and a["event"].get("action") == "connection_denied"]


def policy_text(default: str = "deny", allow_curl: bool = False) -> str:
    wget = os.path.realpath(shutil.which("wget") or "/usr/bin/wget")
    text = f"""
[policy]
default = "{default}"

[[rule]]
name = "wget-on-the-host"
executable = "{wget}"
user = "root"
container = false
"""
    if allow_curl:
        text += '\n[[rule]]\nname = "curl-too"\nprocess = "curl"\n'
    return text


def start_agent(tmp_path: Path, cgroup: Path, *extra: str) -> AgentProcess:
    policy = tmp_path / "policy.toml"
    if not policy.exists():
        policy.write_text(policy_text())
    return AgentProcess(tmp_path, "--learning-period", "0s", "--enforce", "deny",
                        "--policy", str(policy), "--enforce-cgroup", str(cgroup),
                        "--enforce-off-file", str(tmp_path / "enforce-off"), *extra).start()


def test_deny_refuses_in_the_kernel_and_fails_open(ns, cgroup, tmp_path):
    agent = start_agent(tmp_path, cgroup)
    try:
        assert wait_for(lambda: agent.metric("imdswatch_enforcement_mode", mode="deny") == 1,
                        5), agent.log_tail()
        _, rc, err = client(ns, ["wget", "-q", "-O", "/dev/null", URL], cgroup)
        assert rc == 0, err  # allowed by its rule
        pid, rc, err = client(ns, curl("env", "LC_ALL=C") + ["-v"], cgroup)
        # curl's own words for EPERM from connect(): exit 7, "Operation not permitted"
        assert rc == 7 and "Operation not permitted" in err, (rc, err)
        assert wait_for(lambda: deny_lines(agent, pid), 5)
        (line,) = deny_lines(agent, pid)
        assert line["event"]["outcome"] == "failure"
        assert line["imdswatch"]["policy"]["rule"] == "default"
        assert line["destination"]["ip"] == IMDS and line["process"]["name"] == "curl"
        assert agent.metric("imdswatch_policy_decisions_total",
                            action="connection_denied") >= 1
        _, rc, err = client(ns, curl())  # outside the cgroup: untouched
        assert rc == 0, err

        # Break glass: within a second nothing is denied; removed, denial is back.
        off = tmp_path / "enforce-off"
        r = subprocess.run([*COMMAND, "enforce", "off",
                            "--enforce-off-file", str(off)], capture_output=True, text=True)
        assert r.returncode == 0 and off.exists(), r.stderr
        # One second after the file appeared (not timing curl's own start-up on a loaded
        # machine): a client started now connects.
        time.sleep(1.0)
        _, rc, err = client(ns, curl(), cgroup)
        assert rc == 0, err
        assert agent.metric("imdswatch_enforcement_mode", mode="off") == 1
        assert agent.metric("imdswatch_enforcement_break_glass") == 1
        off.unlink()
        assert wait_for(lambda: client(ns, curl(), cgroup)[1] == 7, 5)

        # A reload swaps the kernel's rules.
        (tmp_path / "policy.toml").write_text(policy_text(allow_curl=True))
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: client(ns, curl(), cgroup)[1] == 0, 5), agent.log_tail()
        (tmp_path / "policy.toml").write_text(policy_text())
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: client(ns, curl(), cgroup)[1] == 7, 5), agent.log_tail()

        # SIGKILL: the links go with the agent's descriptors.
        agent.proc.kill()
        agent.proc.wait(10)
        _, rc, err = client(ns, curl(), cgroup)
        assert rc == 0, err
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in (cgroup_attach.CGROUP_INET4_CONNECT, cgroup_attach.CGROUP_INET6_CONNECT):
                assert cgroup_attach.attached_program_ids(fd, hook) == []
        finally:
            os.close(fd)
    finally:
        agent.kill()


def test_denials_spreading_past_the_bound_disarm_the_node(ns, cgroup, tmp_path):
    agent = start_agent(tmp_path, cgroup, "--enforce-max-callers", "1")
    try:
        assert wait_for(lambda: agent.metric("imdswatch_enforcement_mode", mode="deny") == 1, 5)
        assert client(ns, curl("setpriv", "--reuid=65534"), cgroup)[1] == 7
        assert client(ns, curl("setpriv", "--reuid=65533"), cgroup)[1] == 7
        assert wait_for(lambda: agent.metric("imdswatch_enforcement_disarmed") == 1, 5)
        assert agent.metric("imdswatch_enforcement_mode", mode="audit") == 1
        assert client(ns, curl(), cgroup)[1] == 0
        assert any(a["event"].get("action") == "enforcement_disarmed"
                   for a in agent.alert_lines())
        rc, _ = agent.stop(signal.SIGTERM)
        assert rc == 0
    finally:
        agent.kill()


def test_deny_refuses_the_root_cgroup_and_needs_a_cgroup(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text(policy_text())
    base = [*AgentProcess(tmp_path).argv, "--enforce", "deny", "--policy", str(policy)]
    r = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs --enforce-cgroup" in r.stderr, r.stderr
    root = cgroup_attach.cgroup2_root()
    r = subprocess.run([*base, "--enforce-cgroup", root], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "is the cgroup v2 root" in r.stderr, r.stderr


def lines(agent: AgentProcess, pid: int, action: str) -> list[dict]:
    return [a for a in agent.alert_lines() if a.get("process", {}).get("pid") == pid
            and a["event"].get("action") == action]


WIDENED = """
[policy]
default = "deny"

[[rule]]
name = "curl-in-the-app-image"
process = "curl"
image = "registry.example/app:*"
"""


@pytest.mark.parametrize("probe", ["tracepoint", "cgroup"])
def test_each_denied_call_is_reported_once(ns, cgroup, tmp_path, probe):
    """The kernel's projection may allow more than the policy: the image rule is widened to
    curl by name, so a host curl (no image) passes the kernel though the policy denies it:
    one would_deny line saying so. wget, allowed by nothing, is refused in the kernel: one
    connection_denied line, no would_deny. In both probe modes every kernel of the matrix
    offers: the cgroup mode's root program sees the refused attempt too (it runs after the
    enforcer's, in the same connect()); the tracepoint fires only for connects that passed."""
    (tmp_path / "policy.toml").write_text(WIDENED)
    agent = start_agent(tmp_path, cgroup, "--probe", probe)
    try:
        assert wait_for(lambda: agent.metric("imdswatch_enforcement_mode", mode="deny") == 1,
                        5), agent.log_tail()
        seen = agent.metric("imdswatch_events_seen_total")
        wget, rc, err = client(ns, ["wget", "-q", "-T", "5", "-t", "1", "-O", "/dev/null",
                                    URL], cgroup)
        assert rc != 0, err
        curl_pid, rc, err = client(ns, curl(), cgroup)
        assert rc == 0, err
        assert wait_for(lambda: lines(agent, wget, "connection_denied")
                        and lines(agent, curl_pid, "would_deny"), 10), agent.log_tail()
        # Every traced call judged before looking for extra lines: the cgroup mode traces
        # wget's refused attempt too.
        traced = 2 if probe == "cgroup" else 1
        assert wait_for(lambda: agent.metric("imdswatch_events_seen_total") - seen >= traced,
                        10)
        agent.stop()
        (denied,) = lines(agent, wget, "connection_denied")
        assert denied["imdswatch"]["policy"]["rule"] == "default"
        assert lines(agent, wget, "would_deny") == []
        (would,) = lines(agent, curl_pid, "would_deny")
        assert would["imdswatch"]["policy"]["kernel"] == "not_enforced"
        assert would["imdswatch"]["policy"]["mode"] == "deny"
        assert "scope" not in would["imdswatch"]["policy"]
        assert lines(agent, curl_pid, "connection_denied") == []
    finally:
        agent.kill()
