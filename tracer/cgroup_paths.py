"""A cgroup v2 id (what the kernel puts in every event: the inode number of the cgroup's
directory) to that cgroup's path, for container attribution without the process's /proc
entry: a container's cgroup outlives a process that called and exited at once. Scans of the
cgroup tree are bounded in size and in rate; answers come from memory."""

from __future__ import annotations

import os
import time

from tracer.cgroups import CgroupIdentity, identify

MAX_DIRECTORIES = 200_000
RESCAN_SECONDS = 1.0


class CgroupPaths:
    def __init__(self, root: str | None) -> None:
        """`root`: the cgroup v2 mount (None: no resolution, every lookup answers None)."""
        self.root = root.rstrip("/") if root else None
        self._paths: dict[int, str] = {}
        self._scanned = -RESCAN_SECONDS

    def _scan(self) -> None:
        paths: dict[int, str] = {}
        assert self.root is not None
        stack = [self.root]
        while stack and len(paths) < MAX_DIRECTORIES:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                paths[os.stat(d).st_ino] = d[len(self.root):] or "/"
            except OSError:
                continue  # removed meanwhile
        self._paths = paths

    def path(self, cgroup_id: int) -> str | None:
        """The cgroup's path below the root ("/system.slice/x.scope"), or None."""
        if self.root is None or not cgroup_id:
            return None
        found = self._paths.get(cgroup_id)
        now = time.monotonic()
        if found is None and now - self._scanned >= RESCAN_SECONDS:
            self._scanned = now
            self._scan()
            found = self._paths.get(cgroup_id)
        return found

    def identity(self, cgroup_id: int) -> CgroupIdentity | None:
        """Container and pod of the cgroup, as /proc/PID/cgroup would give them; None when
        the id is not found (the cgroup is gone, or lies outside the mount we see)."""
        p = self.path(cgroup_id)
        return identify(f"0::{p}\n") if p is not None else None
