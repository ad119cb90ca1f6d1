"""User names from a passwd file (the host's, mounted into the agent's container)."""

from __future__ import annotations

import os
import time


class PasswdNames:
    """uid -> name, re-read when the file changes (checked at most every `recheck` s)."""

    def __init__(self, path: str = "/etc/passwd", recheck: float = 5.0) -> None:
        self.path = path
        self.recheck = recheck
        self._names: dict[int, str] = {}
        self._mtime: float | None = None
        self._checked = 0.0

    def _load(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck and self._mtime is not None:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            self._names, self._mtime = {}, -1.0
            return
        if mtime == self._mtime:
            return
        names: dict[int, str] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split(":")
                    if len(parts) >= 3 and parts[2].isdigit():
                        names.setdefault(int(parts[2]), parts[0])
        except OSError:
            return
        self._names, self._mtime = names, mtime

    def name(self, uid: int) -> str | None:
        self._load()
        return self._names.get(uid)
