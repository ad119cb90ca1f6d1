"""`imdswatch replay`: score a recorded trace exactly as the live agent would have.

Events are scored in event-time order. Exported traces are rarely perfectly sorted
(several hosts' streams interleave, shippers batch), so events wait in a reorder buffer
until the newest event time seen is `reorder_window` past them; an event that arrives
later than that is still scored, immediately, and counted as late in the summary. An
infinite window sorts the whole input first. No wall-clock time is read while scoring.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

import orjson

from imdswatch.ndjson import numbered_lines
from scoring.events import Event, MalformedEvent, event_from_ecs
from scoring.scorer import Outcome, Scorer

DEFAULT_REORDER_WINDOW = 600.0
MALFORMED_SHOWN = 20


@dataclass
class ReplayStats:
    lines: int = 0
    scored: int = 0
    skipped: int = 0
    malformed: int = 0
    late: int = 0
    alerts: int = 0
    anomalies: int = 0
    alerts_by_detector: Counter = field(default_factory=Counter)
    malformed_examples: list[tuple[int, str]] = field(default_factory=list)
    first_ts: float | None = None
    last_ts: float | None = None


class MalformedReporter:
    """Reports each malformed line with its number on stderr, the first few in full."""

    def __init__(self, stats: ReplayStats, stream: TextIO | None = None,
                 limit: int = MALFORMED_SHOWN) -> None:
        self.stats = stats
        self.stream = stream if stream is not None else sys.stderr
        self.limit = limit

    def __call__(self, lineno: int, reason: str) -> None:
        st = self.stats
        st.malformed += 1
        if st.malformed <= self.limit:
            st.malformed_examples.append((lineno, reason))
            print(f"imdswatch: line {lineno}: skipped malformed event: {reason}",
                  file=self.stream)
        elif st.malformed == self.limit + 1:
            print("imdswatch: more malformed lines follow; their count is in the summary",
                  file=self.stream)


def parse_lines(
    lines: Iterable[tuple[int, bytes]], on_malformed: Callable[[int, str], None]
) -> Iterable[Event]:
    loads = orjson.loads
    for lineno, line in lines:
        try:
            yield event_from_ecs(loads(line))
        except orjson.JSONDecodeError as exc:
            on_malformed(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})")
        except MalformedEvent as exc:
            on_malformed(lineno, str(exc))


def in_event_time_order(
    events: Iterable[Event], window: float, stats: ReplayStats
) -> Iterable[Event]:
    """Yield events sorted by time within a reorder buffer of `window` seconds."""
    heap: list[tuple[float, int, Event]] = []
    push, pop = heapq.heappush, heapq.heappop
    newest = -math.inf
    released = -math.inf  # time of the last event let out of the buffer
    seq = 0
    for ev in events:
        ts = ev.ts
        if ts < released:
            stats.late += 1
            yield ev
            continue
        seq += 1
        push(heap, (ts, seq, ev))
        if ts > newest:
            newest = ts
            horizon = newest - window
            while heap and heap[0][0] <= horizon:
                released = heap[0][0]
                yield pop(heap)[2]
    while heap:
        yield pop(heap)[2]


def replay(
    source: str,
    scorer: Scorer,
    on_outcome: Callable[[Outcome], None],
    stats: ReplayStats | None = None,
    reorder_window: float = DEFAULT_REORDER_WINDOW,
    on_malformed: Callable[[int, str], None] | None = None,
) -> ReplayStats:
    """Score every event of `source` (path or '-'); `on_outcome` gets each metadata event's
    outcome. Raises `imdswatch.ndjson.InputError` when the input cannot be read."""
    stats = stats or ReplayStats()
    report = on_malformed or MalformedReporter(stats)

    def counted() -> Iterable[tuple[int, bytes]]:
        for item in numbered_lines(source):
            stats.lines += 1
            yield item

    events = parse_lines(counted(), report)
    process = scorer.process
    for ev in in_event_time_order(events, reorder_window, stats):
        out = process(ev)
        if out is None:
            stats.skipped += 1
            continue
        stats.scored += 1
        if stats.first_ts is None:
            stats.first_ts = ev.ts
        stats.last_ts = ev.ts
        if out.reason:
            stats.anomalies += 1
        if out.alert:
            stats.alerts += 1
            stats.alerts_by_detector[out.detector] += 1
        on_outcome(out)
    return stats


def summary(stats: ReplayStats, scorer: Scorer, seconds: float) -> str:
    """The one-screen summary printed to stderr after a replay."""
    span = ""
    if stats.first_ts is not None and stats.last_ts is not None:
        from scoring.durations import format_duration

        span = f" over {format_duration(stats.last_ts - stats.first_ts)} of event time"
    rate = stats.lines / seconds if seconds > 0 else 0.0
    by_det = ", ".join(f"{d} {n}" for d, n in stats.alerts_by_detector.most_common()) or "none"
    size = scorer.model_size()
    lines = [
        f"imdswatch replay: {stats.lines} lines in {seconds:.2f}s ({rate:,.0f} lines/s)",
        f"  metadata events scored: {stats.scored}{span} from {scorer.hosts_seen} host"
        + ("s" if scorer.hosts_seen != 1 else ""),
        f"  skipped (not a metadata endpoint): {stats.skipped}",
        f"  malformed lines: {stats.malformed}"
        + (f" (first at line {stats.malformed_examples[0][0]})" if stats.malformed_examples
           else ""),
        f"  arrived out of order beyond the reorder window: {stats.late}",
        f"  anomalies: {stats.anomalies}; alerts: {stats.alerts} ({by_det})",
        f"  model: {sum(size.values())} entities "
        + "(" + ", ".join(f"{k} {v}" for k, v in size.items()) + ")",
        f"  learning: {'yes, no alerts yet' if scorer.learning else 'done'}",
    ]
    return "\n".join(lines)
