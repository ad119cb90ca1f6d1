"""Saving, restoring and merging the learned state (scoring.state and `imdswatch state`)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers_events import DAY, HOUR, MINUTE, T0, Agent, ev, fleet_events

from scoring.scorer import Scorer
from scoring.settings import ScorerSettings
from scoring.state import StateError, load_state, save_state

ROOT = Path(__file__).resolve().parent.parent
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"
PYTHON = ROOT / ".venv" / "bin" / "python"


def settings(**kw):
    kw.setdefault("learning_period", DAY)
    return ScorerSettings(**kw)


def learned(events, **kw):
    scorer = Scorer(settings(**kw))
    for e in events:
        scorer.process(e)
    return scorer


def verdicts(scorer, events):
    """What a caller can observe of each outcome."""
    out = []
    for e in events:
        o = scorer.process(e)
        out.append(None if o is None else (
            o.alert, o.detector if o.scores else None, round(o.score, 9),
            {k: round(v, 9) for k, v in o.scores.items() if v}, o.reason, o.entity,
            o.suppressed, o.excepted, o.learning, o.known_caller))
    return out


def attacks(t):
    return [
        ev(t, "xmrig", exe="/tmp/xmrig", host="node-3"),
        ev(t + 60, "amazon-ssm-agent", exe="/tmp/amazon-ssm-agent", parent="systemd",
           host="node-2"),
        ev(t + 120, "curl", exe="/usr/bin/curl", user="www-data", host="node-1"),
        ev(t + 180, "aws", exe="/usr/local/bin/aws", user="mallory", host="node-0"),
        ev(t + 240, "python3", exe="/usr/bin/python3", user="app", parent="nginx",
           image="registry.local/shop/api:2.3.1", namespace="shop", host="node-4"),
        ev(t + 300, "python3", exe="/usr/bin/python3", user="app", parent="supervisord",
           image="docker.io/evil/miner:1", namespace="default", host="node-4"),
        ev(t + 360, "curl", exe="/usr/bin/curl", dst_ip="169.254.169.253", dst_port=53),
    ]


@pytest.fixture(scope="module")
def day1():
    return fleet_events(hosts=6, days=1.5)


@pytest.fixture(scope="module")
def day2():
    # The fleet carries on for half a day, with attacks among its habits.
    start = T0 + 1.5 * DAY
    evs = fleet_events(hosts=6, days=0.5, start=start) + attacks(start + 3 * HOUR)
    return sorted(evs, key=lambda e: e.ts)


# -- round trip -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["state.json", "state.json.gz"])
def test_round_trip_gives_identical_subsequent_outcomes(tmp_path, day1, day2, name):
    path = tmp_path / name
    continuous = learned(day1)
    saved = learned(day1)
    save_state(path, saved)
    restored = Scorer(settings())
    load_state(path, restored)

    expected = verdicts(continuous, day2)
    assert any(v and v[0] for v in expected), "the attacks should alert"
    assert verdicts(restored, day2) == expected
    # Saving does not disturb the scorer that was saved.
    assert verdicts(saved, day2) == expected
    # Introspection survives too.
    assert restored.hosts_seen == continuous.hosts_seen
    assert restored.model_size() == continuous.model_size()
    assert restored.learning == continuous.learning


def test_state_after_a_round_trip_saves_the_same_model(tmp_path, day1):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_state(a, learned(day1))
    scorer = Scorer(settings())
    load_state(a, scorer)
    save_state(b, scorer)
    sa, sb = json.loads(a.read_bytes()), json.loads(b.read_bytes())
    assert sa["hosts"] == sb["hosts"]
    assert sa["first_ts"] == sb["first_ts"] and sa["last_ts"] == sb["last_ts"]
    for det in sa["detectors"]:
        mine, other = entries(sa, det), entries(sb, det)
        assert set(mine) == set(other)
        for key, (n, hosts) in mine.items():
            assert other[key][0] == pytest.approx(n, rel=1e-12)
            assert other[key][1] == hosts


def test_learning_period_is_carried_by_the_state(tmp_path, day1):
    path = tmp_path / "state.json"
    save_state(path, learned(day1))
    # A new agent with the saved state is past its learning period at once ...
    warm = Scorer(settings())
    load_state(path, warm)
    assert not warm.learning
    assert warm.process(ev(T0 + 1.5 * DAY, "xmrig", exe="/tmp/xmrig", host="node-9")).alert
    # ... while one that learned only a few hours is still learning after a round trip.
    short = [e for e in day1 if e.ts < T0 + 3 * HOUR]
    save_state(path, learned(short))
    cold = Scorer(settings())
    load_state(path, cold)
    assert cold.learning
    out = cold.process(ev(T0 + 3 * HOUR, "xmrig", exe="/tmp/xmrig", host="node-1"))
    assert out.learning and not out.alert


def test_suppression_survives_a_round_trip(tmp_path):
    agents = (Agent("kubelet", "/usr/bin/kubelet", "root", "systemd", 10 * MINUTE),)
    hist = fleet_events(hosts=40, days=1.1, agents=agents)
    t = hist[-1].ts + 1
    scorer = learned(hist, threshold=5.0, suppression_window=HOUR)
    assert scorer.process(ev(t, "xmrig", exe="/tmp/xmrig", host="node-3")).alert
    save_state(tmp_path / "s.json", scorer)
    restored = Scorer(settings(threshold=5.0, suppression_window=HOUR))
    load_state(tmp_path / "s.json", restored)
    repeat = restored.process(ev(t + 10 * MINUTE, "xmrig", exe="/tmp/xmrig", host="node-3"))
    assert repeat.suppressed and not repeat.alert


def test_empty_scorer_round_trip(tmp_path, day2):
    path = tmp_path / "empty.json"
    save_state(path, Scorer(settings()))
    restored = Scorer(settings())
    load_state(path, restored)
    assert restored.learning and restored.hosts_seen == 0
    assert verdicts(restored, day2[:200]) == verdicts(Scorer(settings()), day2[:200])


def test_gzip_state(tmp_path, day1):
    gz = tmp_path / "state.json.gz"
    save_state(gz, learned(day1))
    raw = gz.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    doc = json.loads(gzip.decompress(raw))
    assert doc["format"] == "imdswatch-state" and isinstance(doc["version"], int)
    plain = tmp_path / "state.json"
    save_state(plain, learned(day1))
    assert json.loads(plain.read_bytes())["hosts"] == doc["hosts"]
    assert len(raw) < plain.stat().st_size
    # Recognised by its content, not its name.
    renamed = tmp_path / "state.bin"
    renamed.write_bytes(raw)
    scorer = Scorer(settings())
    load_state(renamed, scorer)
    assert scorer.hosts_seen == 6


# -- errors ---------------------------------------------------------------------------------

def state_file(tmp_path, day1):
    path = tmp_path / "good.json"
    save_state(path, learned(day1[:500]))
    return path, json.loads(path.read_bytes())


def test_unsupported_version_is_a_state_error_naming_the_file(tmp_path, day1):
    _, doc = state_file(tmp_path, day1)
    doc["version"] = 99
    bad = tmp_path / "future.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(StateError) as info:
        load_state(bad, Scorer(settings()))
    assert str(bad) in str(info.value)
    assert "99" in str(info.value) and "version" in str(info.value)


@pytest.mark.parametrize("content", [
    b'{"format": "something-else", "version": 1}',
    b'{"hello": "world"}',
    b"[1, 2, 3]",
    b'"imdswatch-state"',
])
def test_not_a_state_file(tmp_path, content):
    bad = tmp_path / "other.json"
    bad.write_bytes(content)
    with pytest.raises(StateError, match="other.json"):
        load_state(bad, Scorer(settings()))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "truncate-gzip", "empty"])
def test_corrupt_file_is_a_state_error(tmp_path, day1, damage):
    path, _ = state_file(tmp_path, day1)
    raw = path.read_bytes()
    bad = tmp_path / "corrupt.json"
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\xffnot json at all")
    elif damage == "truncate-gzip":
        bad.write_bytes(gzip.compress(raw)[:-20])
    else:
        bad.write_bytes(b"")
    with pytest.raises(StateError) as info:
        load_state(bad, Scorer(settings()))
    assert "corrupt.json" in str(info.value)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("hosts"),
    lambda d: d.pop("detectors"),
    lambda d: d.update(detectors={"rare_process": [["only", "three", 1]]}),
    lambda d: d.update(detectors={"rare_process": [[None, "x", "many", "1", 0.0]]}),
    lambda d: d.update(detectors={"rare_process": [[None, "x", 1.0, "zz", 0.0]]}),
])
def test_malformed_state_content_is_a_state_error(tmp_path, day1, mutate):
    _, doc = state_file(tmp_path, day1)
    mutate(doc)
    bad = tmp_path / "malformed.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="malformed.json"):
        load_state(bad, Scorer(settings()))


def test_missing_state_file_is_a_state_error(tmp_path):
    with pytest.raises(StateError, match="nope.json"):
        load_state(tmp_path / "nope.json", Scorer(settings()))


def test_state_error_is_a_value_error():
    assert issubclass(StateError, ValueError)


# -- a crash mid-save -----------------------------------------------------------------------

def _leftovers(directory, keep):
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in keep)


@pytest.mark.parametrize("victim", ["replace", "fsync", "interrupt"])
def test_failed_save_leaves_the_old_state_and_no_temp_file(tmp_path, day1, monkeypatch,
                                                           victim):
    path = tmp_path / "state.json"
    save_state(path, learned(day1[:300]))
    old = path.read_bytes()
    bigger = learned(day1)

    def boom(*args, **kwargs):
        if victim == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace" if victim == "replace" else "fsync", boom)
    if victim == "interrupt":
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt if victim == "interrupt" else OSError):
        save_state(path, bigger)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert _leftovers(tmp_path, {"state.json"}) == []
    scorer = Scorer(settings())
    load_state(path, scorer)  # still loads
    # And the next save works.
    save_state(path, bigger)
    assert path.read_bytes() != old
    assert _leftovers(tmp_path, {"state.json"}) == []


def test_failed_write_leaves_the_old_state(tmp_path, day1, monkeypatch):
    path = tmp_path / "state.json.gz"
    save_state(path, learned(day1[:300]))
    old = path.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError):
        save_state(path, learned(day1))
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert _leftovers(tmp_path, {"state.json.gz"}) == []


CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from helpers_events import ev, T0
    from scoring.scorer import Scorer
    from scoring.settings import ScorerSettings
    from scoring.state import save_state

    scorer = Scorer(ScorerSettings(learning_period=0))
    for i in range({entities}):
        scorer.process(ev(T0 + i * 0.01, f"proc-{{i}}", exe=f"/opt/p/{{i}}/bin/tool-{{i}}",
                          user=f"user-{{i % 997}}", parent=f"parent-{{i % 113}}",
                          host=f"node-{{i % 50}}"))
    print("saving", flush=True)
    while True:
        save_state(sys.argv[1], scorer)
""")


def test_sigkill_during_save_keeps_the_old_state(tmp_path, day1):
    """A real process saving a large state is SIGKILLed while its temp file is being
    written; the previous state file must be intact and load."""
    path = tmp_path / "state.json"
    save_state(path, learned(day1[:300]))
    old = path.read_bytes()
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), entities=20_000))
    deadline = time.monotonic() + 90
    landed = 0
    attempts = 0
    while landed == 0 and attempts < 8 and time.monotonic() < deadline:
        attempts += 1
        child = subprocess.Popen([str(PYTHON), str(script), str(path)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "saving"
            # Poll for the temp file; kill the moment it exists (a write is under way), or
            # the moment the state file itself changes (a writer that is not atomic).
            before = path.stat()
            while time.monotonic() < deadline and child.poll() is None:
                now = path.stat()
                if _leftovers(tmp_path, {"state.json", "child.py"}) or (
                        now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    child.send_signal(signal.SIGKILL)
                    break
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(10)
        assert child.returncode == -signal.SIGKILL
        temp = _leftovers(tmp_path, {"state.json", "child.py"})
        current = path.read_bytes()
        if temp:
            landed += 1
            # Killed between creating the temp file and renaming it: the old file remains.
            assert current == old
        else:
            # The rename won the race: the file is the child's complete new state.
            assert current != old
        scorer = Scorer(settings())
        load_state(path, scorer)  # loads either way
        for name in temp:
            (tmp_path / name).unlink()
        path.write_bytes(old)
    assert landed, f"no kill landed during a write in {attempts} attempts"


# -- merge ----------------------------------------------------------------------------------

def merge_cli(*args):
    return subprocess.run([str(IMDSWATCH), "state", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def read_state(path):
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return json.loads(raw)


def host_names(state):
    return [name for name, _seen in state["hosts"]]


def entries(state, detector):
    """{(context, value): (count, set of host names)} of one detector of a state file
    (version 2: contexts with their values; exact host sets as indices into "hosts")."""
    hosts = host_names(state)
    out = {}
    for ctx, _stats, values in state["detectors"][detector]:
        for value, n, _days, _day, _first, hs, _credit in values:
            names = {hosts[i] for i in hs} if isinstance(hs, list) else hs
            out[(json.dumps(ctx), json.dumps(value))] = (n, names)
    return out


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """State A: nodes 0-3 for 2 days. State B: nodes 3-5 (node-3 on both), stopping a
    day earlier, with a job only B's nodes run."""
    d = tmp_path_factory.mktemp("merge")
    a = learned(fleet_events(hosts=4, days=2))
    b_events = fleet_events(hosts=3, days=1, first_host=3) + [
        ev(T0 + 0.5 * DAY + i * HOUR, "etl-job", exe="/opt/etl/etl-job", user="etl",
           host=f"node-{4 + i % 2}") for i in range(10)]
    b = learned(sorted(b_events, key=lambda e: e.ts))
    save_state(d / "a.json", a)
    save_state(d / "b.json.gz", b)
    return d


def test_merge_cli_reindexes_hosts_and_sums_decayed_counts(two_nodes, tmp_path):
    out = tmp_path / "fleet.json"
    r = merge_cli(two_nodes / "a.json", two_nodes / "b.json.gz", "-o", out,
                  "--half-life", "1d")
    assert r.returncode == 0, r.stderr
    assert "merged 2 states" in r.stderr
    a, b, m = read_state(two_nodes / "a.json"), read_state(two_nodes / "b.json.gz"), \
        read_state(out)
    assert sorted(host_names(m)) == [f"node-{i}" for i in range(6)]
    assert len(m["hosts"]) == len(set(host_names(m)))
    assert m["last_ts"] == max(a["last_ts"], b["last_ts"]) == a["last_ts"]
    assert m["first_ts"] == min(a["first_ts"], b["first_ts"])
    assert m["events_learned"] == a["events_learned"] + b["events_learned"]
    # B's counts are one day (one half-life) older than A's: they count half.
    age = a["last_ts"] - b["last_ts"]
    assert age == pytest.approx(DAY, abs=HOUR)
    factor = 2.0 ** (-age / DAY)
    for det in m["detectors"]:
        ea, eb, em = entries(a, det), entries(b, det), entries(m, det)
        assert set(em) == set(ea) | set(eb)
        for key, (n, hosts) in em.items():
            na, ha = ea.get(key, (0.0, set()))
            nb, hb = eb.get(key, (0.0, set()))
            assert n == pytest.approx(na + nb * factor, rel=1e-9), (det, key)
            assert hosts == ha | hb, (det, key)
    etl = entries(m, "rare_process")[("null", '"etl-job"')]
    assert etl[1] == {"node-4", "node-5"}
    kubelet = entries(m, "rare_process")[("null", '"kubelet"')]
    assert kubelet[1] == {f"node-{i}" for i in range(6)}


def test_merge_is_written_gzip_when_named_gz(two_nodes, tmp_path):
    out = tmp_path / "fleet.json.gz"
    r = merge_cli(two_nodes / "a.json", two_nodes / "b.json.gz", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert read_state(out)["format"] == "imdswatch-state"


def test_new_node_with_the_merged_state(two_nodes, tmp_path):
    out = tmp_path / "fleet.json"
    assert merge_cli(two_nodes / "a.json", two_nodes / "b.json.gz", "-o", out).returncode == 0
    t = T0 + 2 * DAY
    habits = fleet_events(hosts=1, days=0.25, start=t, host_prefix="node-new-")
    habits += [ev(t + HOUR, "etl-job", exe="/opt/etl/etl-job", user="etl", host="node-new-0")]
    habits.sort(key=lambda e: e.ts)

    warm = Scorer(settings())
    load_state(out, warm)
    assert not warm.learning
    outs = [warm.process(e) for e in habits]
    assert not any(o.alert for o in outs), [o for o in outs if o.alert]
    attack = warm.process(ev(t + 7 * HOUR, "xmrig", exe="/tmp/xmrig", host="node-new-0"))
    assert attack.alert and attack.detector == "rare_process"
    assert "on 7 hosts" in attack.reason  # six merged nodes and the new one

    # Without the fleet's baseline, the new node would still be learning: blind.
    cold = Scorer(settings())
    for e in habits:
        cold.process(e)
    blind = cold.process(ev(t + 7 * HOUR, "xmrig", exe="/tmp/xmrig", host="node-new-0"))
    assert not blind.alert and blind.learning


def test_merge_with_a_single_input(two_nodes, tmp_path):
    out = tmp_path / "one.json"
    r = merge_cli(two_nodes / "a.json", "-o", out)
    assert r.returncode == 0, r.stderr
    a, m = read_state(two_nodes / "a.json"), read_state(out)
    assert m["hosts"] == a["hosts"]
    for det in a["detectors"]:
        ea, em = entries(a, det), entries(m, det)
        assert set(ea) == set(em)
        assert all(em[k][0] == pytest.approx(ea[k][0]) for k in ea)


def test_merge_of_a_bad_input_exits_2_naming_it(two_nodes, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    out = tmp_path / "out.json"
    r = merge_cli(two_nodes / "a.json", bad, "-o", out)
    assert r.returncode == 2
    assert "broken.json" in r.stderr
    assert not out.exists()


def test_merge_of_a_future_version_exits_2(two_nodes, tmp_path):
    doc = read_state(two_nodes / "a.json")
    doc["version"] = 42
    future = tmp_path / "future.json"
    future.write_text(json.dumps(doc))
    r = merge_cli(two_nodes / "a.json", future, "-o", tmp_path / "out.json")
    assert r.returncode == 2
    assert "future.json" in r.stderr and "42" in r.stderr


def test_merge_of_a_missing_input_exits_2(two_nodes, tmp_path):
    r = merge_cli(two_nodes / "a.json", tmp_path / "missing.json", "-o", tmp_path / "o.json")
    assert r.returncode == 2
    assert "missing.json" in r.stderr


def test_merge_needs_an_output(two_nodes):
    r = merge_cli(two_nodes / "a.json")
    assert r.returncode == 2
    assert "--output" in r.stderr or "-o" in r.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_state_cut_to_a_cap_leaves_out_what_the_scorer_would_evict(day1):
    """The fleet scorer hands agents a model cut to their cap (state_dict's max_entities):
    the same entries the model's own eviction would drop, contexts keeping their totals."""
    from scoring.state import load_state_dict, state_dict

    scorer = Scorer()
    for e in day1:
        scorer.process(e)
    total = scorer.entities
    keep = total * 2 // 3
    assert keep < total
    cut = state_dict(scorer, keep)
    loaded = Scorer()
    load_state_dict(loaded, cut, "cut")
    assert loaded.entities == keep
    scorer._evict(total - keep)

    def entries(s):
        return {(i, ctx, v) for i, t in enumerate(s.tables)
                for ctx, c in t.contexts.items() for v in c.values}

    assert entries(loaded) == entries(scorer)
    # Contexts keep their totals: what a value is compared with does not shrink.
    evicted = state_dict(scorer)["detectors"]
    for name, table in state_dict(loaded)["detectors"].items():
        want = {json.dumps(ctx): stats[0] for ctx, stats, _values in evicted[name]}
        for ctx, stats, _values in table:
            assert stats[0] == pytest.approx(want[json.dumps(ctx)])


def test_streamed_state_is_the_state(day1, tmp_path, monkeypatch):
    """A fleet checkpoint is written in pieces (state_chunks): the same document as
    state_dict, plain and gzip, across piece boundaries."""
    from scoring import state as st

    scorer = Scorer()
    for e in day1:
        scorer.process(e)
    monkeypatch.setattr(st, "STREAM_CONTEXTS", 3)  # many pieces per table
    want = json.loads(json.dumps({**st.state_dict(scorer), "fleet": {"wal_seq": 7}}))
    assert json.loads(b"".join(st.state_chunks(scorer, {"fleet": {"wal_seq": 7}}))) == want
    path = tmp_path / "s.json.gz"
    st.write_atomic(path, st.state_chunks(scorer, {"fleet": {"wal_seq": 7}}), gz=True)
    assert json.loads(gzip.decompress(path.read_bytes())) == want
    empty = Scorer()
    assert json.loads(b"".join(st.state_chunks(empty))) == json.loads(
        json.dumps(st.state_dict(empty)))
