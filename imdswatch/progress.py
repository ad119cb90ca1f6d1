"""Progress of a long replay on a terminal: lines, rate, share of the file and ETA.

Shown only when standard error is a terminal, on one line rewritten in place and erased at
the end, so logs and pipes (`2> replay.log`, CI) get exactly what they got before. The
position comes from the kernel's own record of the input's file offset
(/proc/self/fdinfo), which for a .gz file is the compressed offset, matching the file size
the ETA is computed from: no extra work per line beyond a counter.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterator
from typing import TextIO

CHECK_EVERY = 4096  # lines between clock reads
DEFAULT_INTERVAL = 0.5


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, source: str, stream: TextIO, interval: float = DEFAULT_INTERVAL) -> None:
        self.source = source
        self.stream = stream
        self.interval = interval
        self.size, self._ino = self._target(source)
        self._fdinfo: str | None = None
        self._started = time.monotonic()
        self._shown = False

    @classmethod
    def for_stream(cls, source: str, stream: TextIO | None = None) -> Progress | None:
        """A progress display if `stream` (default stderr) is a terminal, else None."""
        stream = stream if stream is not None else sys.stderr
        try:
            if not stream.isatty():
                return None
        except (AttributeError, ValueError):
            return None
        interval = DEFAULT_INTERVAL
        try:
            interval = float(os.environ.get("IMDSWATCH_PROGRESS_INTERVAL", interval))
        except ValueError:
            pass
        return cls(source, stream, interval)

    @staticmethod
    def _target(source: str) -> tuple[int | None, tuple[int, int] | None]:
        try:
            st = os.fstat(0) if source == "-" else os.stat(source)
        except OSError:
            return None, None
        if not stat.S_ISREG(st.st_mode):
            return None, None  # a pipe or FIFO has no size to count down
        return st.st_size, (st.st_dev, st.st_ino)

    def _position(self) -> int | None:
        """The input's file offset, from the fd that has it open."""
        if self._ino is None:
            return None
        if self._fdinfo is None:
            for fd in os.listdir("/proc/self/fd"):
                try:
                    st = os.stat(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == self._ino:
                    self._fdinfo = f"/proc/self/fdinfo/{fd}"
                    break
            else:
                return None
        try:
            with open(self._fdinfo) as fh:
                for line in fh:
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            self._fdinfo = None
        return None

    def wrap(self, lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        count = 0
        next_check = CHECK_EVERY
        next_show = self._started + self.interval
        for item in lines:
            count += 1
            if count >= next_check:
                next_check = count + CHECK_EVERY
                now = time.monotonic()
                if now >= next_show:
                    next_show = now + self.interval
                    self.show(item[0], now)
            yield item

    def show(self, lineno: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._started, 1e-6)
        text = f"replay: {lineno:,} lines, {lineno / elapsed:,.0f} lines/s"
        pos = self._position()
        if pos is not None and self.size:
            share = min(pos / self.size, 1.0)
            text += f", {share:.0%} of {_human(self.size)}"
            if share > 0:
                text += f", ETA {_clock(elapsed * (1 - share) / share)}"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        """Erase the progress line, so the summary starts on a clean line. Always: the
        replay's reading process shows it, from its own copy of this object (on a
        terminal, erasing a line nothing was written on changes nothing)."""
        self.stream.write("\r\x1b[K")
        self.stream.flush()
        self._shown = False
