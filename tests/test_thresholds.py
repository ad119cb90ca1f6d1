"""Every threshold the options accept ([0, 100], global or per detector) scores every event:
no traceback, no event lost, and nothing that reached its detector's threshold left
unreported (`--threshold 0` once ended replay in `KeyError: 'exe_mismatch'`)."""

import subprocess
from pathlib import Path

from helpers_events import T0, ev, fleet_events, to_ecs, write_ndjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoring.detectors import DETECTOR_NAMES
from scoring.events import Event
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

ROOT = Path(__file__).resolve().parent.parent
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"
IMDS = "169.254.169.254"

thresholds = st.floats(min_value=0, max_value=100, allow_nan=False)
per_detector = st.dictionaries(st.sampled_from(DETECTOR_NAMES), thresholds, max_size=6)


@st.composite
def events(draw):
    """Connections and requests of a few callers, with and without the kernel's
    executable check: every detector gets values to judge, and some judge none."""
    name = draw(st.sampled_from(["curl", "kubelet", "python3", "amazon-ssm-agent", "x"]))
    ts = T0 + draw(st.floats(min_value=0, max_value=3 * 86400, allow_nan=False))
    kw: dict = dict(
        dst_port=80, pid=draw(st.integers(1, 5)),
        exe=draw(st.sampled_from([f"/usr/bin/{name}", f"/tmp/{name}", None])),
        user=draw(st.sampled_from(["root", "www-data", None])),
        uid=draw(st.sampled_from(["0", "33", None])),
        parent_name=draw(st.sampled_from(["systemd", "nginx", None])),
        host=draw(st.sampled_from(["node-0", "node-1"])),
        image=draw(st.sampled_from([None, "registry.local/shop/api:1"])),
        exe_mismatch=draw(st.sampled_from([None, False, True])),
    )
    if kw["exe_mismatch"]:
        kw["kernel_exe"], kw["proc_exe"] = "evil", kw["exe"]
    if draw(st.booleans()):
        kw.update(method=draw(st.sampled_from(["GET", "PUT"])),
                  path=draw(st.sampled_from([
                      "/latest/meta-data/iam/security-credentials/role",
                      "/latest/api/token", "/latest/meta-data/instance-id",
                      "/latest/dynamic/instance-identity/document"])),
                  guarded=draw(st.sampled_from([None, False, True])),
                  user_agent=draw(st.sampled_from([None, "curl/8", "aws-sdk"])))
    return Event(ts, IMDS, name, **kw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(thresholds, per_detector, st.sampled_from([0.0, 3600.0, 86400.0]),
       st.lists(events(), min_size=1, max_size=40))
def test_every_threshold_scores_every_event(threshold, by_detector, learning, items):
    settings_ = ScorerSettings(threshold=threshold, learning_period=learning)
    settings_.detector_thresholds.update(by_detector)
    scorer = Scorer(settings_)
    items.sort(key=lambda e: e.ts)
    for event in items:
        out = scorer.process(event)
        assert out is not None
        reached = [d for d, s in out.scores.items()
                   if s > 0 and s >= settings_.threshold_for(d)]
        # Nothing that reached its threshold goes unreported...
        assert out.anomalous == bool(reached), (out, out.scores)
        if out.anomalous:
            # ...and what names it is a detector that scored it, at or past its threshold.
            assert out.detector in out.scores
            assert out.score == out.scores[out.detector] > 0
            assert out.score >= settings_.threshold_for(out.detector)
        else:
            assert not out.alert
    assert scorer.events_learned == len(items)


def test_replay_threshold_zero_reports_every_scored_event(tmp_path):
    """The command a user types to see every score: it exits 0 and writes the scores."""
    history = fleet_events(hosts=3, days=0.5)
    docs = [to_ecs(e) for e in history]
    docs.append(to_ecs(ev(history[-1].ts + 60, "xmrig", host="node-1")))
    events_path = write_ndjson(tmp_path / "events.ndjson", docs)
    out = tmp_path / "alerts.ndjson"
    run = subprocess.run([IMDSWATCH, "replay", events_path, "--threshold", "0",
                          "--learning-period", "0", "--output", out],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert out.read_text().count("\n") >= 1
