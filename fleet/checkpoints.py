"""Where the scoring core keeps its checkpoints: the interface, and section 5's state file.

A checkpoint is one state in the `--state` format (`scoring.state`) with a `fleet` section:
the log position the model contains, the events still in the reorder buffer, the id window,
the alert cap and what the alert sink needs to find the lines written since. The bus keeps
them in JetStream instead (`fleet.bus_checkpoints`).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from pathlib import Path
from typing import Protocol

import orjson

from scoring.scorer import Scorer
from scoring.state import StateError, load_state_dict, state_chunks, write_atomic

log = logging.getLogger("imdswatch.fleet")


class CheckpointStore(Protocol):
    def load(self, scorer: Scorer) -> dict | None:
        """Load the newest usable checkpoint's model into `scorer`; its fleet section
        (empty for a state without one), or None when there is no checkpoint at all.
        Raises StateError when none can be used."""
        ...

    def save(self, scorer: Scorer, fleet: dict, model: bytes) -> bool:
        """Save a checkpoint (`model`: the gzip model agents fetch). False when it could
        not be saved (the log keeps everything since the last one)."""
        ...


class StateFile:
    """Section 5: the checkpoint is the `--state` file, replaced atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self, scorer: Scorer) -> dict | None:
        if not self.path.exists():
            return None
        state = read_state(self.path)
        load_state_dict(scorer, state, str(self.path))
        fleet = state.get("fleet") or {}
        if not isinstance(fleet, dict):
            raise StateError(f"{self.path}: malformed fleet checkpoint (not an object)")
        return fleet

    def save(self, scorer: Scorer, fleet: dict, model: bytes) -> bool:
        return save_state_file(self.path, scorer, fleet)


def save_state_file(path: Path, scorer: Scorer, fleet: dict) -> bool:
    try:
        # Streamed: the state of a million entries is never one structure in memory.
        write_atomic(path, state_chunks(scorer, {"fleet": fleet}), gz=path.suffix == ".gz")
    except OSError as exc:
        log.error("cannot save the fleet state to %s: %s (the log is kept)", path, exc)
        return False
    return True


def read_state(path: Path) -> dict:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        state = orjson.loads(raw)
    except (OSError, EOFError, zlib.error, orjson.JSONDecodeError) as exc:
        raise StateError(f"{path}: cannot read the fleet state ({exc})") from None
    if not isinstance(state, dict):
        raise StateError(f"{path}: not an imdswatch state file")
    return state


def model_etag(body: bytes) -> str:
    """The ETag of a model body agents fetch."""
    return hashlib.blake2b(body, digest_size=12).hexdigest()
