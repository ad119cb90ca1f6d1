# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
# Metadata addresses in this file are data (event fields): nothing here connects to them.
"""The alert-line cap: at most N lines per window of event time and per run, then one
summary line per window saying how many were held back and where to see them."""

import io
import json
import subprocess
import sys
from pathlib import Path

from exporters.alertcap import SUMMARY_DETECTOR, AlertCap
from exporters.alerts import AlertWriter
from intake.parser import event_from_ecs
from scoring.endpoints import BUILTIN_ENDPOINTS
from scoring.scorer import Outcome

ROOT = Path(__file__).resolve().parent.parent


def outcome(ts: float, detector: str = "rare_process") -> Outcome:
    doc = {"@timestamp": ts, "destination": {"ip": "169.254.169.254", "port": 80},
           "process": {"name": f"p{ts}"}}
    out = Outcome(event_from_ecs(doc), BUILTIN_ENDPOINTS[0])
    out.score, out.detector, out.rule_name = 90.0, detector, "Unusual"
    out.reason, out.entity, out.alert = "rare", f"p{ts}", True
    return out


def lines(stream: io.BytesIO) -> list[dict]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def test_window_cap_writes_one_summary_per_window() -> None:
    held = []
    cap = AlertCap(max_per_window=3, window=900, on_held=held.append)
    stream = io.BytesIO()
    writer = AlertWriter(stream, cap=cap)
    t0 = 1_700_000_000.0
    for i in range(10):  # one storm inside a 15-minute window
        writer.write(outcome(t0 + i, "rare_process" if i % 2 else "rare_user"))
    assert len(lines(stream)) == 3
    writer.write(outcome(t0 + 1000))  # the next window: its alert is written
    docs = lines(stream)
    summary = [d for d in docs if d["anomaly"]["detector"] == SUMMARY_DETECTOR]
    assert len(summary) == 1 and len(docs) == 5
    s = summary[0]
    assert s["imdswatch"]["alerts"]["held_back"] == 7 == len(held)
    assert s["imdswatch"]["alerts"]["held_back_by_detector"] == {"rare_process": 4,
                                                                 "rare_user": 3}
    assert "imdswatch_anomaly_score" in s["anomaly"]["reason"]
    assert s["event"]["kind"] == "alert"
    writer.close()  # nothing held in the last window: no further summary
    assert len(lines(stream)) == 5


def test_run_cap_and_final_summary_at_close() -> None:
    cap = AlertCap(max_per_window=0, max_per_run=2)
    stream = io.BytesIO()
    writer = AlertWriter(stream, cap=cap)
    for i in range(5):
        writer.write(outcome(1_700_000_000.0 + i * 3600))
    writer.close()
    docs = lines(stream)
    alerts = [d for d in docs if d["anomaly"]["detector"] != SUMMARY_DETECTOR]
    assert len(alerts) == 2
    assert sum(d["imdswatch"]["alerts"]["held_back"] for d in docs
               if d["anomaly"]["detector"] == SUMMARY_DETECTOR) == 3


def test_flush_waits_for_the_window_to_end() -> None:
    cap = AlertCap(max_per_window=1, window=60)
    assert cap.admit(100.0, "d") == (True, None)
    assert cap.admit(101.0, "d") == (False, None)
    assert cap.flush(150.0) is None
    summary = cap.flush(161.0)
    assert summary["imdswatch"]["alerts"]["held_back"] == 1
    assert cap.flush(None) is None


def _storm(tmp_path):
    # Two days of one agent on ten hosts, then 300 never-seen processes in five minutes of
    # event time: the first few alert (then new names stop being rare).
    events = tmp_path / "storm.ndjson"
    t0 = 1_700_000_000
    with events.open("w") as fh:
        for i in range(2000):
            fh.write(json.dumps({
                "@timestamp": t0 - 2 * 86400 + i * 86.4,
                "destination": {"ip": "169.254.169.254"}, "host": {"name": f"n{i % 10}"},
                "process": {"name": "amazon-ssm-agent"}}) + "\n")
        for i in range(300):
            fh.write(json.dumps({"@timestamp": t0 + i, "destination": {"ip": "169.254.169.254"},
                                 "process": {"name": f"tool{i}"},
                                 "host": {"name": f"n{i % 10}"}}) + "\n")
    return events


def _replay(tmp_path, events, *args):
    out = tmp_path / "alerts.ndjson"
    r = subprocess.run([sys.executable, "-c", "from imdswatch.cli import main; main()",
                        "replay", str(events), "--learning-period", "0", *args,
                        "--output", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r, [json.loads(x) for x in out.read_text().splitlines()]


def test_replay_caps_alert_lines_from_the_config(tmp_path) -> None:
    # The config allows two lines per 15-minute window.
    events = _storm(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text('[alerts]\nmax_per_window = 2\nwindow = "15m"\n')
    r, docs = _replay(tmp_path, events, "--config", str(config))
    alerts = [d for d in docs if d["anomaly"]["detector"] != SUMMARY_DETECTOR]
    summaries = [d for d in docs if d["anomaly"]["detector"] == SUMMARY_DETECTOR]
    assert len(alerts) == 2
    assert len(summaries) == 1
    held = summaries[0]["imdswatch"]["alerts"]["held_back"]
    assert held > 0 and held + 2 == int(r.stderr.split("alerts: ")[1].split()[0])
    assert "held back by the alert cap" in r.stderr


def test_replay_without_an_alerts_table_writes_every_alert(tmp_path) -> None:
    # The contract: one line for each event that reaches the threshold. The cap is the live
    # agent's default; replay caps only when the config asks for it.
    events = _storm(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text('[alerts]\nmax_per_window = 2\nwindow = "15m"\n')
    capped, _ = _replay(tmp_path, events, "--config", str(config))
    r, docs = _replay(tmp_path, events)
    assert all(d["anomaly"]["detector"] != SUMMARY_DETECTOR for d in docs)
    assert len(docs) == int(r.stderr.split("alerts: ")[1].split()[0]) > 2
    assert len(docs) == int(capped.stderr.split("alerts: ")[1].split()[0])
    assert "held back" not in r.stderr


def test_config_rejects_bad_cap_values(tmp_path) -> None:
    import pytest

    from imdswatch.config import ConfigError, parse_config

    for bad in ({"max_per_window": -1}, {"window": "0s"}, {"window": "nan"},
                {"max_per_run": "x"}, {"typo": 1}):
        with pytest.raises(ConfigError):
            parse_config({"alerts": bad})
    cfg = parse_config({"alerts": {"max_per_window": 5, "window": "1m", "max_per_run": 9}})
    assert (cfg.alerts.max_per_window, cfg.alerts.window, cfg.alerts.max_per_run) == (5, 60, 9)
