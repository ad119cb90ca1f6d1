"""Per-request refusal in the kernel (`run --enforce deny`, bpf/enforce_requests.h): the real
agent links its connect, sock_ops and sk_msg programs to a cgroup this test creates and
fills with its own clients only (removed in teardown, also on failure); real curl and wget
in a private namespace call the mock IMDS.

A caller the policy allows plain metadata only gets its instance-id answered while its
credentials request and its token PUT are refused by the kernel (curl's own send error),
each reported as a `request_denied` alert line and metric, over IPv4 and IPv6; a second
request on a kept-alive connection is judged too; a caller allowed every class is untouched;
break glass lets the requests through within a second; after SIGKILL of the agent everything
works again (fail open)."""

from __future__ import annotations

import os
import shutil
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

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
IMDS6 = "fd00:ec2::254"
BASE = f"http://{IMDS}"
INSTANCE_ID = f"{BASE}/latest/meta-data/instance-id"
CREDENTIALS = f"{BASE}/latest/meta-data/iam/security-credentials/"
TOKEN = f"{BASE}/latest/api/token"
# Under the kernel matrix's emulation a BCC compile takes tens of seconds (kernel-guest.sh).
START_TIMEOUT = float(os.environ.get("IMDSWATCH_TEST_AGENT_START_TIMEOUT", "180"))


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS,), v6=(IMDS6,)) as n:
        yield n


def client(ns: MetadataNamespace, argv: list[str], cgroup: Path | None
           ) -> tuple[int, int, str, str]:
    p = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 preexec_fn=in_cgroup(cgroup) if cgroup is not None else None)
    out, err = p.communicate(timeout=30)
    return p.pid, p.returncode, out, err


def curl(*urls: str, put: bool = False) -> list[str]:
    extra = ["-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60"] if put else []
    return ["env", "LC_ALL=C", "curl", "-gsS", "--max-time", "5", *extra, *urls]


def request_lines(agent: AgentProcess, pid: int) -> list[dict]:
    return [a for a in agent.alert_lines() if a["process"].get("pid") == pid
            and a["event"].get("action") == "request_denied"]


def test_a_metadata_only_caller_has_its_credential_requests_refused(ns, enforce_cgroup,  # noqa: F811
                                                                     tmp_path):
    cgroup = enforce_cgroup
    wget = os.path.realpath(shutil.which("wget") or "/usr/bin/wget")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[policy]
default = "deny"

[[rule]]
name = "curl-metadata-only"
process = "curl"
classes = ["metadata"]

[[rule]]
name = "wget-everything"
executable = "{wget}"
""")
    agent = AgentProcess(tmp_path, "--probe", "cgroup", "--learning-period", "0s",
                         "--enforce", "deny", "--policy", str(policy),
                         "--enforce-cgroup", str(cgroup),
                         "--enforce-off-file", str(tmp_path / "enforce-off")
                         ).start(timeout=START_TIMEOUT)
    try:
        assert wait_for(lambda: agent.metric("imdswatch_enforcement_mode", mode="deny") == 1,
                        30), agent.log_tail()
        assert agent.metric("imdswatch_enforcement_requests_failed") == 0, agent.log_tail()

        _, rc, out, err = client(ns, curl(INSTANCE_ID), cgroup)
        assert rc == 0 and out.startswith("i-"), (rc, out, err)

        pid, rc, out, err = client(ns, curl(CREDENTIALS), cgroup)
        # sk_msg's SK_DROP fails the sendmsg: curl's own "Send failure" (exit 55)
        assert rc == 55 and "Send failure" in err, (rc, out, err)
        assert wait_for(lambda: request_lines(agent, pid), 30), agent.log_tail()
        (line,) = request_lines(agent, pid)
        assert line["event"]["outcome"] == "failure"
        assert line["url"]["path"] == "/latest/meta-data/iam/security-credentials/"
        assert line["imdswatch"]["request"]["class"] == "credentials"
        assert line["imdswatch"]["policy"]["rule"] == "default"
        assert agent.metric("imdswatch_policy_decisions_total", action="request_denied",
                            **{"class": "credentials"}) >= 1

        pid, rc, out, err = client(ns, curl(TOKEN, put=True), cgroup)
        assert rc == 55 and "Send failure" in err, (rc, out, err)
        assert wait_for(lambda: request_lines(agent, pid), 30), agent.log_tail()
        assert request_lines(agent, pid)[0]["http"]["request"]["method"] == "PUT"

        # Kept alive: curl sends both requests on one connection; the second is judged.
        pid, rc, out, err = client(ns, curl(INSTANCE_ID, CREDENTIALS), cgroup)
        assert out.startswith("i-") and rc == 55, (rc, out, err)
        assert "Re-using existing connection" in client(
            ns, curl(INSTANCE_ID, INSTANCE_ID) + ["-v"], cgroup)[3]
        # Its alert line is folded into the one above (rate-limited per caller and rule);
        # the metric counts it.
        assert wait_for(lambda: agent.metric(
            "imdswatch_policy_decisions_total", action="request_denied",
            **{"class": "credentials"}) >= 2, 30), agent.log_tail()

        # IPv6: the same judgement on the same caller.
        v6 = f"http://[{IMDS6}]"
        _, rc, out, err = client(ns, curl(f"{v6}/latest/meta-data/instance-id"), cgroup)
        assert rc == 0 and out.startswith("i-"), (rc, out, err)
        _, rc, out, err = client(ns, curl(f"{v6}/latest/meta-data/iam/security-credentials/"),
                                 cgroup)
        assert rc == 55 and "Send failure" in err, (rc, out, err)

        # Break glass: one second after the file appears, requests go through; removed,
        # they are judged again.
        off = tmp_path / "enforce-off"
        off.touch()
        time.sleep(1.0)
        _, rc, _, err = client(ns, curl(CREDENTIALS), cgroup)
        assert rc == 0, err
        off.unlink()
        assert wait_for(lambda: client(ns, curl(CREDENTIALS), cgroup)[1] == 55, 30)

        # A caller allowed every class, and curl outside the cgroup: untouched.
        _, rc, _, err = client(ns, ["wget", "-q", "-O", "-", CREDENTIALS], cgroup)
        assert rc == 0, err
        _, rc, _, err = client(ns, curl(CREDENTIALS), None)
        assert rc == 0, err

        # SIGKILL: the links and the socket map go with the agent.
        agent.proc.kill()
        agent.proc.wait(10)
        _, rc, _, err = client(ns, curl(INSTANCE_ID, CREDENTIALS), cgroup)
        assert rc == 0, err
    finally:
        agent.kill()

