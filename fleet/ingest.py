"""Reading one ingest body: NDJSON events (contract section 1), plain or gzip, bounded.

Each usable line becomes an `Item`: the event, its raw line (what the log keeps and a
restart re-reads), the id digest it is de-duplicated by and whether the agent already
alerted on it. Events without `event.id` (e.g. from a log pipeline) are de-duplicated by
the digest of their line, so a retried identical batch is still scored once.

A line may also hold a JSON array of events (what Logstash's `json_batch` format sends).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from fleet.dedup import digest
from intake.ndjson import MAX_LINE_BYTES
from intake.reader import read_events
from scoring.endpoints import EndpointCatalog
from scoring.events import Event

# The optional event field an agent sets on an event it already alerted on (scored locally
# while the fleet scorer was away): the fleet scorer learns it without alerting again.
AGENT_ALERTED = "agent_alerted"


class BodyTooLarge(ValueError):
    """413: the (decompressed) body is over the limit."""


class NotNdjson(ValueError):
    """400: the body is not NDJSON at all; the message says why."""


class Item:
    __slots__ = ("event", "line", "key", "agent_alerted")

    def __init__(self, event: Event, line: bytes, key: int, agent_alerted: bool) -> None:
        self.event = event
        self.line = line
        self.key = key
        self.agent_alerted = agent_alerted


@dataclass
class Parsed:
    items: list[Item] = field(default_factory=list)
    skipped: int = 0
    malformed: int = 0
    lines: int = 0


def decompress(body: bytes, limit: int) -> bytes:
    """Gunzip `body` (several members allowed), refusing more than `limit` bytes out, so
    a small compressed bomb cannot take the server's memory."""
    out = []
    size = 0
    data = body
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            chunk = d.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise NotNdjson(f"Content-Encoding gzip, but the body is not gzip ({exc})") from None
        size += len(chunk)
        out.append(chunk)
        if size > limit:
            raise BodyTooLarge(f"decompressed body is over {limit} bytes")
        if not d.eof:
            raise NotNdjson("gzip body ends before its end-of-stream marker")
        data = d.unused_data.lstrip(b"\x00")
    return b"".join(out)


def _flag(doc: dict) -> bool:
    own = doc.get("imdswatch")
    if isinstance(own, dict) and own.get(AGENT_ALERTED) is True:
        return True
    return doc.get(f"imdswatch.{AGENT_ALERTED}") is True


def parse(body: bytes, catalog: EndpointCatalog) -> Parsed:
    """Every line of `body`, read by the reader `imdswatch replay` uses (`intake.reader`:
    the typed ECS schema, Elasticsearch hits and arrays, dotted keys), so serve takes
    exactly the events replay would. Raises NotNdjson when no line at all is JSON."""
    res = Parsed()
    not_json = 0
    first_error = ""

    def report(lineno: int, reason: str, kind: str) -> None:
        nonlocal not_json, first_error
        res.malformed += 1
        if kind == "not JSON":
            not_json += 1
            first_error = first_error or f"line {lineno}: {reason}"

    def lines() -> Iterator[tuple[int, bytes | None]]:
        for n, line in enumerate(body.split(b"\n"), 1):
            if line and not line.isspace():
                res.lines += 1
                yield n, (line if len(line) <= MAX_LINE_BYTES else None)

    skipped: Counter = Counter()
    # No entity-id join: a process event would have to be kept with the batch in the
    # log for a restart to re-read it; agents send calls already enriched.
    found = list(read_events(lines(), catalog.match, report, skipped))
    per_line = Counter(n for n, _ev, _e in found)
    for n, ev, _endpoint in found:
        raw = ev._raw if per_line[n] == 1 and ev._raw is not None else orjson.dumps(ev.doc)
        key = digest(ev.event_id.encode() if ev.event_id else raw)
        flagged = AGENT_ALERTED.encode() in raw and _flag(ev.doc or {})
        res.items.append(Item(ev, raw, key, flagged))
    res.skipped = sum(skipped.values())
    if res.lines and not_json == res.lines:
        raise NotNdjson(f"no line is JSON ({first_error})")
    return res
