"""The executable seen in the kernel at connect time against /proc's, as evidence:
a process that connects from a copy (/tmp/.../amazon-ssm-agent) and execs another binary
before /proc is read must alert as such: through the model, in replay (the field of an ECS
export is honoured) and live (the real agent, real BPF, real processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from netns_fixtures import AgentProcess, MetadataNamespace, require_bcc, wait_for

from exporters.alerts import build_alert
from intake.parser import event_from_ecs
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings
from scoring.state import save_state

IMDS = "169.254.169.254"
DAY = 86400.0
T0 = 1_780_000_000.0
AGENT = "amazon-ssm-agent"
AGENT_EXE = f"/usr/bin/{AGENT}"


def doc(ts: float, *, mismatch: bool = False, kernel: str = AGENT, name: str = "amazon-ssm-agen",
        host: str = "node-1", proc: str = AGENT_EXE, parent: str = "systemd") -> dict:
    """A connection as the live tracer writes it (tracer/ecs.py), kernel identity included."""
    process: dict = {"name": name, "pid": 4242,
                     "parent": {"name": parent, "pid": 1}}
    kp: dict = {"kernel_executable": {"name": kernel, "inode": 1234}}
    if mismatch:
        kp["exe_mismatch"] = True
        kp["proc_executable"] = proc
    else:
        process["executable"] = proc
    return {"@timestamp": ts, "event": {"kind": "event", "category": ["network"],
                                        "type": ["connection", "start"],
                                        "action": "connection_attempted"},
            "destination": {"ip": IMDS, "port": 80}, "process": process,
            "user": {"name": "root", "id": "0"}, "host": {"name": host},
            "imdswatch": {"probe": "cgroup", "process": kp}}


def history(days: float = 3, per_day: int = 200) -> list[dict]:
    step = DAY / per_day
    return [doc(T0 + i * step, host=f"node-{i % 4}") for i in range(int(days * per_day))]


def test_the_field_reaches_the_event():
    e = event_from_ecs(doc(T0, mismatch=True, kernel="amazon-ssm-agent"))
    assert e.exe_mismatch is True and e.exe is None
    assert e.kernel_exe == "amazon-ssm-agent" and e.proc_exe == AGENT_EXE
    same = event_from_ecs(doc(T0))
    assert same.exe_mismatch is False and same.kernel_exe is None
    plain = doc(T0)
    del plain["imdswatch"]["process"]
    assert event_from_ecs(plain).exe_mismatch is None  # unknown: not judged
    assert same.signature() != e.signature()


def test_a_known_agent_that_changed_executable_alerts_as_such():
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    for d in history():
        assert not scorer.process(event_from_ecs(d)).alert
    out = scorer.process(event_from_ecs(doc(T0 + 3 * DAY, mismatch=True)))
    assert out.alert and out.detector == "exe_mismatch", out
    assert out.score >= 90
    assert "/usr/bin/amazon-ssm-agent" in out.reason and "kernel" in out.reason
    assert "\n" not in out.reason
    alert = build_alert(out)
    assert alert["imdswatch"]["process"] == {
        "exe_mismatch": True, "kernel_executable": {"name": AGENT},
        "proc_executable": AGENT_EXE}
    assert "executable" not in alert["process"]
    # The same events without a mismatch: nothing.
    ok = scorer.process(event_from_ecs(doc(T0 + 3 * DAY + 60)))
    assert not ok.alert and ok.scores.get("exe_mismatch") is None


def test_a_mismatch_needs_no_history():
    # A fresh node, still learning: the mismatch alerts on its own.
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    out = scorer.process(event_from_ecs(doc(T0, mismatch=True)))
    assert out.learning and out.alert and out.detector == "exe_mismatch", out


def test_a_binary_that_keeps_mismatching_is_learnt():
    # A binary replaced in place on every node (an upgrade before a restart): the first
    # mismatch alerts, then it becomes this name's habit like any value.
    scorer = Scorer(ScorerSettings(learning_period=0, suppression_window=60))
    outs = [scorer.process(event_from_ecs(doc(T0 + i * 600, mismatch=True, name="updater",
                                              kernel="updater", proc="/opt/updater",
                                              host=f"node-{i % 4}")))
            for i in range(400)]
    assert outs[0].alert
    assert not any(o.alert for o in outs[-50:]), [o.reason for o in outs[-50:] if o.alert][:1]


def test_replay_honours_the_field_of_an_export(tmp_path):
    events = tmp_path / "export.ndjson"
    lines = [*history(), doc(T0 + 3 * DAY, mismatch=True)]
    events.write_text("".join(json.dumps(d) + "\n" for d in lines))
    out = tmp_path / "alerts.ndjson"
    r = subprocess.run([sys.executable, "-c", "from imdswatch.cli import main; main()",
                        "replay", str(events), "--output", str(out), "--learning-period", "1d"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    alerts = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["anomaly"]["detector"] for a in alerts] == ["exe_mismatch"], alerts
    assert alerts[0]["imdswatch"]["process"]["exe_mismatch"] is True


# -- live: the real agent, real BPF, a real process ------------------------------------------

def _warm(path: Path) -> None:
    scorer = Scorer(ScorerSettings(learning_period=0))
    now = time.time()
    for d in history():
        d["@timestamp"] = now - 3 * DAY + (d["@timestamp"] - T0)
        scorer.process(event_from_ecs(d))
    save_state(path, scorer)


def test_live_copy_that_execs_the_agent_binary_alerts(tmp_path):
    require_bcc()
    fake = tmp_path / "tmp" / AGENT  # the attacker's copy
    real = tmp_path / "usr-bin" / AGENT  # the binary it passes itself off as
    for p in (fake, real):
        p.parent.mkdir()
        shutil.copy("/usr/bin/bash", p)
    state = tmp_path / "state.json"
    _warm(state)
    with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
        agent = AgentProcess(tmp_path, "--state", str(state), "--learning-period", "0s")
        try:
            agent.start()
            # The agent is stopped while the copy connects and execs: it reads /proc only
            # after the exec, as a slow or loaded agent would (the event waits in the ring
            # buffer). The race this closes is the attacker's to win, not the test's.
            agent.proc.send_signal(signal.SIGSTOP)
            try:
                p = ns.popen([str(fake), "-c",
                              f"exec 3<>/dev/tcp/{IMDS}/80; "
                              f"exec {real} -c 'sleep 3; true'"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                assert wait_for(lambda: os.path.realpath(f"/proc/{p.pid}/exe") == str(real),
                                10)
            finally:
                agent.proc.send_signal(signal.SIGCONT)

            def mine() -> list[dict]:
                return [a for a in agent.alert_lines() if a["process"].get("pid") == p.pid]

            assert wait_for(mine, 15), agent.log.read_text()[-2000:]
            p.wait(10)
            (alert,) = mine()
            assert alert["anomaly"]["detector"] == "exe_mismatch", alert["anomaly"]
            assert alert["process"]["name"] == "amazon-ssm-agen"
            assert alert["imdswatch"]["process"]["kernel_executable"] == {"name": AGENT}
            assert alert["imdswatch"]["process"]["proc_executable"] == str(real)
            assert str(real) in alert["anomaly"]["reason"]
            assert wait_for(lambda: agent.metric("imdswatch_anomalies_total",
                                                 detector="exe_mismatch") >= 1, 5)
            assert agent.stop()[0] == 0
        finally:
            agent.kill()
