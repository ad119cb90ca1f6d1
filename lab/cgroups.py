"""Removing the cgroups a test or a lab run made for its own processes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def remove_cgroups(dirs: Iterable[Path], tries: int = 50, pause: float = 0.1) -> list[Path]:
    """Empty (their processes killed) and remove `dirs`, in the order given (deepest
    first); retried, since an exited member leaves its cgroup a moment later. Returns
    those still there."""
    left = []
    for d in dirs:
        for _ in range(tries):
            try:
                for pid in (d / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(pause)
        if d.exists():
            left.append(d)
    return left
