"""`imdswatch replay`: score a recorded trace exactly as the live agent would have.

Events are scored in event-time order. Exported traces are rarely perfectly sorted
(several hosts' streams interleave, shippers batch), so events wait in a reorder buffer
until the newest event time seen is `reorder_window` past them; an event that arrives
later than that is still scored, immediately, and counted as late in the summary. An
infinite window sorts the whole input first. No wall-clock time is read while scoring.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from intake.forked_reader import ForkedReader
from intake.ndjson import InputError, Interrupt, Interrupted, numbered_lines
from intake.parser import NOT_METADATA
from intake.reorder import ReorderBuffer
from scoring.scorer import Outcome, Scorer

DEFAULT_REORDER_WINDOW = 600.0
MALFORMED_SHOWN = 20
# The cyclic collector's first threshold while a replay scores (the default is 700). Events,
# their outcomes and batches are freed by their reference counts, so the collector finds
# nothing to free in a replay; but a batch of events in flight keeps more than 700 objects
# alive, so at the default it would run over and over to find that out. Above what a batch
# holds, it runs when objects do accumulate, and whatever cyclic garbage there is stays
# bounded by it.
GC_THRESHOLD = 50_000


@contextmanager
def _collector_threshold(first: int) -> Iterator[None]:
    """The collector's first threshold set to `first` within, restored after."""
    before = gc.get_threshold()
    gc.set_threshold(first, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


@dataclass
class ReplayStats:
    lines: int = 0
    scored: int = 0
    skipped: int = 0
    malformed: int = 0
    late: int = 0
    # released before their window ran out because the reorder buffer was full
    forced: int = 0
    alerts: int = 0
    anomalies: int = 0
    alerts_by_detector: Counter = field(default_factory=Counter)
    malformed_examples: list[tuple[int, str]] = field(default_factory=list)
    # Every line that gave no scored event, by reason.
    malformed_by_kind: Counter = field(default_factory=Counter)
    skipped_by_reason: Counter = field(default_factory=Counter)
    joined: int = 0
    join_evicted: int = 0
    # Set when the replay was stopped early (`interrupted`: the signal, if one did): the
    # events read but still waiting in the reorder buffer were not scored.
    stopped: bool = False
    interrupted: int | None = None
    unscored: int = 0
    first_ts: float | None = None
    last_ts: float | None = None


class MalformedReporter:
    """Reports each malformed line with its number on stderr, the first few in full."""

    def __init__(self, stats: ReplayStats, stream: TextIO | None = None,
                 limit: int = MALFORMED_SHOWN) -> None:
        self.stats = stats
        self.stream = stream if stream is not None else sys.stderr
        self.limit = limit

    def __call__(self, lineno: int, reason: str, kind: str = "malformed") -> None:
        st = self.stats
        st.malformed += 1
        st.malformed_by_kind[kind] += 1
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
    on_malformed: Callable[[int, str, str], None] | None = None,
    stop: Interrupt | None = None,
    wrap_lines: Callable[[Iterator[tuple[int, bytes | None]]],
                         Iterator[tuple[int, bytes | None]]] | None = None,
) -> ReplayStats:
    """Score every event of `source` (path or '-') through `Scorer.process`, in event
    time; `on_outcome` gets the outcome of each metadata event.

    The lines are read by `read_events` in a second process (`intake.forked_reader`)
    while this one scores. Raises `intake.ndjson.InputError` when the input cannot be
    read (after scoring what was read before the failure). When `stop` is requested (a
    signal), reading stops, the events still in the reorder buffer are left unscored
    (counted in `stats.unscored`), `stats.stopped` is set and `stats.interrupted` holds
    the signal. `wrap_lines` wraps the numbered lines (to show progress); the reading
    process iterates them."""
    stats = stats or ReplayStats()
    report = on_malformed or MalformedReporter(stats)
    score = _Scoring(scorer, on_outcome, stats, report)
    buffer = ReorderBuffer(reorder_window)
    push = buffer.push
    seq = 0
    waiting = Interrupt()  # the reading process's: tells it when it waits for input
    lines = numbered_lines(source, waiting)
    if wrap_lines is not None:
        lines = wrap_lines(lines)
    skipped_before = Counter(stats.skipped_by_reason)
    failure: InputError | None = None
    reader = ForkedReader(lines, scorer.catalog.match, waiting)
    with _collector_threshold(GC_THRESHOLD):
        try:
            for batch in reader.batches(report, stop):
                for lineno, ev in batch:
                    seq += 1  # orders events of equal time as read (a page holds several)
                    released = push((ev.ts, seq, ev, lineno))
                    if released:
                        for item in released:
                            score(item)
        except Interrupted as exc:
            stats.stopped = True
            stats.interrupted = exc.signum
        except InputError as exc:
            failure = exc
        finally:
            reader.close()
        if not stats.stopped:
            for item in buffer.drain():
                score(item)
        else:
            stats.unscored = len(buffer.fifo) + len(buffer.heap)
    stats.lines += reader.lineno
    stats.skipped_by_reason = skipped_before + reader.skipped
    stats.skipped = sum(stats.skipped_by_reason.values())
    stats.late += buffer.late
    stats.forced += buffer.forced
    stats.joined += reader.joined
    stats.join_evicted += reader.join_evicted
    stats.last_ts = scorer.last_ts
    if failure is not None:
        raise failure
    return stats


class _Scoring:
    """Scores one released (time, sequence, event, line) item and keeps the counts."""

    def __init__(self, scorer: Scorer, on_outcome: Callable[[Outcome], None],
                 stats: ReplayStats, report: Callable[..., None]) -> None:
        self.process = scorer.process
        self.on_outcome = on_outcome
        self.stats = stats
        self.report = report

    def __call__(self, item: tuple) -> None:
        ev = item[2]
        try:
            out = self.process(ev)
        except ValueError as exc:  # an event time the model refuses
            self.report(item[3], str(exc))
            return
        if out is None:
            return
        st = self.stats
        st.scored += 1
        if st.first_ts is None:
            st.first_ts = ev.ts
        if out.reason:
            st.anomalies += 1
        if out.alert:
            st.alerts += 1
            st.alerts_by_detector[out.detector] += 1
        self.on_outcome(out)


def _by(counts: Counter) -> str:
    """' (reason 3, other 1)' for a non-empty count by reason."""
    if not counts:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + ")"


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
        f"  skipped (not a metadata endpoint): {stats.skipped_by_reason[NOT_METADATA]}",
        *([f"  skipped (not a metadata call): {other}" + _by(Counter(
            {k: v for k, v in stats.skipped_by_reason.items() if k != NOT_METADATA}))]
          if (other := stats.skipped - stats.skipped_by_reason[NOT_METADATA]) else []),
        f"  malformed lines: {stats.malformed}"
        + (f" (first at line {stats.malformed_examples[0][0]})" if stats.malformed_examples
           else "") + _by(stats.malformed_by_kind),
        f"  arrived out of order beyond the reorder window: {stats.late}"
        + (f" (the buffer was full: {stats.forced} scored before their window ran out)"
           if stats.forced else ""),
        *([f"  parent and command line filled from the export's process events: "
           f"{stats.joined}" + (f" (join memory full: {stats.join_evicted} entities "
                                f"forgotten)" if stats.join_evicted else "")]
          if stats.joined or stats.join_evicted else []),
        *(["  stopped early ("
           + (f"signal {stats.interrupted}" if stats.interrupted else "output failed")
           + f"): {stats.unscored} events read but not scored"] if stats.stopped else []),
        f"  anomalies: {stats.anomalies}; alerts: {stats.alerts} ({by_det})",
        f"  model: {sum(size.values())} entities "
        + "(" + ", ".join(f"{k} {v}" for k, v in size.items()) + ")",
        f"  learning: {'yes (only history-free rules alert)' if scorer.learning else 'done'}",
    ]
    return "\n".join(lines)
