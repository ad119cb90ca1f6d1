"""Saving, restoring and merging the scorer's learned state.

The file is versioned JSON (gzip when the name ends in .gz, recognised by content when
read). Counts are stored already decayed to the state's last event time, so a state is
independent of the half-life it was learned with and states from several nodes can be
summed after aligning their clocks. Version 2:

    {"format": "imdswatch-state", "version": 2, "first_ts", "last_ts", "events_learned",
     "hosts": [[name, last_seen], ...],
     "detectors": {detector: [[context, CONTEXT_STATS, [[value, ...ENTRY_STATS], ...]], ...]},
     "suppression": [[detector, entity, last alert time, window], ...],
     "rollouts": [[caller, start, last, first host, kind, name, folded, [host, ...]], ...]}

    ENTRY_STATS   = n, days, day, first_seen, hosts, diversity credit
    CONTEXT_STATS = [n, days, day, first_seen, hosts, credit (0), novelty, last_novelty]
    hosts         = [index into "hosts", ...] or {"epoch": e, "cur": b64, "prev": b64|null}

Every field is validated on load and merge: a state that is not exactly this is refused
with the path, the place and the reason (`StateError`), never half-loaded.

Saving is atomic: the state goes to a temporary file in the same directory, is fsynced,
then renamed over the old one (and the directory fsynced), so a crash at any point leaves
either the old state or the new one, never a torn file. Writers hold `state_lock` (an
fcntl lock on `STATE.lock`) for as long as they own the state, so two processes never
both write one state; under the lock, temporary files a killed save left are removed.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import gc
import gzip
import heapq
import math
import os
import tempfile
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from scoring.detectors import DETECTOR_NAMES, DETECTORS
from scoring.rarity import (
    EXACT_HOSTS,
    HLL_M,
    Context,
    Entry,
    Host,
    HostSet,
    RarityTable,
    Sketch,
    add_host,
    exact_hosts,
)
from scoring.scorer import ROLLOUT_HOSTS, ROLLOUT_KINDS, ROLLOUTS, Rollout, Scorer

FORMAT = "imdswatch-state"
VERSION = 2
OLDER = {1: "host bitmaps and no recurrence history"}


class StateError(ValueError):
    """A state file that cannot be used; the message says which file and why."""


# -- scorer -> plain data ------------------------------------------------------------------

def _hosts_out(hs: HostSet, index: dict[Host, int]) -> Any:
    if hs.__class__ is not Sketch:
        return sorted(index[h] for h in exact_hosts(hs) if h in index)
    return {"epoch": hs.epoch, "cur": base64.b64encode(hs.cur).decode(),
            "prev": None if hs.prev is None else base64.b64encode(hs.prev).decode()}


def _stats(e: Entry, w: float, index: dict[Host, int]) -> list:
    return [e.n / w, e.days / w, e.day, e.first_seen, _hosts_out(e.hosts, index), e.credit]


@contextmanager
def _no_gc() -> Iterator[None]:
    """Building or reading a state makes millions of small containers at once; the cyclic
    collector would walk the whole model again and again for them (none form cycles)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def state_dict(scorer: Scorer, max_entities: int | None = None) -> dict:
    """The scorer's learned state as plain data (counts decayed to its last event).
    `max_entities`: at most that many value entries, the weakest left out in the order
    `Scorer` evicts them (see `trimmed_state`), without building the rest."""
    with _no_gc():
        head, tables = _state_parts(scorer, max_entities)
        head["detectors"] = {name: list(rows) for name, rows in tables}
        return head


def state_chunks(scorer: Scorer, extra: dict | None = None) -> Iterator[bytes]:
    """`orjson.dumps(state_dict(scorer) | extra)`, in pieces of a few thousand contexts:
    a fleet scorer's state of a million entries never exists as one Python structure (it
    would double the process's memory at every checkpoint)."""
    with _no_gc():
        head, tables = _state_parts(scorer, None)
        head.update(extra or {})
        body = orjson.dumps(head)
        yield body[:-1] + b',"detectors":{'
        del body, head
        for t, (name, rows) in enumerate(tables):
            yield (b"," if t else b"") + orjson.dumps(name) + b":["
            chunk: list = []
            first = True
            for row in rows:
                chunk.append(row)
                if len(chunk) >= STREAM_CONTEXTS:
                    yield (b"" if first else b",") + orjson.dumps(chunk)[1:-1]
                    first, chunk = False, []
            if chunk:
                yield (b"" if first else b",") + orjson.dumps(chunk)[1:-1]
            yield b"]"
        yield b"}}"


STREAM_CONTEXTS = 2000


def _state_parts(scorer: Scorer, max_entities: int | None) -> tuple[dict, Iterator]:
    scorer._flush()
    now = scorer.last_ts
    w = scorer.clock.weight(now) if now is not None else 1.0
    hosts = list(scorer.hosts.values())
    index = {h: i for i, h in enumerate(hosts)}
    skip: set[int] = set()
    if max_entities is not None and scorer.entities > max_entities:
        skip = set(map(id, heapq.nsmallest(scorer.entities - max_entities, (
            e for table in scorer.tables for c in table.contexts.values()
            for e in c.values.values()
        ), key=lambda e: (e.days, e.n, -e.first_seen))))

    def rows(table: RarityTable) -> Iterator[list]:
        for ctx, c in table.items():
            values = [[value, *_stats(e, w, index)] for value, e in c.values.items()
                      if not skip or id(e) not in skip]
            if values:
                yield [ctx, [*_stats(c, w, index), c.novelty / w,
                             c.last_novelty if math.isfinite(c.last_novelty) else None],
                       values]

    head = {
        "format": FORMAT,
        "version": VERSION,
        "first_ts": scorer.first_ts,
        "last_ts": now,
        "events_learned": scorer.events_learned,
        "hosts": [[h.name, h.last_seen] for h in hosts],
        "suppression": [[*k, t, win] for k, (t, win) in scorer.last_alert.items()],
        "rollouts": [[list(k), r.start, r.last, r.first_host, r.kind, r.name, r.folded,
                      sorted(r.hosts)] for k, r in scorer.rollouts.items()],
    }
    tables = ((det.name, rows(table))
              for det, table in zip(DETECTORS, scorer.tables, strict=True))
    return head, tables


# -- plain data -> scorer, validated -------------------------------------------------------

class _Check:
    """Validation with the place of the fault in the message."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, why: str) -> StateError:
        return StateError(f"{self.source}: malformed state at {where}: {why}")

    def number(self, v: Any, where: str, low: float | None = None) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(where, f"{_show(v)} is not a finite number")
        if low is not None and v < low:
            raise self.fail(where, f"{v} is below {low}")
        return float(v)

    def integer(self, v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(where, f"{_show(v)} is not an integer")
        return v

    def seq(self, v: Any, where: str, size: int | None = None) -> list:
        if not isinstance(v, list):
            raise self.fail(where, f"{_show(v)} is not a list")
        if size is not None and len(v) != size:
            raise self.fail(where, f"has {len(v)} fields, not {size}")
        return v

    def key(self, v: Any, where: str) -> Hashable:
        """A context or value: null, a string, a boolean (the anti-SSRF header's
        presence), or a list of those (a tuple)."""
        if v is None or isinstance(v, str | bool):
            return v
        if isinstance(v, list | tuple) and all(x is None or isinstance(x, str | bool)
                                              for x in v):
            return tuple(v)
        raise self.fail(where, f"{_show(v)} is not a string, boolean, null or a list of them")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _header(state: Any, source: str) -> dict:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateError(f"{source}: not an imdswatch state file")
    version = state.get("version")
    if version in OLDER:
        raise StateError(
            f"{source}: state version {version} was written by an older imdswatch "
            f"({OLDER[version]}) and cannot be continued by this one (version {VERSION}); "
            "move it aside to start learning afresh, or rebuild it with "
            "`imdswatch replay --state` over the recorded events")
    if version != VERSION:
        raise StateError(
            f"{source}: state version {version!r} is not supported "
            f"(this imdswatch reads version {VERSION})")
    return state


class _Loaded:
    """A validated state, as model objects (hosts by name)."""

    def __init__(self, state: Any, source: str, epoch_len: float) -> None:
        state = _header(state, source)
        ck = _Check(source)
        for k in ("first_ts", "last_ts", "events_learned", "hosts", "detectors"):
            if k not in state:
                raise ck.fail(k, "missing")
        self.first_ts = None if state["first_ts"] is None else ck.number(
            state["first_ts"], "first_ts")
        self.last_ts = None if state["last_ts"] is None else ck.number(
            state["last_ts"], "last_ts")
        if (self.first_ts is None) != (self.last_ts is None) or (
                self.first_ts is not None and self.first_ts > self.last_ts):
            raise ck.fail("first_ts", "not before last_ts")
        self.events_learned = ck.integer(state["events_learned"], "events_learned")
        if self.events_learned < 0:
            raise ck.fail("events_learned", "negative")
        self.hosts: list[Host] = []
        names: set[str] = set()
        for i, h in enumerate(ck.seq(state["hosts"], "hosts")):
            name, seen = ck.seq(h, f"hosts[{i}]", 2)
            if not isinstance(name, str) or name in names:
                raise ck.fail(f"hosts[{i}]", f"{_show(name)} is not a new host name")
            names.add(name)
            self.hosts.append(Host(name, ck.number(seen, f"hosts[{i}]")))
        self.epoch = int((self.last_ts or 0.0) // epoch_len)
        detectors = state["detectors"]
        if not isinstance(detectors, dict):
            raise ck.fail("detectors", "not an object")
        unknown = set(detectors) - set(DETECTOR_NAMES)
        if unknown:
            raise ck.fail("detectors", f"unknown detector {sorted(unknown)[0]!r}")
        self.tables = []
        for name in DETECTOR_NAMES:
            table = RarityTable()
            for j, item in enumerate(ck.seq(detectors.get(name, []), name)):
                where = f"{name}[{j}]"
                ctx, stats, values = ck.seq(item, where, 3)
                ctx = ck.key(ctx, where)
                if ctx in table.contexts:
                    raise ck.fail(where, "context listed twice")
                stats = ck.seq(stats, f"{where} context", 8)
                c = table.contexts[ctx] = Context(0.0)
                self._entry(ck, c, stats[:6], f"{where} context")
                c.novelty = ck.number(stats[6], f"{where} novelty", 0.0)
                c.last_novelty = -math.inf if stats[7] is None else ck.number(
                    stats[7], f"{where} last novelty")
                for k, row in enumerate(ck.seq(values, f"{where} values")):
                    at = f"{where} value {k}"
                    row = ck.seq(row, at, 7)
                    value = ck.key(row[0], at)
                    if value in c.values:
                        raise ck.fail(at, "value listed twice")
                    e = c.values[value] = Entry(0.0)
                    self._entry(ck, e, row[1:], at)
                    table.entries += 1
            self.tables.append(table)
        self.suppression: dict[tuple, tuple[float, float]] = {}
        for i, s in enumerate(ck.seq(state.get("suppression", []), "suppression")):
            d, ent, t, win = ck.seq(s, f"suppression[{i}]", 4)
            if not isinstance(d, str) or not isinstance(ent, str):
                raise ck.fail(f"suppression[{i}]", "detector and entity must be strings")
            self.suppression[(d, ent)] = (ck.number(t, f"suppression[{i}]"),
                                          ck.number(win, f"suppression[{i}]", 0.0))
        # Rollouts in progress (absent from states written before they were kept): a
        # restart or a scorer's failover in the middle of one folds its further hosts still.
        self.rollouts: dict[tuple, Rollout] = {}
        for i, r in enumerate(ck.seq(state.get("rollouts", []), "rollouts")[:ROLLOUTS]):
            where = f"rollouts[{i}]"
            key, start, last, first, kind, name, folded, hosts = ck.seq(r, where, 8)
            caller = ck.key(key, where)
            if not isinstance(caller, tuple) or not all(
                    isinstance(x, str) for x in (first, kind, name)) or kind not in ROLLOUT_KINDS:
                raise ck.fail(where, "not a caller, first host, kind and name")
            names = ck.seq(hosts, f"{where} hosts")
            if not all(isinstance(h, str) for h in names):
                raise ck.fail(f"{where} hosts", "not a list of host names")
            rollout = Rollout(ck.number(start, where), first, kind, name)
            rollout.last = ck.number(last, where)
            rollout.folded = ck.integer(folded, where)
            rollout.hosts = set(names[:ROLLOUT_HOSTS]) | {first}
            self.rollouts[caller] = rollout

    def _entry(self, ck: _Check, e: Entry, stats: list, where: str) -> None:
        n, days, day, first, hosts, credit = stats
        e.credit = ck.number(credit, f"{where} credit", 0.0)
        if e.credit > 1:
            raise ck.fail(f"{where} credit", f"{credit} is above 1")
        e.n = ck.number(n, f"{where} count", 0.0)
        e.days = ck.number(days, f"{where} days", 0.0)
        e.day = ck.integer(day, f"{where} day")
        e.first_seen = ck.number(first, f"{where} first seen")
        e.hosts = self._hostset(ck, hosts, f"{where} hosts")

    def _hostset(self, ck: _Check, v: Any, where: str) -> HostSet:
        if isinstance(v, list):
            if len(v) > EXACT_HOSTS:
                raise ck.fail(where, f"{len(v)} hosts listed (at most {EXACT_HOSTS})")
            out: HostSet = None
            for i in v:
                if isinstance(i, bool) or not isinstance(i, int) or \
                        not 0 <= i < len(self.hosts):
                    raise ck.fail(where, f"{_show(i)} is not a host index")
                out = add_host(out, self.hosts[i], self.epoch)
            return out
        if not isinstance(v, dict) or set(v) != {"epoch", "cur", "prev"}:
            raise ck.fail(where, "neither a list of hosts nor a sketch")
        epoch = ck.integer(v["epoch"], where)
        regs = [self._registers(ck, v["cur"], where)]
        regs.append(None if v["prev"] is None else self._registers(ck, v["prev"], where))
        return Sketch(epoch, regs[0], regs[1])

    @staticmethod
    def _registers(ck: _Check, v: Any, where: str) -> bytearray:
        try:
            raw = base64.b64decode(v, validate=True) if isinstance(v, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != HLL_M or max(raw) > 64:
            raise ck.fail(where, "sketch registers are not valid")
        return bytearray(raw)


def load_state_dict(scorer: Scorer, state: Any, source: str = "state") -> None:
    """Replace the scorer's learned state with `state` (from `state_dict` or a file).
    Raises StateError, leaving the scorer as it was, when `state` is not valid."""
    with _no_gc():
        loaded = _Loaded(state, source, scorer._epoch_len)
    _install(scorer, loaded)


def _install(scorer: Scorer, loaded: _Loaded) -> None:
    scorer.reset_memo()
    scorer.hosts = {h.name: h for h in loaded.hosts}
    scorer.first_ts = loaded.first_ts
    scorer.last_ts = loaded.last_ts
    scorer.events_learned = loaded.events_learned
    scorer.clock.ref = loaded.last_ts  # counts are stored as of last_ts: weight 1
    for table in loaded.tables:
        table.clock = scorer.clock
    scorer.tables = tuple(loaded.tables)
    scorer.last_alert = dict(loaded.suppression)
    scorer.rollouts = loaded.rollouts
    scorer._next_maintain = None  # prune and cap what was loaded at the next event


def _read(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StateError(f"{path}: cannot read state ({exc.strerror})") from None
    return decode_state(raw, str(path))


def decode_state(raw: bytes, source: str) -> Any:
    """Plain data from a state's bytes (plain or gzip JSON)."""
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return orjson.loads(raw)
    except (OSError, EOFError, orjson.JSONDecodeError) as exc:
        raise StateError(f"{source}: state file is corrupt ({exc})") from None


def load_state(path: str | os.PathLike, scorer: Scorer) -> None:
    path = Path(path)
    load_state_dict(scorer, _read(path), str(path))


def model_to_bytes(scorer: Scorer, gz: bool = True) -> bytes:
    """The scorer's model as a state file's bytes (what GET /v1/model serves)."""
    return encode_state(state_dict(scorer), gz)


def model_from_bytes(scorer: Scorer, data: bytes, source: str = "model") -> None:
    """Replace the scorer's model with `data` (from `model_to_bytes` or a state file);
    raises StateError naming `source` when the bytes are not a valid state."""
    load_state_dict(scorer, decode_state(data, source), source)


# -- writing ---------------------------------------------------------------------------------

@contextmanager
def state_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of the state at `path` (on `path`.lock), or raise
    StateError at once when another process holds it. The lock dies with its process,
    so a killed writer never leaves the state locked."""
    lock = Path(f"{path}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"{path}: cannot lock the state ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateError(f"{path}: cannot lock the state ({exc.strerror})") from None
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise StateError(
                f"{path}: the state is in use by another imdswatch (pid {holder}); "
                "two writers would lose each other's learning") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temps(path)
        yield
    finally:
        os.close(fd)  # releases the lock


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files that killed saves of `path` left. Only safe for the
    holder of `state_lock` (no other save can be in flight)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    prefix = _temp_prefix(path)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(directory / name)
                removed.append(name)
            except OSError:
                pass
    return removed


def write_atomic(path: str | os.PathLike, data: bytes | Iterable[bytes],
                 gz: bool = False) -> None:
    """Write `data` (or its pieces, gzip-compressed on the way with `gz`) to `path` so that
    readers see the old file or the new one, never half."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            pieces = [data] if isinstance(data, bytes) else data
            if gz:
                with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=3, mtime=0) as z:
                    for piece in pieces:
                        z.write(piece)
            else:
                for piece in pieces:
                    f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def encode_state(state: dict, gz: bool) -> bytes:
    data = orjson.dumps(state)
    return gzip.compress(data, compresslevel=3, mtime=0) if gz else data


def save_state(path: str | os.PathLike, scorer: Scorer) -> None:
    path = Path(path)
    write_atomic(path, encode_state(state_dict(scorer), path.suffix == ".gz"))


# -- merge -----------------------------------------------------------------------------------

def merge_states(states: list[dict], half_life: float, sources: list[str] | None = None
                 ) -> dict:
    """One state holding the fleet-wide history of every state in `states`.

    Each state is validated, its counts decayed to the newest last event time with
    `half_life`, then summed per (detector, context, value); host sets are joined by
    host name (exact sets up to their cap, sketches register by register), first-seen
    times take the earliest. Linear in the total size of the states."""
    if not states:
        raise StateError("nothing to merge")
    sources = sources or [f"input {i + 1}" for i in range(len(states))]
    epoch_len = Scorer(_settings(half_life))._epoch_len
    loaded = [_Loaded(s, src, epoch_len) for s, src in zip(states, sources, strict=True)]
    dated = [s for s in loaded if s.last_ts is not None]
    into = Scorer(_settings(half_life))
    if not dated:
        return state_dict(into)
    now = max(s.last_ts for s in dated)
    into.first_ts = min(s.first_ts for s in dated)
    into.last_ts = now
    into.clock.ref = now
    into.events_learned = sum(s.events_learned for s in dated)
    epoch = int(now // epoch_len)
    hosts = into.hosts
    for s in dated:
        factor = 2.0 ** ((s.last_ts - now) / half_life)
        remap = {}
        for h in s.hosts:
            mine = hosts.get(h.name)
            if mine is None:
                mine = hosts[h.name] = Host(h.name, h.last_seen)
            mine.last_seen = max(mine.last_seen, h.last_seen)
            remap[h] = mine
        for mine_t, theirs_t in zip(into.tables, s.tables, strict=True):
            for ctx, tc in theirs_t.contexts.items():
                mc = mine_t.contexts.get(ctx)
                if mc is None:
                    mc = mine_t.contexts[ctx] = Context(tc.first_seen)
                _add(mc, tc, factor, remap, epoch)
                mc.novelty += tc.novelty * factor
                mc.last_novelty = max(mc.last_novelty, tc.last_novelty)
                for value, te in tc.values.items():
                    me = mc.values.get(value)
                    if me is None:
                        me = mc.values[value] = Entry(te.first_seen)
                        mine_t.entries += 1
                    _add(me, te, factor, remap, epoch)
        for k, t in s.suppression.items():
            into.last_alert[k] = max(t, into.last_alert.get(k, t))
    return state_dict(into)


def _settings(half_life: float):  # noqa: ANN202 - ScorerSettings, imported lazily
    from scoring.settings import ScorerSettings

    return ScorerSettings(half_life=half_life)


def _add(mine: Entry, theirs: Entry, factor: float, remap: dict[Host, Host],
         epoch: int) -> None:
    mine.n += theirs.n * factor
    mine.days += theirs.days * factor
    mine.credit = max(mine.credit, theirs.credit)
    mine.day = max(mine.day, theirs.day)
    mine.first_seen = min(mine.first_seen, theirs.first_seen)
    hs = theirs.hosts
    if hs.__class__ is not Sketch:
        for h in exact_hosts(hs):
            mine.hosts = add_host(mine.hosts, remap[h], epoch)
    else:
        if mine.hosts.__class__ is not Sketch:
            sketch = Sketch(hs.epoch)
            for h in exact_hosts(mine.hosts):
                sketch.add(h.slot, hs.epoch)
            mine.hosts = sketch
        mine.hosts.merge(hs)


def merge_state_files(inputs: list[str | os.PathLike], output: str | os.PathLike,
                      half_life: float) -> dict:
    """`imdswatch state merge A B -o C`: read, validate, merge, save atomically under the
    output's lock; returns the result."""
    states = [_read(Path(p)) for p in inputs]
    merged = merge_states(states, half_life, [str(p) for p in inputs])
    out = Path(output)
    with state_lock(out):
        write_atomic(out, encode_state(merged, out.suffix == ".gz"))
    return merged
