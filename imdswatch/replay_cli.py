"""`imdswatch replay` as a process: the input, the alert output, the state and the signals
around `imdswatch.replay.replay`.

Whatever stops a replay (the end of the input, an input that fails midway, an alert output
that fails (a full disk, a closed pipe), SIGINT or SIGTERM), what was learnt is saved to
`--state` and the summary is printed; the exit status says how it ended: 0 done, 2 an
input, output or state problem (with one message naming it), 128+N stopped by signal N.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time

import click

from exporters.alertcap import AlertCap
from exporters.alerts import AlertWriter
from imdswatch.config import Config
from imdswatch.progress import Progress
from imdswatch.replay import ReplayStats, replay, summary
from intake.ndjson import InputError, Interrupt
from scoring.scorer import Outcome, Scorer
from scoring.state import StateError, load_state, save_state, state_lock


def _say(message: str) -> None:
    click.echo(f"imdswatch: {message}", err=True)


def _input_problem(events: str) -> str | None:
    """Why `events` cannot be read, checked before anything is loaded; FIFOs, character
    devices and process substitution (/dev/fd/N) are fine."""
    if events == "-":
        stdin = sys.stdin
        if stdin is None or getattr(stdin, "buffer", None) is None:
            return "standard input is closed"
        return None
    try:
        st = os.stat(events)
    except OSError as exc:
        return f"{events}: cannot open ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return f"{events}: is a directory"
    if not os.access(events, os.R_OK):
        return f"{events}: cannot open (permission denied)"
    return None


class _Alerts:
    """The alert writer; a failed write stops the replay (through `stop`) instead of
    raising through the scorer, and later alerts are counted as not written."""

    def __init__(self, output: str, stop: Interrupt, cap: AlertCap | None = None) -> None:
        self.stop = stop
        self.error: str | None = None
        self.lost = 0
        self.name = "standard output" if output == "-" else output
        if output == "-":
            stdout = sys.stdout
            if stdout is None or getattr(stdout, "buffer", None) is None:
                raise OSError(f"{self.name} is closed; give --output FILE")
            self.writer = AlertWriter(stdout.buffer, cap=cap)
            self.stdout = True
        else:
            try:
                self.writer = AlertWriter(output, append=False, cap=cap)
            except OSError as exc:
                raise OSError(f"{output}: cannot write alerts ({exc.strerror})") from None
            self.stdout = False

    def __call__(self, out: Outcome) -> None:
        if not out.alert:
            return
        if self.error is not None:
            self.lost += 1
            return
        try:
            self.writer.write(out)
        except OSError as exc:
            self._failed(exc)
            self.lost += 1

    def _failed(self, exc: OSError) -> None:
        self.error = f"{self.name}: cannot write alerts ({exc.strerror or exc})"
        if self.stdout:
            # Nothing more can reach a broken stdout; point it at /dev/null so the
            # interpreter's final flush does not print a second error.
            try:
                fd = os.open(os.devnull, os.O_WRONLY)
                os.dup2(fd, sys.stdout.fileno())
                os.close(fd)
            except (OSError, ValueError):
                pass
        self.stop.request()

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as exc:
            if self.error is None:
                self._failed(exc)


def run_replay(cfg: Config, events: str, output: str, state_path: str | None,
               reorder_window: float) -> int:
    """`imdswatch replay`; holds the state's lock from load to save (one writer per
    state: a second replay on it would lose this one's learning, or this one its)."""
    if not state_path:
        return _run(cfg, events, output, state_path, reorder_window)
    try:
        with state_lock(state_path):
            return _run(cfg, events, output, state_path, reorder_window)
    except StateError as exc:
        _say(str(exc))
        return 2


def _run(cfg: Config, events: str, output: str, state_path: str | None,
         reorder_window: float) -> int:
    problem = _input_problem(events)
    if problem:
        _say(problem)
        return 2
    scorer = Scorer(cfg.scorer, cfg.catalog, cfg.exceptions)
    if state_path and os.path.exists(state_path):
        try:
            load_state(state_path, scorer)
        except StateError as exc:
            _say(str(exc))
            return 2
    stop = Interrupt()
    a = cfg.alerts
    cap = AlertCap(a.max_per_window, a.window, a.max_per_run) if a.configured else None
    try:
        alerts = _Alerts(output, stop, cap)
    except OSError as exc:
        _say(str(exc))
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        stop.request(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stats = ReplayStats()
    failure: str | None = None
    # On a terminal only: lines, rate, share of the file and ETA, erased at the end.
    progress = Progress.for_stream(events)
    started = time.perf_counter()
    try:
        replay(events, scorer, alerts, stats=stats, reorder_window=reorder_window, stop=stop,
               wrap_lines=progress.wrap if progress else None)
    except InputError as exc:
        failure = str(exc)
    finally:
        if progress:
            progress.finish()
        for s, handler in previous.items():
            signal.signal(s, handler)
        alerts.close()
    elapsed = time.perf_counter() - started
    status = 0
    if state_path:
        try:
            save_state(state_path, scorer)
        except (OSError, StateError) as exc:
            _say(f"{state_path}: cannot save state ({getattr(exc, 'strerror', None) or exc})")
            status = 2
    click.echo(summary(stats, scorer, elapsed), err=True)
    if alerts.lost:
        click.echo(f"  alerts not written: {alerts.lost}", err=True)
    if cap is not None and cap.held_total:
        click.echo(f"  alert lines held back by the alert cap: {cap.held_total} (one summary "
                   "line per window in the output; alerts.max_per_window in the config)",
                   err=True)
    if failure is not None:
        _say(failure + (" (the state holds what was read before)" if state_path else ""))
        return 2
    if alerts.error is not None:
        _say(alerts.error)
        return 2
    if stats.interrupted:
        return 128 + stats.interrupted
    return status


