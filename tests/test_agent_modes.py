"""`imdswatch run --probe MODE` end to end in every probe mode this kernel allows: the agent
attaches that mode, a curl in a private namespace calls a mock IMDS, the alert and the metrics
name the caller, and SIGTERM ends it cleanly. A mode the kernel refuses is skipped with the
agent's own reason; the kernel matrix (`make test-kernels`) fails on a kprobe or fentry skip,
since its Debian kernels have both."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from netns_fixtures import AgentProcess, MetadataNamespace, require_bcc, wait_for, warm_state

from tracer import probes

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"
# BCC compiles at start: seconds here, minutes in the matrix's emulated VMs on a loaded
# machine (scripts/kernel-guest.sh raises it).
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
            # Only the agent's own verdict that the mode cannot attach here is a skip.
            if agent.proc is not None and agent.proc.poll() == 2:
                why = [line for line in agent.log.read_text().splitlines()
                       if line.startswith("imdswatch run:")]
                pytest.skip(f"the {mode} probe cannot attach on this kernel: "
                            f"{why[-1] if why else agent.log.read_text()[-300:]}")
            raise AssertionError(str(exc)) from None
        assert agent.metric("imdswatch_probe_info", mode=mode) == 1
        assert f"probe {mode} attached" in agent.log.read_text()
        p = ns.popen(["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p.wait(30)

        def mine() -> list[dict]:
            return [a for a in agent.alert_lines() if a["process"].get("pid") == p.pid]

        assert wait_for(mine, 20), agent.log.read_text()[-2000:]
        (alert,) = mine()
        assert alert["process"]["name"] == "curl" and alert["destination"]["ip"] == IMDS
        assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total",
                                             process="curl") >= 1, 10)
        assert agent.metric("imdswatch_kernel_events_dropped_total") == 0
        rc, _ = agent.stop(signal.SIGTERM, timeout=60)
        assert rc == 0
        assert "probes detached" in agent.log.read_text()
    finally:
        agent.kill()
