"""The log rate limit: a flood of one kind of line (a warning per malformed event, a
traceback per failing one) is cut to a burst per period with a count of what was dropped."""

import logging
import subprocess
import sys
from pathlib import Path

from imdswatch.lograte import RateLimitFilter

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make_logger(limit: RateLimitFilter) -> tuple[logging.Logger, list[str]]:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    handler.addFilter(limit)
    logger = logging.getLogger(f"test.lograte.{id(limit)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger, records


def test_flood_is_cut_to_a_burst_and_counted() -> None:
    clock = Clock()
    limit = RateLimitFilter(burst=3, period=60, clock=clock)
    logger, records = make_logger(limit)
    for i in range(10_000):
        logger.warning("unusable event from the tracer: %s", f"bad {i}")
    logger.info("a different line")
    assert len(records) == 4
    assert limit.suppressed_total == 9_997
    assert limit.flush(logger) == 9_997
    assert "9997 lines like this were suppressed" in records[-1]
    assert "unusable event from the tracer" in records[-1]
    # The next period lets the kind through again.
    clock.now = 61
    logger.warning("unusable event from the tracer: %s", "again")
    assert records[-1] == "unusable event from the tracer: again"


def test_count_rides_on_the_next_line_of_the_kind() -> None:
    clock = Clock()
    limit = RateLimitFilter(burst=1, period=10, clock=clock)
    logger, records = make_logger(limit)
    for _ in range(5):
        logger.error("scoring an event failed")
    clock.now = 11
    logger.error("scoring an event failed")
    assert records == ["scoring an event failed",
                       "scoring an event failed [4 similar lines suppressed before this one]"]


def test_kinds_are_bounded() -> None:
    limit = RateLimitFilter(burst=1, period=60, max_keys=10, clock=Clock())
    logger, _ = make_logger(limit)
    for i in range(1000):
        logger.warning(f"distinct template {i}")  # noqa: G004 - the point of the test
    assert len(limit._kinds) == 10


def test_tracebacks_per_failing_event_are_rate_limited_in_the_agent_log() -> None:
    # The agent's own logging set-up, a real traceback per event, a real stderr.
    code = """
import logging
from imdswatch.agent import _setup_logging
from imdswatch import lograte
_setup_logging()
lograte.install()
log = logging.getLogger("imdswatch.agent")
for i in range(2000):
    try:
        raise ZeroDivisionError(i)
    except ZeroDivisionError:
        log.exception("scoring an event failed; the event is skipped")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Traceback") == 5
    assert r.stderr.count("scoring an event failed") == 5
