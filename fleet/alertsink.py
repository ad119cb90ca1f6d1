"""The fleet scorer's alert lines out, each written once across restarts and takeovers.

After a restart the scorer re-scores its log from the last checkpoint and raises again the
alerts it wrote since: those are skipped by key (the triggering event's `event.id`, or the
whole line for an alert without one, such as the cap's summary), known from
- an output file: its lines after the offset the checkpoint saved;
- standard output, which cannot be read back: a journal beside the state
  (`STATE.alerts.N`), where each line's key is noted right after the line is written (a
  SIGKILL landing between the two writes, microseconds apart, repeats that one line);
- on the bus: the ledger's alert records after the checkpoint (`skip`).

With `record` set (the bus), each line is first recorded there, fenced by the scoring lease,
and written to the output only once that succeeded: a replica that lost its lease writes
nothing anywhere.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import orjson

from exporters.alertcap import AlertCap
from fleet.dedup import digest

# Records a line before it is written; False when the record already had it (a replica
# before this one wrote it): the line is then not written again.
Record = Callable[[bytes, int], bool]  # (line, digest of its key)


def alert_key(doc: dict, line: bytes) -> bytes:
    """What makes two alert lines the same alert: the triggering event's id, else the
    line itself."""
    event = doc.get("event")
    eid = event.get("id") if isinstance(event, dict) else None
    if isinstance(eid, str) and eid:
        return b"id:" + eid.encode()
    return b"line:" + line.rstrip(b"\n")


def line_key(line: bytes) -> bytes:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        doc = None
    return alert_key(doc if isinstance(doc, dict) else {}, line)


class AlertSink:
    def __init__(self, output: str, stream: BinaryIO, cap: AlertCap | None = None, *,
                 journal: str | Path | None = None, record: Record | None = None,
                 recorded: Callable[[], Iterable[int]] | None = None) -> None:
        # The same alert-line cap as the agent's and replay's (exporters.alertcap): one
        # compromised image on every node must not bury the SIEM either.
        self.cap = cap
        self.path = None if output == "-" else Path(output)
        self._stream: BinaryIO = stream if self.path is None else open(self.path, "ab")  # noqa: SIM115
        self.record = record
        self.recorded = recorded  # the digests of the lines the record holds since
        # Journal of what went to standard output (local mode only: on the bus the ledger
        # is the record).
        self._journal = Path(journal) if journal is not None and self.path is None else None
        self._jgen = 0
        self._jfd = -1
        self._skip: collections.Counter[int] = collections.Counter()
        self.written = 0

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_fields(self) -> dict:
        """What a checkpoint saves to find, after a restart, the lines written since."""
        if self.record is not None:
            return {}  # the ledger is the record, whichever replica reads it next
        if self.path is not None:
            return {"alerts_offset": self._stream.tell()}
        if self._journal is not None:
            # From here on lines are noted in a new generation; the checkpoint names it.
            self._open_journal(self._jgen + 1)
            return {"alerts_journal": self._jgen}
        return {}

    def checkpoint_saved(self) -> None:
        """The checkpoint is durable: older journal generations are no longer needed."""
        for gen, path in self._journals():
            if gen < self._jgen:
                path.unlink(missing_ok=True)

    def resume(self, fleet: dict) -> None:
        """Learn the lines written since the checkpoint whose fleet section is `fleet`."""
        if self.record is not None:
            if self.recorded is not None:
                self._skip.update(self.recorded())
            return
        if self.path is not None:
            offset = fleet.get("alerts_offset")
            if offset is not None and self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(int(offset))
                    self.skip(line_key(line) for line in f if line.endswith(b"\n"))
        elif self._journal is not None:
            since = int(fleet.get("alerts_journal") or 0)
            last = since
            for gen, path in self._journals():
                if gen >= since:
                    data = path.read_bytes()
                    whole = len(data) - len(data) % 8
                    self._skip.update(int.from_bytes(data[i:i + 8], "little")
                                      for i in range(0, whole, 8))
                    last = max(last, gen)
            self._open_journal(last)

    def open(self) -> None:
        """Start noting lines (a fresh start with no checkpoint calls `resume({})`)."""
        if self._journal is not None and self._jfd < 0:
            self._open_journal(self._jgen)

    def skip(self, keys: Iterable[bytes]) -> None:
        """These alerts were already written: do not write them again."""
        self._skip.update(digest(k) for k in keys)

    def _journals(self) -> list[tuple[int, Path]]:
        if self._journal is None:
            return []
        out = []
        pattern = re.compile(re.escape(self._journal.name) + r"\.(\d+)")
        for p in self._journal.parent.glob(self._journal.name + ".*"):
            m = pattern.fullmatch(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def _open_journal(self, gen: int) -> None:
        assert self._journal is not None
        if self._jfd >= 0:
            os.close(self._jfd)
        self._jgen = gen
        self._jfd = os.open(f"{self._journal}.{gen}",
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    # -- lines ------------------------------------------------------------------------------
    def alert(self, doc: dict, ts: float, detector: str) -> None:
        """An alert line, through the cap (which may write a window's summary first)."""
        if self.cap is not None:
            admitted, summary = self.cap.admit(ts, detector)
            if summary is not None:
                self._write_doc(summary)
            if not admitted:
                return
        self._write_doc(doc)

    def flush_cap(self, now: float) -> None:
        """The cap's summary for a window that has ended by event time `now`."""
        if self.cap is not None:
            summary = self.cap.flush(now)
            if summary is not None:
                self._write_doc(summary)

    def _write_doc(self, doc: dict) -> None:
        line = orjson.dumps(doc) + b"\n"
        self.write(line, alert_key(doc, line))

    def write(self, line: bytes, key: bytes) -> None:
        d = digest(key)
        if self._skip:
            n = self._skip.get(d, 0)
            if n > 0:
                if n == 1:
                    del self._skip[d]
                else:
                    self._skip[d] = n - 1
                return
        if self.record is not None and not self.record(line, d):
            return
        self._stream.write(line)
        self._stream.flush()
        if self._jfd >= 0:
            os.write(self._jfd, d.to_bytes(8, "little"))
        self.written += 1

    def close(self) -> None:
        if self.path is not None:
            self._stream.close()
        else:
            self._stream.flush()
        if self._jfd >= 0:
            os.close(self._jfd)
            self._jfd = -1
