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
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import orjson

from imdswatch.ndjson import numbered_lines
from scoring.ecs_schema import SchemaMismatch, decoder
from scoring.events import MalformedEvent, event_from_ecs, event_from_typed, typed_head
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


def replay(
    source: str,
    scorer: Scorer,
    on_outcome: Callable[[Outcome], None],
    stats: ReplayStats | None = None,
    reorder_window: float = DEFAULT_REORDER_WINDOW,
    on_malformed: Callable[[int, str], None] | None = None,
) -> ReplayStats:
    """Score every event of `source` (path or '-'); `on_outcome` gets the outcome of each
    metadata event that was scored in full (events of entities known to be common are
    counted and learned without one). Raises `imdswatch.ndjson.InputError` when the input
    cannot be read."""
    stats = stats or ReplayStats()
    report = on_malformed or MalformedReporter(stats)
    score = _Scoring(scorer, on_outcome, stats)
    buffer = ReorderBuffer(reorder_window)
    # The buffer's state lives in locals on the inline path and is handed back and forth
    # around the buffer's own methods.
    fifo, heap, window = buffer.fifo, buffer.heap, reorder_window
    newest, released = buffer.newest, buffer.released
    typed = decoder().decode
    loads = orjson.loads
    match = scorer.catalog.match
    learn_quiet = scorer.learn_quiet
    quiet_entity = scorer.quiet_entity
    lines = skipped = scored = 0
    # One flat loop: at a few microseconds per line, every generator hop or helper call
    # is a visible share of replay time. Sorted input (the usual case) takes the inline
    # path: straight into the FIFO, and the events it releases that belong to common
    # entities are counted on the spot; everything else goes through the buffer and
    # `_Scoring`, which do the same thing the long way.
    for lineno, line in numbered_lines(source):
        lines += 1
        try:
            d = typed(line)
            head = typed_head(d)
        except SchemaMismatch:
            head = None
        if head is not None:
            ts, ip, port, sig = head
            endpoint = match(ip, port)
            if endpoint is None:
                skipped += 1
                continue
            # An entity already known to be common at `ts` is still common when its event
            # leaves the buffer (only its own later events could change that), so all the
            # buffer keeps of such an event is its time and the entity: holding thousands of
            # decoded documents costs more in cache misses than everything else here.
            rec = quiet_entity(sig, ts)
            item = (ts, lineno, rec) if rec is not None else (
                ts, lineno, None, sig, endpoint, d, line, None)
        else:
            try:
                ev = event_from_ecs(loads(line))
            except orjson.JSONDecodeError as exc:
                report(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            except MalformedEvent as exc:
                report(lineno, str(exc))
                continue
            endpoint = match(ev.dst_ip, ev.dst_port)
            if endpoint is None:
                skipped += 1
                continue
            ts = ev.ts
            item = (ts, lineno, None, ev.signature(), endpoint, None, line, ev)
        if ts >= newest and not heap:
            fifo.append(item)
            newest = ts
            horizon = ts - window
            while fifo and fifo[0][0] <= horizon:
                ready = fifo.popleft()
                released = rts = ready[0]
                rec = ready[2]
                if rec is not None and learn_quiet(rec, rts):
                    scored += 1
                else:
                    score(ready)
        else:
            buffer.newest, buffer.released = newest, released
            for ready in buffer.push(item):
                score(ready)
            newest, released = buffer.newest, buffer.released
    buffer.newest, buffer.released = newest, released
    for ready in buffer.drain():
        score(ready)
    stats.lines += lines
    stats.skipped += skipped
    stats.scored += scored
    stats.late += buffer.late
    stats.last_ts = scorer.last_ts
    stats.first_ts = score.first_ts
    return stats


class ReorderBuffer:
    """Holds items (time, line number, ...) until the newest time seen is `window` past them, then
    releases them in time order. In-order arrivals, the usual case, queue in a FIFO;
    only out-of-order ones pay for the heap. An item older than what was already
    released comes straight back out and is counted in `late`."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.fifo: deque[tuple] = deque()
        self.heap: list[tuple] = []
        self.newest = -math.inf
        self.released = -math.inf
        self.late = 0

    def push(self, item: tuple) -> list[tuple]:
        ts = item[0]
        if ts < self.released:
            self.late += 1
            return [item]
        fifo = self.fifo
        if not fifo or ts >= fifo[-1][0]:
            fifo.append(item)
        else:
            heapq.heappush(self.heap, item)
        if ts <= self.newest:
            return _NONE
        self.newest = ts
        return self._release(ts - self.window)

    def _release(self, horizon: float) -> list[tuple]:
        fifo, heap = self.fifo, self.heap
        out = []
        while True:
            if fifo and fifo[0][0] <= horizon:
                if heap and heap[0] < fifo[0]:
                    out.append(heapq.heappop(heap))
                else:
                    out.append(fifo.popleft())
            elif heap and heap[0][0] <= horizon:
                out.append(heapq.heappop(heap))
            else:
                break
        if out:
            self.released = out[-1][0]
        return out

    def drain(self) -> list[tuple]:
        return self._release(math.inf)


_NONE: list[tuple] = []


class _Scoring:
    """Scores released items: the quiet fast path first, the full event otherwise."""

    def __init__(self, scorer: Scorer, on_outcome: Callable[[Outcome], None],
                 stats: ReplayStats) -> None:
        self.quiet = scorer.process_quiet
        self.learn_quiet = scorer.learn_quiet
        self.process = scorer.process_matched
        self.on_outcome = on_outcome
        self.stats = stats
        # The first event scored in full, which is the first of the replay: no entity is
        # known to be common before its first full scoring.
        self.first_ts: float | None = None

    def __call__(self, item: tuple) -> None:
        st = self.stats
        st.scored += 1
        rec = item[2]
        if rec is not None and self.learn_quiet(rec, item[0]):
            return
        ts, _, _, sig, endpoint, d, line, ev = item
        if self.quiet(sig, ts):
            return
        if self.first_ts is None:
            self.first_ts = ts
        if ev is None:
            dst = d.destination
            ev = event_from_typed(d, line, (ts, dst.ip, dst.port, sig))
        out = self.process(ev, endpoint, False)
        if out is None:
            return
        if out.reason:
            st.anomalies += 1
        if out.alert:
            st.alerts += 1
            st.alerts_by_detector[out.detector] += 1
        self.on_outcome(out)


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
        f"  learning: {'yes (only history-free rules alert)' if scorer.learning else 'done'}",
    ]
    return "\n".join(lines)
