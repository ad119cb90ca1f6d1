"""From numbered NDJSON lines to the Events of metadata calls, through the one parser.

Each line is decoded once into the typed schema (`intake.ecs_schema`) and read by the
rules of `scoring.events.read_doc`, the same rules the live agent applies. Around that:
- an Elasticsearch hit (`_source`, as `_search` and elasticdump write them) is read as
  its document, and a whole `{"hits": {"hits": [...]}}` response page as its hits;
- a document whose required sections are only present as dotted keys ("process.name")
  is unflattened and read again;
- process events feed the entity-id join (`intake.join`) instead of being scored;
- every line that yields no event is accounted for: malformed ones through `report`
  (line number, reason, kind), skipped ones in `skipped` by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

import msgspec
import orjson

from intake.ecs_schema import EcsDoc, decoder
from intake.join import ProcessJoin
from intake.ndjson import MAX_LINE_BYTES
from intake.parser import (
    NOT_METADATA,
    MalformedEvent,
    has_dotted_keys,
    parse_timestamp,
    read_doc,
    typed_doc,
)
from scoring.events import Event

Report = Callable[[int, str, str], None]
Match = Callable[[str, int | None], Any]


class Position:
    """How far a reading got: the number of the last line read, blank lines included."""

    __slots__ = ("lineno",)

    def __init__(self) -> None:
        self.lineno = 0


def read_events(
    lines: Iterable[tuple[int, bytes | None]],
    match: Match,
    report: Report,
    skipped: Counter,
    join: ProcessJoin | None = None,
    position: Position | None = None,
) -> Iterator[tuple[int, Event, Any]]:
    """(line number, Event, endpoint) for every metadata call in `lines`; a line of None
    is one `ndjson.numbered_lines` refused as too long."""
    decode = decoder().decode
    pos = position if position is not None else Position()
    lines = _one_document_if_pretty(iter(lines))
    # The join's memory, read inline: most exports have no process events to join.
    joined = join._facts if join is not None else None
    not_metadata = 0
    try:
        for lineno, line in lines:
            pos.lineno = lineno
            if line is None:
                report(lineno, f"line longer than {MAX_LINE_BYTES} bytes", "too long")
                continue
            try:
                d = decode(line)
                raw: bytes | None = line
                copied = None
                src = d.source if d.source is not None else d
                if src.destination is None or src.process is None or src.timestamp is None:
                    if d.hits is not None and d.source is None:
                        yield from _read_page(lineno, line, match, report, skipped, join)
                        continue
                    again = _unflattened(line)
                    if again is not None:
                        d, copied = again
                        raw = None
                out = read_doc(d, match, raw, copied)
            except msgspec.ValidationError as exc:
                # Not in the canonical form: an array of documents, dotted keys, arrays
                # or numbers where ECS allows them, or a real type error.
                yield from _read_other(lineno, line, exc, match, report, skipped, join)
                continue
            except msgspec.DecodeError as exc:
                report(lineno, f"not valid JSON ({exc})", "not JSON")
                continue
            except RecursionError:
                report(lineno, "JSON nested too deeply", "too deep")
                continue
            except MalformedEvent as bad:
                report(lineno, str(bad), bad.kind)
                continue
            if isinstance(out, tuple):
                if joined:
                    join.fill(out[0], d.source if d.source is not None else d)  # type: ignore[union-attr]
                if not_metadata:  # counts are current whenever an event is handed out
                    skipped[NOT_METADATA] += not_metadata
                    not_metadata = 0
                yield lineno, out[0], out[1]
            elif out is NOT_METADATA:
                not_metadata += 1
            else:
                _skip(d, out, skipped, join)
    finally:
        if not_metadata:
            skipped[NOT_METADATA] += not_metadata


def _one_document_if_pretty(lines: Iterator[tuple[int, bytes | None]]
                            ) -> Iterator[tuple[int, bytes | None]]:
    """The lines as they are, or, when the first is a lone `{` or `[` (pretty-printed JSON:
    a `_search` response copied from Kibana Dev Tools, `curl ...?pretty`, `jq .`), the whole
    input as one line numbered 1 (None when it is longer than MAX_LINE_BYTES). NDJSON never
    starts that way: its first line is a whole document."""
    first = next(lines, None)
    if first is None:
        return iter(())
    head = first[1]
    if head is None or head.strip() not in (b"{", b"["):
        # The lines themselves (chained in C: no generator step per line).
        return chain((first,), lines)
    return _one_document(first[0], head, lines)


def _one_document(lineno: int, head: bytes, lines: Iterator[tuple[int, bytes | None]]
                  ) -> Iterator[tuple[int, bytes | None]]:
    parts = [head]
    size = len(head)
    for _, line in lines:
        if line is None or size + len(line) + 1 > MAX_LINE_BYTES:
            for _ in lines:  # read to the end; the whole input is one refused line
                pass
            yield lineno, None
            return
        parts.append(line)
        size += len(line) + 1
    yield lineno, b"\n".join(parts)


def _skip(d: EcsDoc, reason: str, skipped: Counter, join: ProcessJoin | None) -> None:
    src = d.source if d.source is not None else d
    if join is not None and _is_process_event(src) and join.learn(src, _time_or_none(src)):
        skipped["process event (kept for the entity-id join)"] += 1
    else:
        skipped[reason] += 1


def _unflattened(line: bytes) -> tuple[EcsDoc, dict] | None:
    """The document again, unflattened, when the line has dotted keys (at the top or in
    `_source`); None otherwise. Only lines lacking a required section pay for this."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    inner = doc.get("_source")
    if has_dotted_keys(doc) or (isinstance(inner, dict) and has_dotted_keys(inner)):
        return typed_doc(doc)
    return None


def _read_other(lineno: int, line: bytes, exc: msgspec.ValidationError, match: Match,
                report: Report, skipped: Counter, join: ProcessJoin | None
                ) -> Iterator[tuple[int, Event, Any]]:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as bad:
        report(lineno, f"not valid JSON ({bad.msg})", "not JSON")
        return
    if isinstance(doc, list) and doc and all(isinstance(x, dict) for x in doc):
        yield from _read_docs(lineno, doc, "document", match, report, skipped, join)
        return
    if not isinstance(doc, dict):
        report(lineno, "line is not a JSON object", "not a JSON object")
        return
    yield from _read_docs(lineno, [doc], None, match, report, skipped, join)


def _read_docs(lineno: int, docs: list, label: str | None, match: Match, report: Report,
               skipped: Counter, join: ProcessJoin | None
               ) -> Iterator[tuple[int, Event, Any]]:
    """Decoded documents of one line (an array's, a page's hits, or the line's own)."""
    for i, doc in enumerate(docs):
        where = f"{label} {i}: " if label else ""
        try:
            d, copied = typed_doc(doc)
            if d.hits is not None and d.source is None:
                raise MalformedEvent("a _search response page inside another")
            out = read_doc(d, match, None, copied)
        except MalformedEvent as bad:
            report(lineno, f"{where}{bad}", bad.kind)
            continue
        if isinstance(out, tuple):
            if join is not None:
                join.fill(out[0], d.source if d.source is not None else d)
            yield lineno, out[0], out[1]
        else:
            _skip(d, out, skipped, join)


def _is_process_event(d: EcsDoc) -> bool:
    e = d.event
    if e is None or d.destination is not None or d.process is None:
        return False
    cat = e.category
    return cat == "process" or (isinstance(cat, list) and "process" in cat)


def _time_or_none(d: EcsDoc) -> float | None:
    try:
        return parse_timestamp(d.timestamp)
    except MalformedEvent:
        return None


def _read_page(lineno: int, line: bytes, match: Match, report: Report, skipped: Counter,
               join: ProcessJoin | None) -> Iterator[tuple[int, Event, Any]]:
    """A `_search` response page: each hit is a document (its `_source`), reported with
    the page's line number and the hit's index."""
    page = orjson.loads(line)
    hits = page.get("hits")
    hits = hits.get("hits") if isinstance(hits, dict) else None
    if not isinstance(hits, list):
        report(lineno, "hits.hits is not an array", "invalid field")
        return
    yield from _read_docs(lineno, hits, "hit", match, report, skipped, join)
