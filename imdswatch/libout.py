"""Capture what C libraries write straight to file descriptor 2, and say it in our words.

While the probe falls back from one attach mode to the next, libbpf and BCC print their own
lines on fd 2 (`bpf: Failed to load program: Operation not permitted`, `create_probe_event:
open(...): No such file or directory`): expected on a kernel without that mode, but they read
like failures and sit between the agent's log lines with no timestamp. `sys.stderr` cannot
catch them (they never pass through Python), so fd 2 itself is pointed at a temporary file
for the duration, while Python's own log lines keep going to the real standard error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator

MAX_KEPT = 200  # lines kept for the summary; a runaway library cannot grow memory


class Captured:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def summary(self, what: str) -> str | None:
        """One line: how many library lines `what` produced, the distinct ones counted."""
        if not self.lines:
            return None
        counts = Counter(self.lines)
        shown = "; ".join(f"{line!r}" + (f" x{n}" if n > 1 else "")
                          for line, n in counts.most_common(4))
        more = f"; and {len(counts) - 4} more" if len(counts) > 4 else ""
        return (f"{what}: the BPF libraries printed {len(self.lines)} line"
                f"{'s' if len(self.lines) != 1 else ''} (expected while unavailable attach "
                f"modes are tried): {shown}{more}")


def _stderr_handlers() -> list[logging.StreamHandler]:
    handlers = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            if isinstance(handler, logging.StreamHandler) and stream.fileno() == 2:
                handlers.append(handler)
        except (AttributeError, OSError, ValueError):
            continue
    return handlers


@contextlib.contextmanager
def capture_fd2() -> Iterator[Captured]:
    """Within the block, whatever is written to fd 2 (by C code or anyone else bypassing
    Python) is collected in `Captured.lines`; Python's log handlers and `sys.stderr` write
    to the original standard error meanwhile."""
    captured = Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 at all: nothing to protect
        yield captured
        return
    tmp = tempfile.TemporaryFile()
    original = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8",
                         errors="backslashreplace")
    handlers = _stderr_handlers()
    previous = [h.setStream(original) for h in handlers]
    old_stderr = sys.stderr
    sys.stderr = original
    os.dup2(tmp.fileno(), 2)
    try:
        yield captured
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = old_stderr
        for h, stream in zip(handlers, previous, strict=True):
            if stream is not None:
                h.setStream(stream)
        original.close()
        tmp.seek(0)
        data = tmp.read(1 << 20)
        tmp.close()
        text = data.decode("utf-8", "backslashreplace")
        captured.lines = [ln.strip() for ln in text.splitlines() if ln.strip()][:MAX_KEPT]
