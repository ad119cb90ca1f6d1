"""A cap on alert lines per window of event time and per run, with one summary line.

An anomaly storm (a compromised image rolled out to every node, a scanner looping over
metadata paths) must not turn into an unbounded stream of alert lines that buries the SIEM
and the analyst. The Elastic rule this project replaces writes at most 100 alerts per
15-minute run (its `max_signals`); the same figures are the default here. Past the cap,
alerts are held back (counted, not written) until the window ends; then one summary alert
says how many were held back, from which detectors, and where every one of them is still
visible: the `imdswatch_anomalies_total` and `imdswatch_anomaly_score` metrics, which the cap
never touches. Windows follow event time, so a replay caps exactly as the live agent does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from exporters.timestamps import rfc3339_millis
from scoring.durations import format_duration

SUMMARY_RULE = "imdswatch alert cap reached"
SUMMARY_DETECTOR = "alert_cap"


class AlertCap:
    """Decides, alert by alert, whether a line may be written; builds the summaries.

    `max_per_window` / `max_per_run` of 0 mean no cap of that kind. `on_held(n)` is called
    for every alert held back (the agent counts them in a metric).
    """

    def __init__(self, max_per_window: int = 100, window: float = 900.0, max_per_run: int = 0,
                 on_held: Callable[[int], None] | None = None) -> None:
        if window <= 0:
            raise ValueError("the alert window must be longer than zero")
        self.max_per_window = max_per_window
        self.window = window
        self.max_per_run = max_per_run
        self.on_held = on_held
        self.written = 0
        self.held_total = 0
        self._start: float | None = None
        self._in_window = 0
        self._held = 0
        self._held_by: Counter[str] = Counter()
        self._held_first: float | None = None
        self._held_last: float | None = None

    def admit(self, ts: float, detector: str) -> tuple[bool, dict | None]:
        """(write this alert?, a summary line to write first, for a window that ended)."""
        summary = None
        if self._start is None or ts >= self._start + self.window:
            summary = self._close_window()
            self._start = ts
        full_window = 0 < self.max_per_window <= self._in_window
        full_run = 0 < self.max_per_run <= self.written
        if full_window or full_run:
            self._held += 1
            self.held_total += 1
            self._held_by[detector] += 1
            self._held_first = ts if self._held_first is None else min(self._held_first, ts)
            self._held_last = ts if self._held_last is None else max(self._held_last, ts)
            if self.on_held is not None:
                self.on_held(1)
            return False, summary
        self._in_window += 1
        self.written += 1
        return True, summary

    def snapshot(self) -> dict:
        """The cap's position (window, counts), for a scorer that checkpoints and re-scores
        after a restart (the fleet scorer): restored, it holds back the same lines again."""
        return {"start": self._start, "in_window": self._in_window, "written": self.written,
                "held": self._held, "held_total": self.held_total,
                "held_by": dict(self._held_by), "held_first": self._held_first,
                "held_last": self._held_last}

    def restore(self, snap: dict | None) -> None:
        """Undo of `snapshot`. Raises ValueError/TypeError on a malformed one."""
        if not snap:
            return
        def num(v: Any) -> float | None:
            return None if v is None else float(v)

        self._start = num(snap.get("start"))
        self._in_window = int(snap.get("in_window", 0))
        self.written = int(snap.get("written", 0))
        self._held = int(snap.get("held", 0))
        self.held_total = int(snap.get("held_total", 0))
        self._held_by = Counter({str(k): int(v) for k, v in (snap.get("held_by") or {}).items()})
        self._held_first = num(snap.get("held_first"))
        self._held_last = num(snap.get("held_last"))

    def flush(self, now: float | None = None) -> dict | None:
        """The summary of the current window if it has ended by `now` (event time), or,
        with `now` None (end of run), whatever it holds."""
        if self._start is None:
            return None
        if now is not None and now < self._start + self.window:
            return None
        summary = self._close_window()
        self._start = None
        return summary

    def _close_window(self) -> dict | None:
        held, by = self._held, self._held_by
        first, last, start = self._held_first, self._held_last, self._start
        self._in_window = self._held = 0
        self._held_by = Counter()
        self._held_first = self._held_last = None
        if not held or start is None:
            return None
        return self._summary(held, by, first or start, last or start)

    def _summary(self, held: int, by: Counter, first: float, last: float) -> dict:
        caps = []
        if self.max_per_window:
            caps.append(f"{self.max_per_window} per {format_duration(self.window)} "
                        "(alerts.max_per_window)")
        if self.max_per_run:
            caps.append(f"{self.max_per_run} per run (alerts.max_per_run)")
        detectors = ", ".join(f"{d} {n}" for d, n in by.most_common())
        reason = (
            f"{held} alert{'s' if held != 1 else ''} held back between {rfc3339_millis(first)} "
            f"and {rfc3339_millis(last)} because the alert-line cap of {' and '.join(caps)} "
            f"was reached ({detectors}); every anomaly is still counted in "
            "imdswatch_anomalies_total and shown in imdswatch_anomaly_score, and held-back "
            "lines in imdswatch_alerts_held_back_total"
        )
        doc: dict[str, Any] = {
            "@timestamp": rfc3339_millis(last),
            "event": {"kind": "alert"},
            "rule": {"name": SUMMARY_RULE},
            "anomaly": {"detector": SUMMARY_DETECTOR, "reason": reason},
            "imdswatch": {"alerts": {"held_back": held, "held_back_by_detector": dict(by)}},
        }
        return doc
