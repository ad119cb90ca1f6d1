"""Building the ECS documents of the scenario, and writing them fast.

A scenario has a few thousand distinct "shapes" of event (one per process instance on a
host) and hundreds of thousands of events. Each shape is serialised once to a JSON
fragment; an event is then only its timestamp, its id and the index of its shape, and
writing a line is a byte concatenation. This keeps a full-scale scenario (≈500k lines)
to a few seconds and a few tens of MB.
"""

from __future__ import annotations

import gzip
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

COMM_LEN = 15  # Linux TASK_COMM_LEN is 16 including the NUL


def comm(name: str) -> str:
    """The kernel's view of a process name: at most 15 bytes."""
    return name.encode()[:COMM_LEN].decode(errors="ignore")


def container_id(*parts: object) -> str:
    """A stable 64-hex container id derived from what identifies the container."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


@dataclass(frozen=True)
class Host:
    """One Kubernetes node of the fleet."""

    name: str
    id: str
    cloud: str  # aws | gcp | azure
    region: str
    cluster: str
    join_ts: float  # when the node booted (≤ scenario start for the initial fleet)
    initial: bool


@dataclass(frozen=True)
class Proc:
    """What the tracer would report about a process (before truncation to comm)."""

    name: str
    exe: str
    user: str
    uid: str
    parent_name: str
    parent_exe: str
    command_line: str
    pid: int
    ppid: int


@dataclass(frozen=True)
class Req:
    """The HTTP request a call sends (contract section 1); `guarded` is whether it carries
    the service's anti-SSRF header (None: the service has none, e.g. WireServer)."""

    method: str
    path: str
    query: str | None = None
    ua: str | None = None
    guarded: bool | None = True


@dataclass(frozen=True)
class Pod:
    """The container a process runs in, when it runs in one."""

    namespace: str
    pod: str
    image: str
    cid: str


def shape(
    host: Host,
    proc: Proc,
    dst_ip: str,
    dst_port: int,
    truth: str,
    actor: str,
    pod: Pod | None = None,
    transport: str = "tcp",
    request: Req | None = None,
) -> dict:
    """The static part of an event: everything but @timestamp and event.id (and
    event.action, which `Trace` writes from the presence of `http`)."""
    doc: dict = {
        "destination": {"ip": dst_ip, "port": dst_port},
        "network": {"transport": transport, "direction": "egress"},
        "process": {
            "name": comm(proc.name),
            "pid": proc.pid,
            "executable": proc.exe,
            "command_line": proc.command_line,
            "parent": {"name": comm(proc.parent_name), "pid": proc.ppid,
                       "executable": proc.parent_exe},
        },
        "user": {"name": proc.user, "id": proc.uid},
        "host": {"name": host.name, "id": host.id, "os": {"type": "linux"}},
        "cloud": {"provider": host.cloud, "region": host.region},
        "labels": {"imdswatch_truth": truth, "imdswatch_actor": actor},
    }
    if pod is not None:
        doc["container"] = {"id": pod.cid, "image": {"name": pod.image}, "runtime": "containerd"}
        doc["orchestrator"] = {
            "type": "kubernetes",
            "namespace": pod.namespace,
            "resource": {"name": pod.pod, "type": "pod"},
            "cluster": {"name": host.cluster},
        }
    if request is not None:
        doc["http"] = {"request": {"method": request.method}}
        doc["url"] = {"path": request.path}
        if request.query:
            doc["url"]["query"] = request.query
        if request.ua:
            doc["user_agent"] = {"original": request.ua}
        if request.guarded is not None:
            doc["imdswatch"] = {"request": {"guarded": request.guarded}}
    return doc


@dataclass
class Trace:
    """Shapes and (time, shape) pairs, rendered to NDJSON in event-time order."""

    shapes: list[bytes] = field(default_factory=list)
    shape_docs: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    refs: list[int] = field(default_factory=list)

    def add_shape(self, doc: dict) -> int:
        self.shape_docs.append(doc)
        # Drop the leading "{" so the line prefix (timestamp, event) can be spliced in.
        self.shapes.append(orjson.dumps(doc)[1:])
        return len(self.shapes) - 1

    def emit(self, ts: float, shape_id: int) -> None:
        self.times.append(ts)
        self.refs.append(shape_id)

    def emit_many(self, times: Iterable[float], shape_id: int) -> None:
        for ts in times:
            self.times.append(ts)
            self.refs.append(shape_id)

    def __len__(self) -> int:
        return len(self.times)

    def order(self) -> list[int]:
        """Event indices in event-time order (stable, so bursts keep their order)."""
        times = self.times
        return sorted(range(len(times)), key=times.__getitem__)

    def lines(self, id_prefix: str, labels: bool = True, limit: int | None = None
              ) -> Iterable[bytes]:
        """The NDJSON lines, in event-time order; `labels=False` strips the truth and
        `limit` keeps only the first lines."""
        shapes = self.shapes if labels else [_strip_labels(d) for d in self.shape_docs]
        times, refs = self.times, self.refs
        actions = [_HTTP if "http" in d else _CONNECT for d in self.shape_docs]
        for n, i in enumerate(self.order()[:limit]):
            ref = refs[i]
            yield b"".join((
                b'{"@timestamp":"', rfc3339(times[i]).encode(),
                b'","event":{"id":"', f"{id_prefix}-{n:07d}".encode(),
                actions[ref], shapes[ref], b"\n",
            ))

    def write(self, path: Path, id_prefix: str, labels: bool = True,
              limit: int | None = None) -> int:
        """Write plain or gzip NDJSON (by suffix); returns the number of lines."""
        n = 0
        with _open(path) as out:
            buf: list[bytes] = []
            for line in self.lines(id_prefix, labels, limit):
                buf.append(line)
                if len(buf) >= 4096:
                    out.write(b"".join(buf))
                    n += len(buf)
                    buf.clear()
            out.write(b"".join(buf))
            n += len(buf)
        return n


_CONNECT = (b'","kind":"event","category":["network"],"type":["start"],'
            b'"action":"connection_attempted"},')
_HTTP = (b'","kind":"event","category":["network"],"type":["protocol"],'
         b'"action":"http_request"},')


def _strip_labels(doc: dict) -> bytes:
    return orjson.dumps({k: v for k, v in doc.items() if k != "labels"})[1:]


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        # Level 1: the bench writes 500k-line traces often; size matters little.
        return gzip.open(path, "wb", compresslevel=1)
    return open(path, "wb")


def rfc3339(ts: float) -> str:
    """UTC RFC 3339 with milliseconds, e.g. 2026-03-02T10:00:00.123Z."""
    whole = int(ts)
    ms = int(round((ts - whole) * 1000))
    if ms == 1000:
        whole, ms = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"
