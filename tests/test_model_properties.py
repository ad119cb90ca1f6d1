"""Property-based tests of the model's clock and state: no spread of event times
overflows, a state survives a round trip exactly, and no mangled state is half-loaded."""

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers_events import DAY, HOUR, T0, ev, fleet_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoring.rarity import Clock
from scoring.scorer import MAX_ABS_TS, Scorer
from scoring.settings import ScorerSettings
from scoring.state import (
    StateError,
    load_state,
    load_state_dict,
    merge_states,
    model_from_bytes,
    model_to_bytes,
    remove_stale_temps,
    save_state,
    state_dict,
    state_lock,
)

ROOT = Path(__file__).resolve().parent.parent
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"

# Any epoch time the model accepts: 1970-era, today, year ~5000, and before 1970.
times = st.floats(min_value=-MAX_ABS_TS, max_value=MAX_ABS_TS, allow_nan=False)
names = st.sampled_from(["kubelet", "curl", "aws", "python3", "xmrig"])
events = st.lists(st.tuples(times, names, st.sampled_from(["node-0", "node-1", "node-2"])),
                  min_size=1, max_size=30)
half_lives = st.sampled_from([1.0, 60.0, HOUR, 14 * DAY])


def scored(scorer, items):
    outs = [scorer.process(ev(t, name, host=host)) for t, name, host in items]
    for o in outs:
        assert 0.0 <= o.score <= 100.0
        assert all(0.0 <= v <= 100.0 and not math.isnan(v) for v in o.scores.values())
    return outs


@settings(max_examples=150, deadline=None)
@given(events, half_lives)
def test_no_spread_of_event_times_breaks_the_model(items, half_life):
    scorer = Scorer(ScorerSettings(learning_period=0, half_life=half_life))
    scored(scorer, items)
    state = state_dict(scorer)
    json.dumps(state, allow_nan=False)  # every number in the state is finite
    restored = Scorer(ScorerSettings(learning_period=0, half_life=half_life))
    load_state_dict(restored, state)


@settings(max_examples=100, deadline=None)
@given(times, times, half_lives)
def test_clock_weight_is_finite_and_positive(a, b, half_life):
    factors = []
    clock = Clock(half_life, rescale=factors.append)
    for t in (a, b, a):
        w = clock.weight(t)
        assert math.isfinite(w) and w > 0
    assert all(0.0 <= f <= 1.0 for f in factors)
    assert 0.0 <= clock.exposure(a, b) <= half_life / math.log(2) + 1e-6


def test_1970_state_meets_todays_events(tmp_path):
    # A state warmed on 1970-era data, then today's events: its history is ~56 years old
    # and simply forgotten, with no OverflowError or ZeroDivisionError.
    old = Scorer(ScorerSettings(learning_period=DAY))
    for e in fleet_events(hosts=3, days=2, start=86400.0):
        old.process(e)
    path = tmp_path / "old.json"
    save_state(path, old)
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    load_state(path, scorer)
    out = scorer.process(ev(T0, "xmrig", exe="/tmp/xmrig", host="node-1"))
    assert 0 <= out.score <= 100
    for e in fleet_events(hosts=3, days=0.1, start=T0 + 1):
        scorer.process(e)
    # The 1970 counts faded out: only today's calls count.
    today = sum(1 for e in fleet_events(hosts=3, days=0.1, start=T0 + 1) if e.name == "kubelet")
    assert scorer.count("rare_process", None, "kubelet") == pytest.approx(today, rel=0.01)
    save_state(path, scorer)


def test_events_39_years_apart_both_ways():
    scorer = Scorer(ScorerSettings(learning_period=0))
    span = 39 * 365.25 * DAY
    for t in (T0, T0 + span, T0, T0 + span + 1, T0 - span):
        out = scorer.process(ev(t, "curl"))
        assert 0 <= out.score <= 100


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e20, -1e20])
def test_times_that_are_not_epoch_seconds_are_refused(bad):
    scorer = Scorer()
    with pytest.raises(ValueError, match="not an epoch time"):
        scorer.process(ev(bad, "curl"))
    assert scorer.first_ts is None  # nothing was learned from it


# -- state round trip ----------------------------------------------------------------------

@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=3 * DAY), names,
                          st.integers(min_value=0, max_value=60)),
                min_size=1, max_size=60),
       st.booleans())
def test_state_round_trip_is_exact(items, gz):
    # Up to 61 hosts: entries past the exact-set cap keep sketches, which round-trip too.
    scorer = Scorer(ScorerSettings(learning_period=HOUR))
    for dt, name, h in sorted(items):
        scorer.process(ev(T0 + dt, name, host=f"node-{h}"))
    data = model_to_bytes(scorer, gz=gz)
    restored = Scorer(ScorerSettings(learning_period=HOUR))
    model_from_bytes(restored, data)
    assert state_dict(restored) == state_dict(scorer)
    assert model_to_bytes(restored, gz=gz) == data
    probe = ev(T0 + 3 * DAY + 60, "kubelet", host="node-1")
    a, b = scorer.process(probe), restored.process(probe)
    # Counts are stored decayed to the last event: equal up to float rounding.
    assert a.score == pytest.approx(b.score, rel=1e-9, abs=1e-9)
    # (A caller known to be common is not re-scored: its outcome lists no scores, where
    # a full scoring lists zeros; only non-zero scores are a verdict.)
    nonzero_a = {k: v for k, v in a.scores.items() if v}
    nonzero_b = {k: v for k, v in b.scores.items() if v}
    assert nonzero_a == pytest.approx(nonzero_b, rel=1e-9, abs=1e-9)
    assert (a.detector, a.reason, a.alert) == (b.detector, b.reason, b.alert)


def _state(hosts=40, prefix="node-"):
    scorer = Scorer(ScorerSettings(learning_period=HOUR))
    for e in fleet_events(hosts=hosts, days=0.2, host_prefix=prefix):
        scorer.process(e)
    return state_dict(scorer)


def _first_values(state):
    return state["detectors"]["rare_process"][0][2]


MANGLE = {
    "negative count": lambda s: _first_values(s)[0].__setitem__(1, -1.0),
    "count a string": lambda s: _first_values(s)[0].__setitem__(1, "many"),
    "host index out of range": lambda s: _first_values(s)[0].__setitem__(5, [999]),
    "sketch registers": lambda s: s["detectors"]["rare_process"][0][1].__setitem__(
        4, {"epoch": 0, "cur": "AAAA", "prev": None}),
    "unknown detector": lambda s: s["detectors"].__setitem__("rare_teapot", []),
    "duplicate host": lambda s: s["hosts"].append(list(s["hosts"][0])),
    "first after last": lambda s: s.__setitem__("first_ts", s["last_ts"] + 1),
    "short entry": lambda s: _first_values(s)[0].pop(),
    "context an object": lambda s: s["detectors"]["rare_process"][0].__setitem__(0, {}),
    "events_learned negative": lambda s: s.__setitem__("events_learned", -5),
    "suppression short": lambda s: s.__setitem__("suppression", [["a", "b"]]),
    "rollouts not a list": lambda s: s.__setitem__("rollouts", {"a": 1}),
    "rollout of an unknown kind": lambda s: s.__setitem__("rollouts", [
        [["curl"], 1.0, 2.0, "node-0", "stampede", "curl", 0, ["node-0"]]]),
    "rollout hosts not names": lambda s: s.__setitem__("rollouts", [
        [["curl"], 1.0, 2.0, "node-0", "spread", "curl", 0, [7]]]),
}


@pytest.mark.parametrize("what", sorted(MANGLE))
def test_invalid_states_are_refused_with_the_reason_and_leave_the_scorer(what):
    state = _state()
    MANGLE[what](state)
    scorer = Scorer()
    scorer.process(ev(T0, "kubelet"))
    before = state_dict(scorer)
    with pytest.raises(StateError, match="snapshot: malformed state at"):
        load_state_dict(scorer, state, "snapshot")
    assert state_dict(scorer) == before
    with pytest.raises(StateError, match="snapshot"):
        merge_states([_state(), state], 14 * DAY, ["good", "snapshot"])


def test_an_older_state_version_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"format": "imdswatch-state", "version": 1, "hosts": [],
                                "detectors": {}, "first_ts": None, "last_ts": None}))
    with pytest.raises(StateError, match="older imdswatch.*move it aside"):
        load_state(path, Scorer())
    r = subprocess.run([str(IMDSWATCH), "state", "show", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "version 1" in r.stderr and "Traceback" not in r.stderr


def test_merge_is_linear_in_hosts_and_keeps_spread():
    # 3 states of 40 hosts each: sketches and exact sets merge by host name.
    a, b, c = (_state(40, prefix) for prefix in ("a-", "b-", "c-"))
    merged = merge_states([a, b, c], 14 * DAY)
    scorer = Scorer()
    load_state_dict(scorer, merged)
    assert scorer.hosts_seen == 120
    kubelet = scorer.tables[0].contexts[None].values["kubelet"]
    assert 100 <= len(kubelet.hosts) <= 140  # HyperLogLog estimate of 120 hosts


# -- one writer per state --------------------------------------------------------------------

def test_state_lock_refuses_a_second_writer(tmp_path):
    path = tmp_path / "state.json"
    with state_lock(path):
        with pytest.raises(StateError, match="in use by another imdswatch"):
            with state_lock(path):
                pass
    with state_lock(path):  # released
        pass


def test_concurrent_replay_on_one_state_exits_2(tmp_path):
    path = tmp_path / "state.json"
    trace = tmp_path / "empty.ndjson"
    trace.write_text("")
    holder = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "python"), "-c",
         "import sys,time; from scoring.state import state_lock\n"
         f"with state_lock({str(path)!r}):\n print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run([str(IMDSWATCH), "replay", str(trace), "--state", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "in use by another imdswatch" in r.stderr and str(holder.pid) in r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = subprocess.run([str(IMDSWATCH), "replay", str(trace), "--state", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    path = tmp_path / "state.json.gz"
    stale = [tmp_path / ".state.json.gz.abc123.tmp", tmp_path / ".state.json.gz.x.tmp"]
    for p in stale:
        p.write_bytes(b"half a state")
    other = tmp_path / ".other.json.q.tmp"
    other.write_bytes(b"not ours")
    with state_lock(path):
        pass
    assert not any(p.exists() for p in stale)
    assert other.exists()
    assert remove_stale_temps(path) == []
