"""A state `imdswatch run` cannot save is an error, never a silent exit 0: found at start
(exit 2, before attaching) or at the final save (exit 1, saying what is lost). The agent runs
as the DaemonSet runs it: uid 0 without CAP_DAC_OVERRIDE, so file permissions bind it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from netns_fixtures import AgentProcess, require_bcc, warm_state

pytestmark = [pytest.mark.root, pytest.mark.bpf]

# Root without the capabilities that bypass file permissions, like `drop: [ALL]` in the
# DaemonSet (which adds back only BPF, PERFMON, SYS_ADMIN, SYS_PTRACE, SYS_RESOURCE).
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def _agent(tmp_path, state) -> AgentProcess:
    a = AgentProcess(tmp_path, "--state", str(state), "--probe", "tracepoint")
    a.argv = [*NO_DAC, *a.argv]
    return a


def test_unwritable_state_directory_fails_at_start(tmp_path):
    require_bcc()
    d = tmp_path / "state"
    d.mkdir()
    os.chown(d, 65534, 65534)
    d.chmod(0o755)
    a = _agent(tmp_path, d / "state.json")
    r = subprocess.run(a.argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"the state cannot be saved to {d / 'state.json'} (Permission denied)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (d / "state.json").exists()


def test_final_save_refused_exits_non_zero(tmp_path):
    require_bcc()
    d = tmp_path / "state"
    d.mkdir()
    warm_state(d / "state.json")
    before = (d / "state.json").read_bytes()
    a = _agent(tmp_path, d / "state.json").start(timeout=120)
    try:
        os.chown(d, 65534, 65534)  # the directory is taken away while the agent runs
        rc, _ = a.stop(signal.SIGTERM, timeout=60)
    finally:
        a.kill()
    log = a.log.read_text()
    assert rc == 1, log
    assert "the state was not saved to" in log and "Permission denied" in log
    assert "Traceback" not in log
    assert (d / "state.json").read_bytes() == before  # the old state is intact
