# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them.
"""Hostile and careless input to the one ECS reader and to `imdswatch replay`:
timestamps, types, nesting, line length, names, stdio and output failures, FIFOs and
process substitution, signals. Property tests (hypothesis) where the space is large."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import msgspec
import orjson
import pytest
from helpers_events import DAY, HOUR, T0, ev, fleet_events, to_ecs, unique_times, write_ndjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intake import ndjson
from intake.ecs_schema import decoder
from intake.ndjson import numbered_lines
from intake.parser import MalformedEvent, event_from_ecs, parse_timestamp, read_doc
from intake.reader import read_events
from scoring.endpoints import EndpointCatalog

ROOT = Path(__file__).resolve().parents[1]
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"
NOON = 1714564800.0  # 2024-05-01T12:00:00Z
CATALOG = EndpointCatalog.from_config()


def doc(**over) -> dict:
    d = {"@timestamp": "2024-05-01T12:00:00Z",
         "destination": {"ip": "169.254.169.254", "port": 80},
         "process": {"name": "curl"}}
    d.update(over)
    return d


def read_lines(lines: list[bytes]):
    """(events, malformed reports, skipped counts) of `lines` through the replay reader."""
    bad: list[tuple[int, str, str]] = []
    skipped: Counter = Counter()
    numbered = list(enumerate(lines, 1))
    events = list(read_events(numbered, CATALOG.match,
                              lambda n, r, k: bad.append((n, r, k)), skipped))
    return [e for _, e, _ in events], bad, skipped


def replay(*args, stdin=None, input=None, timeout=120, **kw):
    return subprocess.run([str(IMDSWATCH), "replay", *map(str, args)], stdin=stdin,
                          input=input, capture_output=True, timeout=timeout, **kw)


# -- timestamps -------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    0, -1, 1e20, -1e20, "inf", "-inf", "nan", "NaN", "Infinity", "1e20", "0", "-1",
    "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z",
    "2100-01-01T00:00:00Z", 10**30, "", " ",
])
def test_absurd_timestamps_are_malformed_with_a_reason(value):
    with pytest.raises(MalformedEvent, match="@timestamp") as info:
        parse_timestamp(value)
    assert info.value.kind == "bad @timestamp"


@pytest.mark.parametrize(("value", "expected"), [
    (1714564800, NOON),                       # seconds
    (1714564800123, NOON + 0.123),            # milliseconds
    (1714564800123456, NOON + 0.123456),      # microseconds (not read as ms: year 56k)
    (1714564800123456789, NOON + 0.123456789),  # nanoseconds
    ("1714564800123456", NOON + 0.123456),
    (946684800, 946684800.0),                 # the first second accepted
])
def test_epoch_units_are_recognised(value, expected):
    assert parse_timestamp(value) == pytest.approx(expected, abs=1e-6)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                 st.integers(min_value=-(10**25), max_value=10**25),
                 st.text(max_size=40)))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_timestamp_is_finite_and_in_range_or_malformed(value):
    try:
        ts = parse_timestamp(value)
    except MalformedEvent:
        return
    assert math.isfinite(ts) and 946684800.0 <= ts < 4102444800.0


def test_nan_timestamp_never_blocks_the_events_behind_it(tmp_path):
    events = unique_times(fleet_events(hosts=1, days=0.5))
    docs = [to_ecs(e) for e in events]
    docs.insert(3, doc(**{"@timestamp": "nan"}))
    docs.insert(7, doc(**{"@timestamp": 1e20}))
    path = write_ndjson(tmp_path / "t.ndjson", docs)
    r = replay(path, "--output", os.devnull)
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert "line 4:" in err and "line 8:" in err and "not a finite time" in err
    assert f"metadata events scored: {len(events)}" in err
    assert "malformed lines: 2" in err and "bad @timestamp 2" in err


# -- types, names -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [5, 1.5, True, {"a": 1}, [1], [{"x": 1}], {"": []}])
def test_a_name_that_is_not_text_is_malformed_with_its_line(name):
    _, bad, _ = read_lines([orjson.dumps(doc()), orjson.dumps(doc(process={"name": name}))])
    assert len(bad) == 1 and bad[0][0] == 2 and "process.name" in bad[0][1]


@pytest.mark.parametrize("field,value", [
    ("destination", "169.254.169.254"), ("process", ["curl"]), ("user", 3),
    ("host", {"name": {"x": 1}}), ("container", {"image": "nginx"}),
    ("event", {"action": 7}),
])
def test_every_field_is_type_checked(field, value):
    _, bad, _ = read_lines([orjson.dumps(doc(**{field: value}))])
    assert len(bad) == 1 and field in bad[0][1], bad


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_any_text_name_is_an_event_with_that_name(name):
    """"" (prctl), newlines, control characters, any unicode: a value, scored."""
    events, bad, _ = read_lines([orjson.dumps(doc(process={"name": name}))])
    assert not bad
    assert [e.name for e in events] == [name]


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                    | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_value_anywhere_gives_an_event_or_a_reason(junk):
    """Whatever JSON sits in any field the reader knows, the result is an event, a skip or
    a malformed report: never an exception."""
    for path in ("process.name", "process.pid", "destination.ip", "destination.port",
                 "@timestamp", "user.id", "host", "event.category", "event.action",
                 "imdswatch.request.guarded", "_source", "hits"):
        d = doc()
        node = d
        *parents, last = path.split(".") if path != "@timestamp" else [path]
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = junk
        events, bad, skipped = read_lines([orjson.dumps(d)])
        assert len(events) + len(bad) + sum(skipped.values()) >= 1


def test_empty_and_odd_names_are_scored_by_the_cli(trace, tmp_path):
    docs = [orjson.loads(line) for line in trace.read_bytes().splitlines()]
    last = docs[-1]["@timestamp"]
    for i, name in enumerate(["", "evil\n", "\u202egnp.exe", " "]):
        docs.append({**doc(process={"name": name, "executable": f"/tmp/x{i}"}),
                     "@timestamp": last, "host": {"name": "node-1"}})
    path = tmp_path / "names.ndjson"
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    r = replay(path, "--learning-period", "1h")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert f"metadata events scored: {len(docs)}" in err and "malformed lines: 0" in err
    names = {orjson.loads(line)["process"]["name"] for line in r.stdout.splitlines()}
    assert {"", "evil\n"} <= names


def test_live_and_replayed_documents_read_alike():
    d = doc(process={"name": "", "pid": "42", "parent": {"name": ["bash"]}},
            user={"id": 0}, host={"hostname": "h1"}, event={"id": 7})
    line = orjson.dumps(d)
    events, bad, _ = read_lines([line])
    assert not bad
    live = event_from_ecs(d)
    for slot in ("ts", "name", "pid", "parent_name", "uid", "host", "event_id"):
        assert getattr(events[0], slot) == getattr(live, slot), slot
    assert (live.name, live.pid, live.parent_name, live.uid, live.host, live.event_id) == (
        "", 42, "bash", "0", "h1", "7")


def test_long_fields_are_cut_not_refused():
    long = "a" * 100_000
    events, bad, _ = read_lines([orjson.dumps(doc(process={"name": "x", "command_line": long,
                                                           "executable": "/" + long}))])
    assert not bad
    assert len(events[0].command_line) == 4096 and len(events[0].exe) == 4096


# -- nesting and length ----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_nesting_in_an_unknown_field_is_one_malformed_line(depth):
    deep = b'{"@timestamp":"2024-05-01T12:00:00Z","destination":{"ip":"169.254.169.254"},' \
           b'"process":{"name":"x"},"junk":' + b"[" * depth + b"]" * depth + b"}"
    events, bad, _ = read_lines([deep, orjson.dumps(doc())])
    assert len(events) == 1
    assert [(n, k) for n, _, k in bad] == [(1, "too deep")]


def test_deep_document_is_refused_by_the_cli_too(tmp_path):
    path = tmp_path / "deep.ndjson"
    path.write_bytes(b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n" + orjson.dumps(doc()) + b"\n")
    r = replay(path, "--output", os.devnull)
    assert r.returncode == 0 and b"Traceback" not in r.stderr
    assert b"line 1: skipped malformed event: JSON nested too deeply" in r.stderr


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
       st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=50))
@settings(max_examples=300, deadline=None)
def test_lines_cut_at_any_block_size_with_a_length_cap(lines, block, cap):
    """Every line comes back whole with its number, or as None when longer than the cap,
    whatever the block boundaries."""
    data = b"\n".join(lines)
    if data.startswith(b"\x1f\x8b"):
        data = b"\n" + data  # not the gzip magic: that would be read as gzip
        lines = [b"", *lines]
    path = Path(f"/tmp/imdsw-lines-{os.getpid()}")
    path.write_bytes(data)
    old = ndjson.BLOCK
    ndjson.BLOCK = block
    try:
        got = list(numbered_lines(str(path), max_line=cap))
    finally:
        ndjson.BLOCK = old
        path.unlink()
    want = [(i, line if len(line) <= cap else None) for i, line in enumerate(lines, 1)
            if len(line) > cap or (line and not line.isspace())]
    assert got == want


def test_a_huge_line_is_refused_with_its_number_in_linear_time(tmp_path):
    path = tmp_path / "huge.ndjson"
    with open(path, "wb") as f:
        f.write(orjson.dumps(doc()) + b"\n")
        f.write(b'{"x":"' + b"a" * (ndjson.MAX_LINE_BYTES + 10) + b'"}\n')
        f.write(orjson.dumps(doc()) + b"\n")
    r = replay(path, "--output", os.devnull, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"line 2: skipped malformed event: line longer than" in r.stderr
    assert b"metadata events scored: 2" in r.stderr


# -- stdio, output failures, odd inputs --------------------------------------------------------

def alerting_trace(path: Path) -> Path:
    events = fleet_events(hosts=4, days=2)
    events.append(ev(T0 + 1.5 * DAY, "xmrig", exe="/tmp/xmrig", host="node-1"))
    events.append(ev(T0 + 1.5 * DAY + HOUR, "kinsing", exe="/tmp/kinsing", host="node-0"))
    return write_ndjson(path, [to_ecs(e) for e in unique_times(events)])


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return alerting_trace(tmp_path_factory.mktemp("hostile") / "trace.ndjson")


def assert_state_saved(state: Path):
    assert state.exists() and state.stat().st_size > 0
    r = subprocess.run([str(IMDSWATCH), "state", "show", str(state)], capture_output=True)
    assert r.returncode == 0 and b"metadata events scored" in r.stdout, r.stderr


def test_closed_stdin_is_one_message_and_exit_2():
    r = subprocess.run(["bash", "-c", f"exec {IMDSWATCH} replay - <&-"], capture_output=True)
    assert r.returncode == 2
    assert r.stderr.strip() == b"imdswatch: standard input is closed"


def test_closed_stdout_is_one_message_and_exit_2(trace):
    r = subprocess.run(["bash", "-c", f"exec {IMDSWATCH} replay {trace} >&-"],
                       capture_output=True)
    assert r.returncode == 2
    assert b"standard output is closed" in r.stderr and b"Traceback" not in r.stderr


def test_alerts_to_dev_full_exit_2_with_the_state_saved(trace, tmp_path):
    state = tmp_path / "state.json"
    r = replay(trace, "--output", "/dev/full", "--state", state, "--learning-period", "1h")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err
    assert "/dev/full: cannot write alerts (No space left on device)" in err
    assert_state_saved(state)


def test_alerts_to_a_full_tmpfs_exit_2_with_the_state_saved(trace, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)]).returncode:
        pytest.fail("cannot mount a tmpfs (the tests run as root)")
    try:
        (mnt / "filler").write_bytes(b"x" * 4096)  # the one page is gone
        state = tmp_path / "state.json"
        r = replay(trace, "--output", mnt / "alerts.ndjson", "--state", state,
                   "--learning-period", "1h")
        assert r.returncode == 2, r.stderr
        assert b"cannot write alerts (No space left on device)" in r.stderr
        assert b"Traceback" not in r.stderr
        assert_state_saved(state)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_broken_stdout_pipe_exit_2_with_the_state_saved(trace, tmp_path):
    state = tmp_path / "state.json"
    r = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {IMDSWATCH} replay {trace} --learning-period 1h "
                       f"--state {state} | head -c 0"], capture_output=True)
    assert r.returncode == 2, r.stderr
    assert b"standard output: cannot write alerts" in r.stderr
    assert b"Traceback" not in r.stderr and b"Exception ignored" not in r.stderr
    assert_state_saved(state)


@pytest.mark.parametrize(("source", "words"), [
    ("/proc/self/mem", b"read failed after line 0"),
    ("/", b"is a directory"),
    ("/nonexistent/trace.ndjson", b"No such file or directory"),
])
def test_unreadable_inputs_exit_2_with_one_message(source, words, tmp_path):
    state = tmp_path / "state.json"
    r = replay(source, "--state", state)
    assert r.returncode == 2 and words in r.stderr and b"Traceback" not in r.stderr


def test_an_input_failing_midway_saves_what_was_read(trace, tmp_path):
    import gzip

    data = gzip.compress(trace.read_bytes())
    cut = tmp_path / "cut.ndjson.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])  # a truncated gzip file
    state = tmp_path / "state.json"
    r = replay(cut, "--state", state, "--output", os.devnull)
    assert r.returncode == 2 and b"read failed after line" in r.stderr
    assert_state_saved(state)


def test_fifo_is_read(trace, tmp_path):
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    data = trace.read_bytes()

    def feed():
        with open(fifo, "wb") as f:
            for i in range(0, len(data), 777):  # in odd-sized pieces
                f.write(data[i:i + 777])

    t = threading.Thread(target=feed)
    t.start()
    r = replay(fifo, "--output", os.devnull)
    t.join()
    assert r.returncode == 0, r.stderr
    n = data.count(b"\n")
    assert f"metadata events scored: {n}".encode() in r.stderr


def test_process_substitution_and_gzip_through_a_pipe(trace, tmp_path):
    import gzip

    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(trace.read_bytes()))
    n = trace.read_bytes().count(b"\n")
    for cmd in (f"{IMDSWATCH} replay <(cat {trace}) -o /dev/null",
                f"cat {gz} | {IMDSWATCH} replay - -o /dev/null",
                f"{IMDSWATCH} replay <(cat {gz}) -o /dev/null"):
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
        assert f"metadata events scored: {n}".encode() in r.stderr, cmd


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_replay_saves_the_state(trace, tmp_path, sig):
    """A replay reading a pipe that has gone quiet: the signal ends it at once, with the
    model learnt so far saved and the summary printed."""
    state = tmp_path / "state.json"
    data = trace.read_bytes()
    proc = subprocess.Popen([str(IMDSWATCH), "replay", "-", "--state", str(state),
                             "--output", os.devnull, "--reorder-window", "0"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    proc.stdin.write(data)  # everything, then the pipe stays open and quiet
    proc.stdin.flush()
    time.sleep(3)
    assert proc.poll() is None
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.stdin.close() if not proc.stdin.closed else None
    assert proc.returncode == 128 + sig, err
    assert b"Traceback" not in err
    assert f"stopped early (signal {int(sig)})".encode() in err
    assert_state_saved(state)
    shown = subprocess.run([str(IMDSWATCH), "state", "show", str(state)],
                           capture_output=True).stdout
    n = data.count(b"\n")
    assert f"metadata events scored: {n}".encode() in shown


# -- the one parser ----------------------------------------------------------------------------

def test_schema_and_rules_agree_on_a_canonical_line():
    line = orjson.dumps(doc(user={"name": "root", "id": "0"}))
    d = decoder().decode(line)
    ev1, endpoint = read_doc(d, CATALOG.match, raw=line)
    assert endpoint.id == "imds" and ev1.doc == orjson.loads(line)


def test_non_canonical_forms_are_normalised_not_refused():
    """ECS arrays, numeric ids, decimal ports, dotted keys: the forms the schema's
    canonical types leave out are brought to them before the same rules."""
    d = {"@timestamp": 1714564800123, "destination.ip": ["169.254.169.254"],
         "destination.port": "80", "process": {"name": ["curl"], "pid": "7"},
         "user": {"id": 0}, "event": {"id": 12}}
    events, bad, _ = read_lines([orjson.dumps(d)])
    assert not bad
    e = events[0]
    assert (e.dst_ip, e.dst_port, e.name, e.pid, e.uid, e.event_id) == (
        "169.254.169.254", 80, "curl", 7, "0", "12")


def test_validation_error_names_the_field():
    with pytest.raises(msgspec.ValidationError):
        decoder().decode(orjson.dumps(doc(process={"name": 5})))


# -- the live agent's output --------------------------------------------------------------

def _credential_request() -> dict:
    """Alerts on a fresh node (the history-free rule): no warm model needed."""
    return {"@timestamp": "2026-11-30T10:00:00Z",
            "destination": {"ip": "169.254.169.254", "port": 80},
            "process": {"name": "curl", "executable": "/usr/bin/curl"},
            "user": {"name": "www-data"}, "host": {"name": "n1"},
            "event": {"action": "http_request"}, "http": {"request": {"method": "GET"}},
            "url": {"path": "/latest/meta-data/iam/security-credentials/role"},
            "imdswatch": {"request": {"guarded": False}}}


def test_agent_stops_on_a_failing_alert_output():
    """`run` goes through the same code: an alert that cannot be written stops the agent
    (which then saves its state and exits 2) instead of raising out of the event loop."""
    from exporters.metrics import MetricsExporter
    from imdswatch.agent import Agent, _alert_writer
    from imdswatch.config import Config

    cfg = Config()
    cfg.scorer.learning_period = 0
    agent = Agent(cfg, output="/dev/full")
    agent.metrics = MetricsExporter()
    agent.writer = _alert_writer("/dev/full")
    agent.handle(_credential_request())
    assert agent.stats.alerts == 1
    assert agent.output_error == "/dev/full: cannot write alerts (No space left on device)"
    assert agent.stop.is_set()
    agent.handle(_credential_request())  # later alerts are not attempted again
    assert agent.stats.scored == 2


@pytest.mark.parametrize(("redirect", "words"), [
    (">&-", b"standard output is closed"),
    ("--output /nonexistent-dir/alerts.ndjson", b"cannot write alerts"),
])
def test_run_with_an_unusable_output_exits_2_with_one_message(redirect, words):
    r = subprocess.run(["bash", "-c", f"exec {IMDSWATCH} run --metrics-address 127.0.0.1:0 "
                                      f"{redirect}"], capture_output=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize("junk", [
    b"[" * 400 + b"]" * 400,                      # deeper than the alert writer can write
    b"123456789012345678901234567890",            # an integer beyond 64 bits
])
def test_an_alert_on_an_odd_document_is_still_written(junk, tmp_path):
    d = _credential_request()
    line = orjson.dumps(d)[:-1] + b',"process":{"name":"curl","executable":"/usr/bin/curl",' \
        b'"junk":' + junk + b"}}"
    path = tmp_path / "odd.ndjson"
    path.write_bytes(line + b"\n")
    r = replay(path)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    alert = orjson.loads(r.stdout.splitlines()[0])
    assert alert["process"]["name"] == "curl"


def test_safe_doc_cuts_depth_and_big_integers_and_keeps_the_rest():
    from scoring.events import MAX_DOC_DEPTH, safe_doc

    fine = doc()
    assert safe_doc(fine) is fine
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["a"] = {}
        node = node["a"]
    out = safe_doc({"process": {"name": "x", "deep": deep}, "n": 2**70})
    assert out["process"]["name"] == "x" and out["n"] == str(2**70)
    orjson.dumps(out)  # the alert writer's serialiser takes it
    depth, node = 0, out
    while isinstance(node, dict):
        node = next(iter(node.values())) if node else None
        depth += 1
    assert depth <= MAX_DOC_DEPTH + 1
