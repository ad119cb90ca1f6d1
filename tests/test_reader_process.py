# Metadata addresses in this file are event data only: nothing here connects to them, so no
# netns is needed.
"""The replay's reading in a forked process (intake.forked_reader): what the parent
rebuilds is exactly what `read_events` gives in process, field for field, with the same
reports and counts; errors, early stops and a dying child end cleanly."""

from __future__ import annotations

import gzip
import os
import signal
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from intake import forked_reader as reader_process
from intake.forked_reader import PER_EVENT_FIELDS, ForkedReader
from intake.ndjson import InputError, Interrupt, Interrupted, numbered_lines
from intake.reader import read_events
from lab.wait import wait_for
from scoring.endpoints import EndpointCatalog
from scoring.events import EVENT_FIELDS, Event

CATALOG = EndpointCatalog.from_config()


def _doc(i: int, **over) -> dict:
    d = {"@timestamp": f"2024-05-01T12:00:{i % 60:02d}.{i % 1000:03d}Z",
         "event": {"id": f"e{i}", "action": "connection_attempted",
                   "category": ["network"]},
         "destination": {"ip": "169.254.169.254", "port": 80},
         "process": {"name": f"p{i % 7}", "pid": 1000 + i, "executable": f"/bin/p{i % 7}",
                     "parent": {"name": "bash", "pid": 1}},
         "user": {"name": "root", "id": "0"}, "host": {"name": f"h{i % 3}"}}
    d.update(over)
    return d


def _lines() -> list[bytes]:
    """Every shape the reader takes: requests, a kernel/proc mismatch, an Elasticsearch
    hit, dotted keys (read from a copy, no raw line), non-metadata and non-call lines,
    malformed ones, a process event for the join."""
    out = [orjson.dumps(_doc(i)) for i in range(50)]
    out.append(orjson.dumps(_doc(
        50, http={"request": {"method": "GET"}},
        url={"path": "/latest/meta-data/iam/security-credentials/r", "query": "a=1"},
        user_agent={"original": "curl/8.0"}, imdswatch={
            "request": {"guarded": False},
            "process": {"exe_mismatch": True, "kernel_executable": {"name": "sh"},
                        "proc_executable": "/usr/bin/curl"}})))
    # Every field set, each to its own value: a field handed over in the wrong place shows.
    out.append(orjson.dumps(_doc(
        55, container={"id": "cid", "image": {"name": "img"}},
        orchestrator={"namespace": "ns", "resource": {"name": "pod"}},
        cloud={"provider": "gcp"},
        process={"name": "full", "pid": 7, "executable": "/bin/full",
                 "command_line": "full --x", "thread": {"name": "thr"},
                 "parent": {"name": "pp", "pid": 3, "executable": "/bin/pp"}},
        http={"request": {"method": "PUT"}}, url={"path": "/p", "query": "q"},
        user_agent={"original": "ua"}, imdswatch={
            "request": {"guarded": True},
            "process": {"exe_mismatch": True, "kernel_executable": {"name": "kx"},
                        "proc_executable": "/px"}})))
    # Where it runs unknown (the agent could not read its cgroup).
    out.append(orjson.dumps(_doc(56, imdswatch={"identity": {"missing": ["container.id"]}})))
    out.append(orjson.dumps({"_id": "hit-1",
                             "_source": _doc(51, event={"action": "connection_attempted"})}))
    out.append(b'{"@timestamp": "2024-05-01T12:01:00Z", "destination.ip": "169.254.169.254",'
               b' "process.name": "dotted", "event.id": "d1"}')
    out.append(orjson.dumps(_doc(52, destination={"ip": "10.0.0.1", "port": 443})))
    out.append(b"not json")
    out.append(orjson.dumps(_doc(53, destination={"ip": "169.254.169.254", "port": 99999})))
    out.append(b"")
    out.append(orjson.dumps({"@timestamp": "2024-05-01T12:02:00Z",
                             "event": {"category": ["process"], "type": ["start"]},
                             "process": {"name": "x", "entity_id": "ent1",
                                         "command_line": "x --y",
                                         "parent": {"name": "init"}}}))
    out.append(orjson.dumps(_doc(54, process={"name": "x", "entity_id": "ent1"})))
    out += [orjson.dumps(_doc(i, user={"name": f"u{i}"})) for i in range(60, 5000)]
    return out


def _in_process(lines: list[bytes]):
    bad: list = []
    skipped: Counter = Counter()
    from intake.join import ProcessJoin

    join = ProcessJoin()
    events = [(n, e) for n, e, _ in read_events(
        list(enumerate(lines, 1)), CATALOG.match, lambda *r: bad.append(r), skipped, join)]
    return events, bad, skipped, join


def _forked(lines, stop=None):
    bad: list = []
    reader = ForkedReader(list(enumerate(lines, 1)), CATALOG.match)
    try:
        events = [pair for batch in reader.batches(lambda *r: bad.append(r), stop)
                  for pair in batch]
    finally:
        reader.close()
    return events, bad, reader


def _fields(ev: Event) -> dict:
    out = {}
    for name in EVENT_FIELDS:
        v = getattr(ev, name)
        out[name] = bytes(v) if isinstance(v, memoryview) else v
    return out


def test_every_field_every_report_and_count_as_in_process():
    lines = _lines()
    want, want_bad, want_skipped, join = _in_process(lines)
    got, got_bad, reader = _forked(lines)
    assert len(got) == len(want) > 4900
    for (n1, a), (n2, b) in zip(want, got, strict=True):
        assert n1 == n2
        assert _fields(a) == _fields(b)
    # not JSON, a port out of range, an empty line (numbered_lines would drop it)
    assert got_bad == want_bad and len(want_bad) == 3
    assert reader.skipped == want_skipped and sum(want_skipped.values()) >= 2
    assert reader.lineno == len(lines)
    assert reader.joined == join.filled == 1
    # The shapes above are all there: a request, a mismatch, a hit, a copied document.
    evs = [e for _, e in got]
    assert any(e.path and e.guarded is False and e.exe_mismatch for e in evs)
    assert any(e.event_id == "hit-1" for e in evs)
    full = next(e for e in evs if e.name == "full")
    values = [v for v in _fields(full).values() if v is not None]
    # All but the copied document, and container_unknown (it has a container).
    assert len(values) == len(EVENT_FIELDS) - 2
    assert any(e.container_unknown for e in evs)
    dotted = next(e for e in evs if e.name == "dotted")
    assert dotted._raw is None and dotted.doc["process"]["name"] == "dotted"
    # An alert's document comes from the raw line handed over as a slice of its batch.
    assert evs[0].doc["event"]["id"] == "e0"


def test_the_transport_covers_every_event_field():
    # A field added to Event must be handed over too (or this fails).
    fields = reader_process._CALLER_FIELDS
    assert set(fields) | set(PER_EVENT_FIELDS) == set(EVENT_FIELDS)
    assert not set(fields) & set(PER_EVENT_FIELDS)
    # The spelt-out tuple is the list's, field for field: every value distinct, of the
    # field's own type (the compiled Event refuses any other).
    ev = Event(0.0, "x", "y")
    values = []
    flags = iter((True, False, None))  # the three flags: guarded, exe_mismatch, container_unknown
    for k, name in enumerate(fields):
        for v in (f"v{k}", 1000 + k, None):
            try:
                setattr(ev, name, next(flags) if v is None else v)
                break
            except TypeError:
                continue
        values.append(getattr(ev, name))
    assert len(set(map(repr, values))) == len(fields)
    assert reader_process.caller_fields(ev) == tuple(values)


def test_caller_table_restarts_when_full(monkeypatch):
    monkeypatch.setattr(reader_process, "MAX_CALLERS", 5)
    monkeypatch.setattr(reader_process, "BATCH", 64)
    lines = _lines()
    want, *_ = _in_process(lines)
    got, _, _ = _forked(lines)
    assert [_fields(e) for _, e in got] == [_fields(e) for _, e in want]


def test_a_read_error_comes_after_the_events_before_it(tmp_path: Path):
    path = tmp_path / "cut.ndjson.gz"
    data = gzip.compress(b"\n".join(_lines()) + b"\n")
    path.write_bytes(data[: len(data) // 2])
    reader = ForkedReader(numbered_lines(str(path)), CATALOG.match)
    got = []
    with pytest.raises(InputError, match="read failed|ended before"):
        for batch in reader.batches(lambda *r: None):
            got += batch
    reader.close()
    assert 0 < len(got) < 4990


def test_stop_ends_the_child(tmp_path: Path):
    # A FIFO nobody writes to: the child waits for input forever, the parent for a batch.
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # keeps the FIFO open without writing
    try:
        reader = ForkedReader(numbered_lines(str(fifo)), CATALOG.match)
        stop = Interrupt()
        previous = signal.signal(signal.SIGALRM, lambda s, f: stop.request(s))
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            with pytest.raises(Interrupted):
                for _ in reader.batches(lambda *r: None, stop):
                    pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        pid = reader._pid
        reader.close()
        assert pid is not None
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left behind
    finally:
        os.close(writer)


def test_closing_ends_a_child_that_waits_for_a_slot(monkeypatch):
    # The parent takes one batch and stops: the child, every slot handed over, waits for
    # one to come back; closing ends it and leaves no zombie.
    monkeypatch.setattr(reader_process, "BATCH", 5)
    lines = [orjson.dumps(_doc(i)) for i in range(2000)]
    reader = ForkedReader(list(enumerate(lines, 1)), CATALOG.match)
    batches = reader.batches(lambda *r: None)
    assert len(next(batches)) == 5
    pid = reader._pid
    assert pid is not None
    # It fills the other slots, then waits asleep (on the slots' pipe), neither running nor
    # gone: polled until it sleeps, a deadline for a child that never does.
    assert wait_for(lambda: _state(pid) == "S", timeout=10), _state(pid)
    batches.close()
    reader.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_killed_child_is_an_input_error(tmp_path: Path):
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    try:
        reader = ForkedReader(numbered_lines(str(fifo)), CATALOG.match)
        assert reader._pid is not None
        os.kill(reader._pid, signal.SIGKILL)
        with pytest.raises(InputError, match="killed by signal 9"):
            for _ in reader.batches(lambda *r: None):
                pass
        reader.close()
    finally:
        os.close(writer)


def test_counts_arrive_with_each_batch_not_only_at_the_end(monkeypatch):
    # An early stop keeps what the batches handed over: skipped lines are counted in the
    # batch of the events after them, not only in the last message.
    monkeypatch.setattr(reader_process, "BATCH", 10)
    lines = [orjson.dumps(_doc(i, destination={"ip": "10.0.0.1"})) for i in range(30)]
    lines += [orjson.dumps(_doc(i)) for i in range(30, 60)]
    reader = ForkedReader(list(enumerate(lines, 1)), CATALOG.match)
    try:
        batches = reader.batches(lambda *r: None)
        first = next(batches)
        assert len(first) == 10 and first[0][0] == 31
        assert reader.skipped["not a metadata endpoint"] == 30
        assert reader.lineno == 40
    finally:
        reader.close()


def test_the_child_dies_with_its_parent(tmp_path: Path):
    # A replay killed outright must not leave its reader waiting on a quiet FIFO (it would
    # hold the state's lock the replay took).
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from intake.ndjson import numbered_lines\n"
        "from intake.forked_reader import ForkedReader\n"
        "from scoring.endpoints import EndpointCatalog\n"
        f"r = ForkedReader(numbered_lines({str(fifo)!r}), EndpointCatalog.from_config().match)\n"
        "print(r._pid, flush=True)\n"
        "time.sleep(60)\n")
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        child = int(proc.stdout.readline())
        os.kill(child, 0)  # running
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the reader outlived its parent")
    finally:
        proc.kill()
        proc.wait()
        os.close(writer)


def test_a_batch_is_bounded_in_bytes_too(monkeypatch):
    # Long lines fill a batch's slot before its event count does: what the child holds
    # is bounded, and every raw line arrives whole.
    monkeypatch.setattr(reader_process, "SLOT_BYTES", 4096)
    lines = [orjson.dumps(_doc(i, url={"path": "/" + "a" * 1000})) for i in range(40)]
    reader = ForkedReader(list(enumerate(lines, 1)), CATALOG.match)
    try:
        batches = list(reader.batches(lambda *r: None))
    finally:
        reader.close()
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 40 and max(sizes) <= 3
    assert [bytes(e._raw) for b in batches for _, e in b] == lines


def test_slots_are_reused_and_a_line_longer_than_a_slot_arrives_whole(monkeypatch):
    # Many more batches than slots (the child waits for the parent to give slots back),
    # lines of every length, one longer than a slot (it travels in its batch's message)
    # and one read from a copy (no raw line): each Event's raw line is its own line.
    monkeypatch.setattr(reader_process, "SLOT_BYTES", 2048)
    monkeypatch.setattr(reader_process, "BATCH", 5)
    lines = [orjson.dumps(_doc(i, url={"path": "/" + "b" * (i * 37 % 1500)}))
             for i in range(300)]
    lines[150] = orjson.dumps(_doc(150, url={"path": "/" + "c" * 5000}))
    lines[151] = (b'{"@timestamp": "2024-05-01T12:01:00Z", "destination.ip": "169.254.169.254",'
                  b' "process.name": "dotted", "event.id": "d1"}')
    reader = ForkedReader(list(enumerate(lines, 1)), CATALOG.match)
    try:
        batches = list(reader.batches(lambda *r: None))
    finally:
        reader.close()
    events = [e for b in batches for _, e in b]
    assert len(batches) > 10 * reader_process.SLOTS
    assert len(events) == 300 and events[151]._raw is None
    assert [bytes(e._raw) for e in events if e._raw is not None] == lines[:151] + lines[152:]
    want, _, _, _ = _in_process(lines)
    assert [_fields(e) for _, e in want] == [_fields(e) for e in events]


def test_replay_raises_the_collector_threshold_while_it_scores_and_restores_it(tmp_path):
    import gc

    from imdswatch import replay as replay_module
    from scoring.scorer import Scorer

    path = tmp_path / "t.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(_doc(i)) for i in range(30)) + b"\n")
    before = gc.get_threshold()
    seen: list[int] = []
    stats = replay_module.replay(str(path), Scorer(),
                                 lambda _out: seen.append(gc.get_threshold()[0]))
    assert stats.scored == 30 and seen
    assert set(seen) == {replay_module.GC_THRESHOLD} != {before[0]}
    assert gc.get_threshold() == before
