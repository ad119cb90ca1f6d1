"""What the agent is doing, in words: learning or not and until when, and a periodic one-line
summary of events, alerts, probe and drops.

A new agent with no history learns for a day and raises nothing meanwhile; without saying so
it looks broken. These lines go to the agent's log at start and every summary interval, and
the same facts are metrics (`imdswatch_learning`, `imdswatch_learning_end_*`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from scoring.durations import format_duration
from scoring.scorer import Scorer

SKIP_HINT = ("to skip it, start from a warmed model: --state FILE written by `imdswatch replay "
             "--state` or `imdswatch state merge`, or a fleet model with --fleet URL")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class AgentStats:
    events: int = 0
    scored: int = 0
    skipped: int = 0
    malformed: int = 0
    failed: int = 0
    alerts: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class Learning:
    learning: bool
    # Event time at which learning ends; None while no event has been seen.
    ends_event_ts: float | None
    # Wall-clock estimate of the same moment (events of a live agent are stamped with the
    # wall clock, so they agree unless the model was loaded from older history).
    ends_wall_ts: float | None
    text: str


def learning_status(scorer: Scorer, now: float | None = None) -> Learning:
    now = time.time() if now is None else now
    period = float(scorer.settings.learning_period)
    first, last = scorer.first_ts, scorer.last_ts
    if period <= 0:
        return Learning(False, None, None, "learning: off (learning period 0): alerts are on")
    if not scorer.learning:
        history = format_duration(last - first) if first is not None and last is not None \
            else "no"
        return Learning(False, (first + period) if first is not None else None, None,
                        f"learning: done ({history} of history, "
                        f"{scorer.events_learned} events): alerts are on")
    if first is None or last is None:
        return Learning(
            True, None, now + period,
            f"learning: yes, no alerts until {format_duration(period)} of event time after "
            f"the first metadata call (none seen yet; if calls start now, until about "
            f"{_when(now + period)}); {SKIP_HINT}")
    ends = first + period
    wall = now + max(0.0, ends - last)
    return Learning(
        True, ends, wall,
        f"learning: yes, no alerts until event time {_when(ends)} (about {_when(wall)} by "
        f"the wall clock, {format_duration(max(0.0, ends - last))} from now); {SKIP_HINT}")


def summary_line(stats: AgentStats, probe: str | None, kernel: dict[str, int], held_back: int,
                 since: float, learning: Learning) -> str:
    """The periodic one-line summary (counts since the agent started)."""
    return (
        f"summary: {stats.events} events ({stats.scored} scored, {stats.skipped} skipped, "
        f"{stats.malformed} malformed, {stats.failed} failed), "
        f"{stats.alerts} alerts ({held_back} held back by the alert cap), "
        f"probe {probe or 'none'}, kernel drops {kernel.get('dropped', 0)} over "
        f"{format_duration(max(0.0, time.monotonic() - since))}; "
        + ("learning" if learning.learning else "not learning")
        + (f" until {_when(learning.ends_event_ts)}" if learning.learning
           and learning.ends_event_ts is not None else "")
    )
