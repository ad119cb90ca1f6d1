# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Inline test data: a small, deterministic fleet of periodic metadata callers.

`fleet_events` builds the habits of a Kubernetes fleet (cloud agents on every node, a
health-check cron, an application in a container) as `scoring.events.Event`s; `to_ecs`
turns any event into the contract's ECS document so the same data can be replayed through
the CLI. Nothing here depends on bench/.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from scoring.events import Event

T0 = 1_714_521_600.0  # 2024-05-01T00:00:00Z
MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
IMDS = "169.254.169.254"


@dataclass(frozen=True)
class Agent:
    name: str
    exe: str
    user: str
    parent: str
    period: float
    image: str | None = None
    namespace: str | None = None
    dst_ip: str = IMDS
    dst_port: int = 80


# Every node of the fleet runs these, forever, on a timer.
FLEET_AGENTS: tuple[Agent, ...] = (
    Agent("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root", "systemd", 5 * MINUTE),
    Agent("kubelet", "/usr/bin/kubelet", "root", "systemd", 10 * MINUTE),
    Agent("aws-k8s-agent", "/app/aws-k8s-agent", "root", "containerd-shim", 10 * MINUTE,
          image="602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni:v1.18.1",
          namespace="kube-system"),
    # A cron health check run by ec2-user from a login shell.
    Agent("curl", "/usr/bin/curl", "ec2-user", "bash", 10 * MINUTE),
    # An application container that reads its IAM role credentials.
    Agent("python3", "/usr/bin/python3", "app", "supervisord", 10 * MINUTE,
          image="registry.local/shop/api:2.3.1", namespace="shop"),
    # A node exporter sidecar running as www-data, so www-data is a known fleet user.
    Agent("node-probe", "/usr/local/bin/node-probe", "www-data", "runsv", 30 * MINUTE),
    # Operators run the AWS CLI under their own accounts: a process with many users.
    *(Agent("aws", "/usr/local/bin/aws", user, "bash", 2 * HOUR)
      for user in ("alice", "bob", "carol", "dave", "erin", "frank")),
)


def ev(
    ts: float,
    name: str,
    *,
    exe: str | None = None,
    user: str | None = "root",
    parent: str | None = "bash",
    host: str | None = "node-0",
    image: str | None = None,
    namespace: str | None = None,
    dst_ip: str = IMDS,
    dst_port: int | None = 80,
    command_line: str | None = None,
    event_id: str | None = None,
    pid: int | None = None,
) -> Event:
    """One metadata call as the tracer would report it."""
    return Event(
        ts, dst_ip, name,
        dst_port=dst_port, exe=exe if exe is not None else f"/usr/bin/{name}",
        user=user, parent_name=parent, host=host, image=image, namespace=namespace,
        command_line=command_line, event_id=event_id, pid=pid,
        container_id=("c0ffee" + name) if image else None,
    )


def stripped(e: Event, fields: tuple[str, ...] | list[str]) -> Event:
    """A copy of `e` without `fields` (as an export that lost them has it)."""
    out = Event(e.ts, e.dst_ip, e.name, e.dst_port, e.pid, e.exe, e.command_line, e.ppid,
                e.parent_name, e.parent_exe, e.user, e.uid, e.host, e.container_id, e.image,
                e.namespace, e.pod, e.cloud, e.event_id, e.action, e.method, e.path,
                e.query, e.user_agent, e.guarded)
    for f in fields:
        setattr(out, f, None)
    return out


def agent_event(agent: Agent, ts: float, host: str) -> Event:
    return ev(ts, agent.name, exe=agent.exe, user=agent.user, parent=agent.parent, host=host,
              image=agent.image, namespace=agent.namespace, dst_ip=agent.dst_ip,
              dst_port=agent.dst_port)


def fleet_events(
    hosts: int = 8,
    days: float = 2.0,
    start: float = T0,
    agents: tuple[Agent, ...] = FLEET_AGENTS,
    host_prefix: str = "node-",
    first_host: int = 0,
) -> list[Event]:
    """Every agent on every host, on its period, with deterministic per-host phase; sorted."""
    out: list[Event] = []
    end = start + days * DAY
    for h in range(first_host, first_host + hosts):
        host = f"{host_prefix}{h}"
        for a_i, agent in enumerate(agents):
            t = start + (h * 13 + a_i * 7) % agent.period
            while t < end:
                out.append(agent_event(agent, t, host))
                t += agent.period
    out.sort(key=lambda e: e.ts)
    return out


def rfc3339(ts: float) -> str:
    """Epoch seconds to RFC 3339 with milliseconds, rounded to the nearest millisecond."""
    ms = round(ts * 1000)
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def unique_times(events: list[Event]) -> list[Event]:
    """Sort, then nudge equal times 1 ms apart so event-time order is unambiguous."""
    events.sort(key=lambda e: e.ts)
    last = None
    for e in events:
        e.ts = round(e.ts, 3)
        if last is not None and e.ts <= last:
            e.ts = round(last + 0.001, 3)
        last = e.ts
    return events


def to_ecs(e: Event, *, extra: dict | None = None) -> dict:
    """The contract §1 ECS document for `e` (nested, as Elastic exports it)."""
    process: dict = {"name": e.name}
    if e.pid is not None:
        process["pid"] = e.pid
    if e.exe is not None:
        process["executable"] = e.exe
    if e.command_line is not None:
        process["command_line"] = e.command_line
    if e.parent_name is not None:
        process["parent"] = {"name": e.parent_name}
    doc: dict = {
        "@timestamp": rfc3339(e.ts),
        "destination": {"ip": e.dst_ip},
        "process": process,
    }
    if e.dst_port is not None:
        doc["destination"]["port"] = e.dst_port
    if e.user is not None:
        doc["user"] = {"name": e.user}
    if e.host is not None:
        doc["host"] = {"name": e.host}
    if e.image is not None or e.container_id is not None:
        doc["container"] = {"id": e.container_id, "image": {"name": e.image}}
    if e.namespace is not None:
        doc["orchestrator"] = {"namespace": e.namespace, "resource": {"name": f"{e.name}-pod"}}
    if e.event_id is not None:
        doc["event"] = {"id": e.event_id}
    if extra:
        doc.update(extra)
    return doc


def ndjson_bytes(docs: list[dict]) -> bytes:
    return b"".join(orjson.dumps(d) + b"\n" for d in docs)


def write_ndjson(path: Path, docs: list[dict]) -> Path:
    data = ndjson_bytes(docs)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path
