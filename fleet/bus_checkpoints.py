"""Checkpoints on the bus: the state in the object store, its record in the ledger.

Saving (the scoring replica): the state goes to the replica's own `--state` file (contract
section 8: `imdswatch state show` reads it), then into the object store under a name of its
own, with the model agents fetch beside it; the checkpoint is committed by a fenced ledger
record naming both, the stream position the state contains and the record before it. Then
what no kept checkpoint needs is removed: events of the stream below the oldest kept
checkpoint's position, and objects no kept record names.

Loading (a replica taking over): the newest record's state, checked (the object store's
SHA-256 and the state's own validation); a checkpoint that cannot be used is named in the
log and the one before it is used, whose position is older, so more of the stream is
scored again. A bus that does not answer is not a reason to fall back: the takeover fails
and is tried again. Without any record the replica starts from its `--state` file when it has
one (moving a single `serve` onto the bus keeps its model), else from an empty model.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Callable
from pathlib import Path

import nats.js.errors
import orjson

from fleet.bus import LEDGER_CHECKPOINT, TRANSIENT, Bus
from fleet.checkpoints import model_etag, read_state, save_state_file
from fleet.ledger import CheckpointRecord, Ledger
from fleet.metrics import ServeMetrics
from scoring.scorer import Scorer
from scoring.state import StateError, load_state_dict, state_chunks

log = logging.getLogger("imdswatch.fleet.checkpoints")

KEEP = 3  # checkpoints kept: the newest and the ones a corrupt newest falls back to
OBJECT_TIMEOUT = 120.0


class BusCheckpoints:
    def __init__(self, bus: Bus, ledger: Ledger, state_path: Path, replica_id: str,
                 lease_rev: int, metrics: ServeMetrics, leading: Callable[[], bool]) -> None:
        self.bus = bus
        self.leading = leading
        self.ledger = ledger
        self.state_path = state_path
        self.replica_id = replica_id
        self.lease_rev = lease_rev
        self.metrics = metrics
        self.kept: list[CheckpointRecord] = []  # newest first
        self.loaded: CheckpointRecord | None = None
        self._n = 0
        self.last_model: tuple[str, bytes] | None = None

    # -- load (at takeover) -------------------------------------------------------------------
    def load(self, scorer: Scorer) -> dict | None:
        rec = self.ledger.checkpoint()
        tried = 0
        while rec is not None:
            tried += 1
            try:
                fleet = self._load_record(rec, scorer)
            except StateError as exc:
                self.metrics.checkpoint_fallbacks.inc()
                log.error("checkpoint %s (ledger record %d, stream position %d) is unusable: "
                          "%s; using the one before it", rec.state, rec.seq, rec.position, exc)
                rec = self.ledger.checkpoint(rec.previous) if rec.previous else None
                continue
            self.loaded = rec
            self.kept = [rec, *self._older(rec)]
            log.info("loaded checkpoint %s (stream position %d, written by %s)", rec.state,
                     rec.position, rec.replica or "?")
            return fleet
        if tried:
            # Every checkpoint the ledger names is unusable: say so loudly, and score what
            # the stream still holds with an empty model rather than never again.
            log.critical("no usable checkpoint on the bus (%d tried): scoring starts from an "
                         "empty model at the stream's first event", tried)
            return {}
        if self.state_path.exists():
            state = read_state(self.state_path)
            state.pop("fleet", None)  # positions of another log
            load_state_dict(scorer, state, str(self.state_path))
            log.info("no checkpoint on the bus yet: starting from the model in %s",
                     self.state_path)
            return {}
        return None

    def _load_record(self, rec: CheckpointRecord, scorer: Scorer) -> dict:
        tmp = self.state_path.with_name(f".{self.state_path.name}.from-bus")
        try:
            try:
                info = self.bus.call(self.bus.obs.get_info(rec.state))
            except nats.js.errors.NotFoundError:
                raise StateError("its object is missing from the object store") from None
            if rec.digest and info.digest != rec.digest:
                raise StateError("its object is not the one the record names (digest)")
            # A bus that does not answer is not a corrupt checkpoint: that propagates, and
            # the takeover is tried again (falling back would throw the model away).
            with open(tmp, "wb") as f:
                try:
                    self.bus.call(self.bus.obs.get(rec.state, writeinto=f), OBJECT_TIMEOUT)
                except nats.js.errors.DigestMismatchError:
                    raise StateError("its object fails its SHA-256 check") from None
            state = read_state(tmp)
            fleet = state.get("fleet") or {}
            if not isinstance(fleet, dict) or int(fleet.get("stream_seq", -1)) != rec.position:
                raise StateError("its fleet section does not match the record")
            load_state_dict(scorer, state, rec.state)
            return fleet
        except (TypeError, ValueError) as exc:
            raise StateError(f"malformed ({exc})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _older(self, rec: CheckpointRecord) -> list[CheckpointRecord]:
        out = []
        prev = rec.previous
        while prev and len(out) < KEEP - 1:
            r = self.ledger.checkpoint(prev)
            if r is None:
                break
            out.append(r)
            prev = r.previous
        return out

    # -- save (the scoring replica) -------------------------------------------------------------
    def save(self, scorer: Scorer, fleet: dict, model: bytes) -> bool:
        position = int(fleet["stream_seq"])
        self._n += 1
        base = f"{position:012d}-{self.replica_id}-{self.lease_rev}-{self._n}"
        state_name, model_name = f"state-{base}", f"model-{base}"
        try:
            if save_state_file(self.state_path, scorer, fleet):
                with open(self.state_path, "rb") as f:
                    info = self.bus.call(self.bus.obs.put(state_name, f), OBJECT_TIMEOUT)
            else:
                # The local copy failed (its disk); the bus's must not depend on it.
                body = gzip.compress(b"".join(state_chunks(scorer, {"fleet": fleet})), 3)
                info = self.bus.call(self.bus.obs.put(state_name, body), OBJECT_TIMEOUT)
            self.bus.call(self.bus.obs.put(model_name, model), OBJECT_TIMEOUT)
        except (OSError, *TRANSIENT) as exc:
            log.error("cannot store checkpoint %s on the bus: %s (the stream keeps every "
                      "event since the last one)", state_name, exc)
            return False
        etag = model_etag(model)
        previous = self.kept[0].seq if self.kept else 0
        body = orjson.dumps({"state": state_name, "model": model_name, "model_etag": etag,
                             "position": position, "previous": previous,
                             "replica": self.replica_id, "lease": self.lease_rev,
                             "digest": info.digest, "time": time.time()})
        seq, _dup = self.ledger.append(LEDGER_CHECKPOINT, body, f"checkpoint-{base}")
        rec = CheckpointRecord(seq, state_name, model_name, etag, position, previous,
                               self.replica_id, info.digest)
        self.kept = [rec, *self.kept][:KEEP]
        self.last_model = (etag, model)
        self._trim()
        return True

    def _trim(self) -> None:
        """Events and objects no kept checkpoint needs. Best effort: what is left is
        removed after the next checkpoint."""
        oldest = self.kept[-1].position
        if not self.leading():
            return  # objects a replica that took over since is writing must stay
        try:
            if oldest > 1:
                self.bus.call(self.bus.js.purge_stream(self.bus.stream, seq=oldest))
            names = {n for r in self.kept for n in (r.state, r.model)}
            for info in self.bus.call(self.bus.obs.list(ignore_deletes=True)):
                if info.name not in names and not info.deleted:
                    self.bus.call(self.bus.obs.delete(info.name))
        except (nats.js.errors.NotFoundError, *TRANSIENT) as exc:
            log.debug("trimming after a checkpoint: %s", exc)
