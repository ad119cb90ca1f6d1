"""Container and Kubernetes pod identity from a process's cgroup path.

Paths as written by the common runtimes (cgroup v1 and v2, systemd and cgroupfs drivers):
  docker      /docker/<id>, /system.slice/docker-<id>.scope
  containerd  /kubepods/burstable/pod<uid>/<id>,
              .../kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
  cri-o       .../crio-<id>.scope, /kubepods/.../pod<uid>/crio-<id>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ID = r"([0-9a-f]{64})"
_RUNTIMES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("docker", re.compile(rf"(?:/docker/|docker-){_ID}(?:\.scope)?(?:/|$)")),
    ("containerd", re.compile(rf"cri-containerd-{_ID}(?:\.scope)?(?:/|$)")),
    ("cri-o", re.compile(rf"crio-{_ID}(?:\.scope)?(?:/|$)")),
    ("containerd", re.compile(rf"/kubepods[^\n]*/{_ID}(?:/|$)")),  # cgroupfs driver: bare id
)
_POD = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)


@dataclass(frozen=True, slots=True)
class CgroupIdentity:
    container_id: str | None = None
    runtime: str | None = None
    pod_uid: str | None = None


def identify(cgroup_text: str) -> CgroupIdentity:
    """Read /proc/<pid>/cgroup text; the first container id found wins."""
    container_id = runtime = pod_uid = None
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        if container_id is None:
            for name, pattern in _RUNTIMES:
                m = pattern.search(path)
                if m:
                    container_id, runtime = m.group(1), name
                    break
        if pod_uid is None:
            m = _POD.search(path)
            if m:
                pod_uid = m.group(1).replace("_", "-")  # the systemd driver writes underscores
    return CgroupIdentity(container_id, runtime, pod_uid)
