"""`imdswatch run --probe MODE` end to end in every probe mode this kernel allows: the agent
attaches that mode with the kernel-side identity and request capture (or says why not), a
curl in a private namespace asks a mock IMDS for credentials, the alert names the caller and
the request, the metrics count it, and SIGTERM ends it cleanly. A mode the kernel refuses is
skipped with the agent's own reason; the kernel matrix (`make test-kernels`) fails on a
kprobe or fentry skip, since its Debian kernels have both, and on any mode that did not
pass."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
from netns_fixtures import AgentProcess, MetadataNamespace, require_bcc, wait_for, warm_state

from tracer import kernel, probes

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
CREDENTIALS = "/latest/meta-data/iam/security-credentials/test-role"
# BCC compiles at start: seconds here, minutes in the matrix's emulated VMs on a loaded
# machine (scripts/kernel-guest.sh raises it).
REFERENCE_KERNEL = (6, 18)  # the development machine's kernel, where the full egress loads
START_TIMEOUT = float(os.environ.get("IMDSWATCH_TEST_AGENT_START_TIMEOUT", "240"))


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS,), v6=()) as n:
        yield n


@pytest.mark.parametrize("mode", probes.MODES)
def test_run_sees_and_alerts_in_each_probe_mode(mode, ns, tmp_path):
    state = tmp_path / "state.json"
    warm_state(state)
    agent = AgentProcess(tmp_path, "--probe", mode, "--state", str(state),
                         "--learning-period", "0s")
    try:
        try:
            agent.start(timeout=START_TIMEOUT)
        except RuntimeError as exc:
            # Only the agent's own verdict that this kernel does not offer the mode is a
            # skip (kprobes compiled out, fentry refused with EPERM), matched precisely: a
            # compile error or a verifier refusal fails.
            if agent.proc is not None and agent.proc.poll() == 2:
                why = [line for line in agent.log.read_text().splitlines()
                       if line.startswith("imdswatch run:")]
                text = why[-1] if why else agent.log.read_text()[-300:]
                lacks = ((mode == "kprobe" and not kernel.kprobes_available())
                         or (mode == "fentry" and probes.EPERM_TEXT in text
                             and "compilation failed" not in text))
                if lacks:
                    pytest.skip(f"this kernel does not offer the {mode} probe: {text}")
                raise AssertionError(f"the {mode} probe failed: {text}") from None
            raise AssertionError(str(exc)) from None
        log = agent.log.read_text()
        assert agent.metric("imdswatch_probe_info", mode=mode) == 1
        assert f"probe {mode} attached" in log
        # Request capture runs in every mode on every kernel with cgroup v2: the full egress
        # program, or where cgroup_skb may not call task helpers (Debian's 5.10, 6.1, 6.12)
        # the tracked one, which does not follow NAT'ed connections, and the agent says so.
        assert agent.metric("imdswatch_request_capture_enabled") == 1, log[-2000:]
        if agent.metric("imdswatch_request_capture_nat_enabled") != 1:
            assert kernel.kernel_version() < REFERENCE_KERNEL, log[-2000:]
            assert "request capture limited" in log, log[-2000:]
        # The identity reads load in every mode, except that a kernel whose cgroup programs
        # may not read the task refuses them there: the mode then runs without, and says so.
        if agent.metric("imdswatch_kernel_identity_enabled") != 1:
            assert mode == "cgroup" and "cgroup programs reading the task were refused" in log, \
                log[-2000:]
        # The identity record (executable, command line, parent from exec and fork) is read
        # by tgid in every mode, on every kernel of the matrix, the cgroup mode included.
        assert agent.metric("imdswatch_kernel_identity_record_enabled") == 1, log[-2000:]
        p = ns.popen(["curl", "-s", "-o", "/dev/null", f"http://{IMDS}{CREDENTIALS}"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p.wait(30)

        def mine() -> list[dict]:
            return [a for a in agent.alert_lines() if a["process"].get("pid") == p.pid]

        assert wait_for(mine, 20), agent.log.read_text()[-2000:]
        (alert,) = mine()
        assert alert["process"]["name"] == "curl" and alert["destination"]["ip"] == IMDS
        assert alert["process"]["executable"] == os.path.realpath(shutil.which("curl"))
        assert alert["process"]["parent"]["name"] and alert["process"]["command_line"]
        assert alert["http"]["request"]["method"] == "GET"
        assert alert["url"]["path"] == CREDENTIALS
        assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total",
                                             process="curl") >= 1, 10)
        # BPF sees every namespace: lost events are the agent's fault only when nothing but
        # this test's curl called a metadata address (no other run's flood beside it).
        assert agent.metric("imdswatch_kernel_events_dropped_total") == 0 or \
            agent.metric("imdswatch_metadata_connections_total") > \
            agent.metric("imdswatch_metadata_connections_total", process="curl")
        rc, _ = agent.stop(signal.SIGTERM, timeout=60)
        assert rc == 0
        assert "probes detached" in agent.log.read_text()
    finally:
        agent.kill()
