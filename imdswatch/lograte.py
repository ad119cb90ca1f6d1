"""Log rate limiting: no local user can flood the agent's log.

Everything the agent logs about an event is driven by what a local process does: a
malformed record, an event that makes scoring fail, a pod the API does not know. One line
(or one traceback) per event lets any user fill the node's disk and bury the lines that
matter. This filter, installed on the log handlers, lets each kind of line (same logger,
level and message template) through `burst` times per `period`; the rest are counted, and
the next line of that kind that gets through, or `flush()` (the agent's periodic summary),
says how many were suppressed. Memory is bounded by `max_keys` kinds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

BURST = 5
PERIOD = 60.0
MAX_KEYS = 1000


@dataclass
class _Kind:
    window_start: float
    passed: int = 0
    suppressed: int = 0


class RateLimitFilter(logging.Filter):
    def __init__(self, burst: int = BURST, period: float = PERIOD, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.period, self.max_keys = burst, period, max_keys
        self._clock = clock
        self._kinds: OrderedDict[tuple, _Kind] = OrderedDict()
        self._lock = threading.Lock()
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "rate_limit_report", False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                kind = _Kind(now)
                self._kinds[key] = kind
                while len(self._kinds) > self.max_keys:
                    self._kinds.popitem(last=False)
            self._kinds.move_to_end(key)
            if now - kind.window_start >= self.period:
                earlier = kind.suppressed
                kind.window_start, kind.passed, kind.suppressed = now, 0, 0
            else:
                earlier = 0
            if kind.passed >= self.burst:
                kind.suppressed += 1
                self.suppressed_total += 1
                return False
            kind.passed += 1
        if earlier:
            record.msg = f"{record.msg} [{earlier} similar lines suppressed before this one]"
        return True

    def flush(self, logger: logging.Logger) -> int:
        """Log one line per kind with suppressed lines in its current window; returns the
        number of suppressed lines reported."""
        with self._lock:
            pending = [(key, k.suppressed) for key, k in self._kinds.items() if k.suppressed]
            for key, _ in pending:
                self._kinds[key].suppressed = 0
        for (name, level, msg), n in pending:
            logger.log(level, "%d lines like this were suppressed (log rate limit, %d per "
                       "%.0fs): %s: %s", n, self.burst, self.period, name, msg[:200],
                       extra={"rate_limit_report": True})
        return sum(n for _, n in pending)


def install(burst: int = BURST, period: float = PERIOD) -> RateLimitFilter:
    """Attach one rate limit to every handler of the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        for f in handler.filters:
            if isinstance(f, RateLimitFilter):
                return f
    limiter = RateLimitFilter(burst, period)
    for handler in root.handlers:
        handler.addFilter(limiter)
    return limiter
