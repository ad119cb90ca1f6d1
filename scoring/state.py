"""Saving, restoring and merging the scorer's learned state.

The file is versioned JSON (gzip when the name ends in .gz). Counts are stored already
decayed to the state's last event time, so a state is independent of the half-life it
was learned with and states from several nodes can be summed after aligning their clocks.

Saving is atomic: the state goes to a temporary file in the same directory, is fsynced,
then renamed over the old one (and the directory fsynced), so a crash at any point leaves
either the old state or the new one, never a torn file.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import orjson

from scoring.detectors import DETECTORS
from scoring.rarity import RarityTable
from scoring.scorer import Scorer

FORMAT = "imdswatch-state"
VERSION = 1


class StateError(ValueError):
    """A state file that cannot be used; the message says which file and why."""


def _freeze(v: Any) -> Hashable:
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def state_dict(scorer: Scorer) -> dict:
    """The scorer's learned state as plain data."""
    import numpy as np  # imported on use: replay without --state never needs it

    now = scorer.last_ts
    w_now = scorer.decay.weight(now) if now is not None else 1.0
    hosts = sorted(scorer.host_ids, key=scorer.host_ids.__getitem__)
    detectors = {}
    for det, table in zip(DETECTORS, scorer.tables, strict=True):
        counts = np.frombuffer(table.weight, dtype=np.float64) / w_now if len(table) else []
        detectors[det.name] = [
            [ctx, value, float(n), format(bits, "x"), first]
            for (ctx, value, _, bits, first), n in zip(table.items(), counts, strict=True)
        ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "first_ts": scorer.first_ts,
        "last_ts": now,
        "events_learned": scorer.events_learned,
        "hosts": hosts,
        "detectors": detectors,
        "suppression": [[*k, t] for k, t in scorer.last_alert.items()],
    }


def load_state_dict(scorer: Scorer, state: dict, source: str = "state") -> None:
    """Replace the scorer's learned state with `state` (from `state_dict` or a file)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateError(f"{source}: not an imdswatch state file")
    if state.get("version") != VERSION:
        raise StateError(
            f"{source}: state version {state.get('version')} is not supported "
            f"(this imdswatch reads version {VERSION})"
        )
    try:
        hosts = list(state["hosts"])
        scorer.host_ids = {h: i for i, h in enumerate(hosts)}
        scorer.first_ts = state["first_ts"]
        scorer.last_ts = state["last_ts"]
        scorer.events_learned = int(state.get("events_learned", 0))
        scorer.decay.ref = state["last_ts"]  # counts are stored as of last_ts: weight 1
        tables = []
        for det in DETECTORS:
            table = RarityTable()
            for ctx, value, n, bits, first in state["detectors"].get(det.name, []):
                _restore(table, _freeze(ctx), _freeze(value), float(n), int(bits, 16), first)
            tables.append(table)
        scorer.tables = tuple(tables)
        scorer.last_alert = {(d, e): float(t) for d, e, t in state.get("suppression", [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{source}: malformed state ({exc.__class__.__name__}: {exc})") from None


def _restore(table: RarityTable, ctx: Hashable, value: Hashable, n: float, bits: int,
             first: float) -> None:
    """Insert one entry with its count and host bitmap as they were saved."""
    table.learn(ctx, value, 0, 0.0, first)
    s = table.slot[(ctx, value)]
    c = table.ctx_slot[ctx]
    table.weight[s] = n
    table.hosts[s] = bits
    table.ctx_weight[c] += n
    table.ctx_hosts[c] |= bits


def _read(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StateError(f"{path}: cannot read state ({exc.strerror})") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return orjson.loads(raw)
    except (OSError, EOFError, orjson.JSONDecodeError) as exc:
        raise StateError(f"{path}: state file is corrupt ({exc})") from None


def load_state(path: str | os.PathLike, scorer: Scorer) -> None:
    path = Path(path)
    load_state_dict(scorer, _read(path), str(path))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    return gzip.compress(data, compresslevel=3) if gz else data


def save_state(path: str | os.PathLike, scorer: Scorer) -> None:
    path = Path(path)
    write_atomic(path, encode_state(state_dict(scorer), path.suffix == ".gz"))


def merge_states(states: list[dict], half_life: float) -> dict:
    """One state holding the fleet-wide history of every state in `states`.

    Each state's counts are decayed to the newest last event time with `half_life`, then
    summed per (detector, context, value); host bitmaps are re-indexed by host name and
    OR-ed; first-seen times take the earliest."""
    import numpy as np

    if not states:
        raise StateError("nothing to merge")
    for i, s in enumerate(states):
        if s.get("format") != FORMAT or s.get("version") != VERSION:
            raise StateError(f"input {i + 1} is not an imdswatch state of version {VERSION}")
    dated = [s for s in states if s.get("last_ts") is not None]
    if not dated:
        return states[0]
    now = max(s["last_ts"] for s in dated)
    hosts: dict[str, int] = {}
    for s in dated:
        for h in s["hosts"]:
            hosts.setdefault(h, len(hosts))
    merged: dict[str, dict[tuple, list]] = {d.name: {} for d in DETECTORS}
    for s in dated:
        factor = 2.0 ** ((s["last_ts"] - now) / half_life)
        remap = [hosts[h] for h in s["hosts"]]
        for det_name, entries in s["detectors"].items():
            if det_name not in merged or not entries:
                continue
            counts = np.asarray([e[2] for e in entries], dtype=np.float64) * factor
            into = merged[det_name]
            for (ctx, value, _, bits, first), n in zip(entries, counts.tolist(), strict=True):
                new_bits = _remap_bits(int(bits, 16), remap)
                key = (_freeze(ctx), _freeze(value))
                cur = into.get(key)
                if cur is None:
                    into[key] = [ctx, value, n, new_bits, first]
                else:
                    cur[2] += n
                    cur[3] |= new_bits
                    cur[4] = min(cur[4], first)
    suppression: dict[tuple, float] = {}
    for s in dated:
        for d, e, t in s.get("suppression", []):
            suppression[(d, e)] = max(t, suppression.get((d, e), t))
    return {
        "format": FORMAT,
        "version": VERSION,
        "first_ts": min(s["first_ts"] for s in dated),
        "last_ts": now,
        "events_learned": sum(int(s.get("events_learned", 0)) for s in dated),
        "hosts": sorted(hosts, key=hosts.__getitem__),
        "detectors": {
            name: [[c, v, n, format(b, "x"), f] for c, v, n, b, f in entries.values()]
            for name, entries in merged.items()
        },
        "suppression": [[*k, t] for k, t in suppression.items()],
    }


def _remap_bits(bits: int, remap: list[int]) -> int:
    out = 0
    i = 0
    while bits:
        if bits & 1:
            out |= 1 << remap[i]
        bits >>= 1
        i += 1
    return out


def merge_state_files(inputs: list[str | os.PathLike], output: str | os.PathLike,
                      half_life: float) -> dict:
    """`imdswatch state merge A B -o C`: read, merge, save atomically; returns the result."""
    states = [_read(Path(p)) for p in inputs]
    for p, s in zip(inputs, states, strict=True):
        if not isinstance(s, dict) or s.get("format") != FORMAT:
            raise StateError(f"{p}: not an imdswatch state file")
        if s.get("version") != VERSION:
            raise StateError(f"{p}: state version {s.get('version')} is not supported")
    merged = merge_states(states, half_life)
    out = Path(output)
    write_atomic(out, encode_state(merged, out.suffix == ".gz"))
    return merged
