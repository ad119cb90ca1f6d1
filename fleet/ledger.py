"""What the scoring replica writes, in one fenced sequence: the ledger stream.

Three kinds of records, each a message of stream `NAME_LEDGER`:
- `imdswatch.ledger.takeover`: a replica starts scoring (its id, its lease revision);
- `imdswatch.ledger.alert`: one alert line, the header `Imdswatch-Alert` holding its key's
  digest and `Imdswatch-Replica` the writer (the stream republishes each stored one on
  `imdswatch.alerts`);
- `imdswatch.ledger.checkpoint`: a checkpoint's objects, the stream position it contains
  and the ledger sequence of the checkpoint before it.

Fencing: every write carries `Nats-Expected-Last-Sequence`, the ledger's sequence after
this replica's previous write. A replica that takes over first writes a takeover record at
the ledger's current end; from then on any write of the replica before it is refused by the
server (err 10071), even one that passed its lease check just before a freeze. So the
alerts since a checkpoint are exactly the alert records after its record, and a new
scoring replica that reads them after its takeover record skips exactly what was written.
Each write also carries a message id, so a retry after a lost acknowledgement is answered
as a duplicate instead of being stored twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import nats.js.errors
import orjson

from fleet.bus import LEDGER_ALERT, LEDGER_CHECKPOINT, LEDGER_TAKEOVER, TRANSIENT, Bus

log = logging.getLogger("imdswatch.fleet.ledger")

ALERT_HEADER = "Imdswatch-Alert"
REPLICA_HEADER = "Imdswatch-Replica"
WRONG_LAST_SEQUENCE = 10071
WRITE_BUDGET = 4.0  # seconds of retries before a write counts as failed


class Fenced(Exception):
    """Another replica wrote to the ledger since this one's last write: stop scoring."""


class LedgerUnavailable(Exception):
    """The bus did not take the write in time (it may still be stored: the message id
    makes a retry safe)."""


@dataclass
class CheckpointRecord:
    seq: int  # the record's ledger sequence
    state: str  # object holding the state
    model: str  # object holding the model agents fetch
    model_etag: str
    position: int  # the events stream position the state contains
    previous: int  # ledger sequence of the checkpoint record before, 0 for none
    replica: str
    digest: str


class Ledger:
    def __init__(self, bus: Bus, replica_id: str) -> None:
        self.bus = bus
        self.stream = bus.ledger_stream
        self.replica_id = replica_id
        self.last = 0  # the sequence of this replica's last write; 0: none (or fenced)

    # -- writes (the scoring replica) ---------------------------------------------------------
    def takeover(self, lease_rev: int) -> bool:
        """Start writing. True when the ledger ends with this replica's own last write (no
        one wrote since, so what it holds in memory is still the truth)."""
        msg_id = f"takeover-{self.replica_id}-{lease_rev}"
        body = orjson.dumps({"replica": self.replica_id, "lease": lease_rev,
                             "time": time.time()})
        if self.last:
            try:
                self.append(LEDGER_TAKEOVER, body, msg_id)
                return True
            except Fenced:
                pass
        for _ in range(20):
            try:
                info = self.bus.call(self.bus.js.stream_info(self.stream))
            except TRANSIENT as exc:
                raise LedgerUnavailable(f"cannot read the ledger ({exc})") from None
            self.last = info.state.last_seq
            try:
                self.append(LEDGER_TAKEOVER, body, msg_id)
                return False
            except Fenced:
                continue  # a write landed in between (the replica before, frozen): again
        raise LedgerUnavailable("the ledger kept moving while taking over")

    def append(self, subject: str, body: bytes, msg_id: str,
               headers: dict[str, str] | None = None) -> tuple[int, bool]:
        """Write one record after this replica's last: (sequence, duplicate). Raises
        Fenced when another replica wrote since, LedgerUnavailable when the bus did not
        answer within WRITE_BUDGET seconds."""
        h = {"Nats-Msg-Id": msg_id, "Nats-Expected-Last-Sequence": str(self.last),
             **(headers or {})}
        deadline = time.monotonic() + WRITE_BUDGET
        while True:
            try:
                ack = self.bus.call(self.bus.js.publish(subject, body, headers=h, timeout=2), 3)
                break
            except nats.js.errors.APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    self.last = 0
                    raise Fenced(f"another replica wrote to the ledger ({exc.description})") \
                        from None
                if time.monotonic() >= deadline:
                    raise LedgerUnavailable(f"the ledger refused a write: {exc}") from None
            except TRANSIENT as exc:
                if time.monotonic() >= deadline:
                    raise LedgerUnavailable(f"the ledger did not take a write in time "
                                            f"({exc or type(exc).__name__})") from None
            time.sleep(0.1)
        self.last = ack.seq
        return ack.seq, bool(ack.duplicate)

    # -- reads ----------------------------------------------------------------------------------
    def checkpoint(self, seq: int | None = None, direct: bool = False) -> CheckpointRecord | None:
        """The newest checkpoint record (or the one at `seq`); None when there is none.
        `direct` reads from any copy of the stream (may lag: for followers' documents);
        otherwise from its leader (after a takeover, everything written before it)."""
        try:
            if seq is None:
                m = self.bus.call(self.bus.js.get_msg(self.stream, subject=LEDGER_CHECKPOINT,
                                                      direct=direct))
            else:
                m = self.bus.call(self.bus.js.get_msg(self.stream, seq=seq, direct=direct))
        except nats.js.errors.NotFoundError:
            return None
        return parse_checkpoint(m.seq, m.subject, m.data)

    def alert_digests(self, after: int, before: int) -> Iterator[int]:
        """The digests of the alert records strictly between two ledger sequences."""
        seq = after + 1
        while seq < before:
            try:
                m = self.bus.call(self.bus.js.get_msg(self.stream, seq=seq,
                                                      subject=LEDGER_ALERT, next=True))
            except nats.js.errors.NotFoundError:
                return
            if m.seq >= before:
                return
            value = (m.headers or {}).get(ALERT_HEADER, "")
            try:
                yield int(value, 16)
            except ValueError:
                log.warning("ledger: alert record %d has no readable key; ignored", m.seq)
            seq = m.seq + 1


def parse_checkpoint(seq: int, subject: str | None, data: bytes | None) -> \
        CheckpointRecord | None:
    if subject != LEDGER_CHECKPOINT or not data:
        return None
    try:
        d = orjson.loads(data)
        return CheckpointRecord(
            seq=seq, state=str(d["state"]), model=str(d["model"]),
            model_etag=str(d.get("model_etag", "")), position=int(d["position"]),
            previous=int(d.get("previous", 0)), replica=str(d.get("replica", "")),
            digest=str(d.get("digest", "")))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.error("ledger: checkpoint record %d is not readable; ignored", seq)
        return None
