"""The event record every part of imdswatch shares, and its reading from ECS.

Live events (the tracer) and replayed events (ECS NDJSON) both become `Event`s through
`event_from_ecs`, so the two paths score identically. The original ECS document rides
along in `doc` so alerts can copy its fields without a second serialisation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson


class MalformedEvent(ValueError):
    """A document that is JSON but not a usable event; the message says why."""


class Event:
    """One connection attempt to (possibly) a metadata endpoint, at event time `ts`."""

    __slots__ = (
        "ts", "dst_ip", "dst_port", "name", "pid", "exe", "command_line", "ppid",
        "parent_name", "parent_exe", "user", "uid", "host", "container_id", "image",
        "namespace", "pod", "cloud", "event_id", "action", "method", "path", "query",
        "user_agent", "guarded", "thread_name", "_doc", "_raw",
    )

    def __init__(
        self,
        ts: float,
        dst_ip: str,
        name: str,
        *,
        dst_port: int | None = None,
        pid: int | None = None,
        exe: str | None = None,
        command_line: str | None = None,
        ppid: int | None = None,
        parent_name: str | None = None,
        parent_exe: str | None = None,
        user: str | None = None,
        uid: str | None = None,
        host: str | None = None,
        container_id: str | None = None,
        image: str | None = None,
        namespace: str | None = None,
        pod: str | None = None,
        cloud: str | None = None,
        event_id: str | None = None,
        action: str | None = None,
        method: str | None = None,
        path: str | None = None,
        query: str | None = None,
        user_agent: str | None = None,
        guarded: bool | None = None,
        thread_name: str | None = None,
        doc: dict | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.ts = ts
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.name = name
        self.pid = pid
        self.exe = exe
        self.command_line = command_line
        self.ppid = ppid
        self.parent_name = parent_name
        self.parent_exe = parent_exe
        self.user = user
        self.uid = uid
        self.host = host
        self.container_id = container_id
        self.image = image
        self.namespace = namespace
        self.pod = pod
        self.cloud = cloud
        self.event_id = event_id
        # The HTTP request on the connection (contract section 1); all None for a
        # connection whose request was not seen.
        self.action = action
        self.method = method
        self.path = path
        self.query = query
        self.user_agent = user_agent
        self.guarded = guarded
        # The calling thread's own name when it differs from the process's (io_uring
        # workers, JVM threads); `name` is always the thread-group leader's.
        self.thread_name = thread_name
        self._doc = doc
        self._raw = raw

    @property
    def doc(self) -> dict | None:
        """The ECS document the event came from. Replay keeps only the raw line and
        decodes it here, when an alert needs its fields: most events never do."""
        if self._doc is None and self._raw is not None:
            self._doc = orjson.loads(self._raw)
        return self._doc

    @property
    def is_request(self) -> bool:
        """True when the event carries an HTTP request (method or path seen)."""
        return self.method is not None or self.path is not None

    def signature(self) -> tuple:
        """Everything the detectors look at, apart from time: events with equal
        signatures are the same entity to the model."""
        sig = (self.name, self.exe, self.user, self.parent_name, self.image,
               self.namespace, self.host)
        if self.method is None and self.path is None:
            return sig
        # A request is judged on what it asks too (scoring.detectors): two requests of
        # one caller that ask different things are different entities.
        return (*sig, self.method, self.path, self.query, self.guarded, self.user_agent)

    def __repr__(self) -> str:
        return (
            f"Event(ts={self.ts}, name={self.name!r}, exe={self.exe!r}, user={self.user!r}, "
            f"dst={self.dst_ip}:{self.dst_port}, host={self.host!r})"
        )


def parse_timestamp(value: Any) -> float:
    """RFC 3339 string, or epoch seconds or milliseconds, to epoch seconds."""
    if isinstance(value, bool):
        raise MalformedEvent("@timestamp is a boolean")
    if isinstance(value, int | float):
        # Epoch milliseconds are 13 digits until the year 2286; seconds are 10.
        return value / 1000.0 if abs(value) >= 1e11 else float(value)
    if isinstance(value, str):
        try:
            # RFC 3339 allows lower-case t and z; fromisoformat does not.
            dt = datetime.fromisoformat(value.upper() if "t" in value or "z" in value
                                        else value)
        except ValueError:
            try:
                return parse_timestamp(float(value))
            except ValueError:
                raise MalformedEvent(f"@timestamp {value[:40]!r} is not RFC 3339") from None
        if dt.tzinfo is None:
            raise MalformedEvent(f"@timestamp {value[:40]!r} has no time zone")
        return dt.timestamp()
    raise MalformedEvent("@timestamp is missing or not a string or number")


def unflatten(doc: dict) -> dict:
    """Turn dotted keys ("process.name": x) into nested objects; Kibana CSV-to-JSON and
    some exporters write ECS that way."""
    out: dict = {}
    for key, value in doc.items():
        node = out
        parts = key.split(".") if key != "@timestamp" else [key]
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    return out


def _obj(doc: dict, key: str) -> dict:
    v = doc.get(key)
    return v if isinstance(v, dict) else _EMPTY


_EMPTY: dict = {}


def _str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v or None
    if isinstance(v, list):  # ECS allows arrays; the first value is the primary one
        return _str(v[0]) if v else None
    return str(v)


def _int(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    raise MalformedEvent(f"{what} {v!r} is not an integer")


def _bool(v: Any, what: str) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise MalformedEvent(f"{what} {v!r} is not a boolean")


def event_from_ecs(doc: Any) -> Event:
    """Read the contract's ECS fields from a decoded JSON document."""
    if not isinstance(doc, dict):
        raise MalformedEvent("line is not a JSON object")
    if any("." in k for k in doc if k != "@timestamp"):
        doc = unflatten(doc)
    ts = parse_timestamp(doc.get("@timestamp"))
    destination = _obj(doc, "destination")
    dst_ip = _str(destination.get("ip"))
    if not dst_ip:
        raise MalformedEvent("destination.ip is missing")
    process = _obj(doc, "process")
    name = _str(process.get("name"))
    if not name:
        raise MalformedEvent("process.name is missing")
    parent = _obj(process, "parent")
    user = _obj(doc, "user")
    host = _obj(doc, "host")
    container = _obj(doc, "container")
    orchestrator = _obj(doc, "orchestrator")
    event_meta = _obj(doc, "event")
    http = _obj(doc, "http")
    url = _obj(doc, "url")
    return Event(
        ts,
        dst_ip,
        name,
        dst_port=_int(destination.get("port"), "destination.port"),
        pid=_int(process.get("pid"), "process.pid"),
        exe=_str(process.get("executable")),
        command_line=_str(process.get("command_line")),
        ppid=_int(parent.get("pid"), "process.parent.pid"),
        parent_name=_str(parent.get("name")),
        parent_exe=_str(parent.get("executable")),
        user=_str(user.get("name")),
        uid=_str(user.get("id")),
        host=_str(host.get("name")) or _str(host.get("id")),
        container_id=_str(container.get("id")),
        image=_str(_obj(container, "image").get("name")),
        namespace=_str(orchestrator.get("namespace")),
        pod=_str(_obj(orchestrator, "resource").get("name")),
        cloud=_str(_obj(doc, "cloud").get("provider")),
        event_id=_str(event_meta.get("id")),
        action=_str(event_meta.get("action")),
        method=_str(_obj(http, "request").get("method")),
        path=_str(url.get("path")),
        query=_str(url.get("query")),
        user_agent=_str(_obj(doc, "user_agent").get("original")),
        guarded=_bool(_obj(_obj(doc, "imdswatch"), "request").get("guarded"),
                      "imdswatch.request.guarded"),
        thread_name=_str(_obj(process, "thread").get("name")),
        doc=doc,
    )


def typed_head(d: Any) -> tuple[float, str, int | None, tuple] | None:
    """(time, destination ip, port, signature) of a `scoring.ecs_schema.EcsDoc`: all the
    scorer needs for an event of a common entity. None when the document needs the
    generic path (`event_from_ecs`) to be read or to say what is wrong with it."""
    ts = d.timestamp
    if ts is None:
        return None
    if ts.__class__ is float:
        if ts >= 1e11 or ts <= -1e11:
            ts = ts / 1000.0
    elif ts.tzinfo is None:
        return None
    else:
        ts = ts.timestamp()
    dst = d.destination
    p = d.process
    if dst is None or p is None or not dst.ip or not p.name:
        return None
    if d.http or d.url or d.user_agent or d.imdswatch or p.thread:  # Raw: empty if absent
        return None
    parent = p.parent
    user = d.user
    host = d.host
    c = d.container
    o = d.orchestrator
    image = c.image if c is not None else None
    # Same order and normalisation (empty string -> None) as Event.signature().
    sig = (
        p.name,
        p.executable or None,
        (user.name or None) if user is not None else None,
        (parent.name or None) if parent is not None else None,
        (image.name or None) if image is not None else None,
        (o.namespace or None) if o is not None else None,
        (host.name or host.id or None) if host is not None else None,
    )
    return ts, dst.ip, dst.port, sig


def event_from_typed(d: Any, raw: bytes, head: tuple[float, str, int | None, tuple]) -> Event:
    """The full `Event` of a document whose `typed_head` is `head`."""
    ts, ip, port, (name, exe, user_name, parent_name, image, namespace, host) = head
    p = d.process
    parent = p.parent
    user = d.user
    c = d.container
    o = d.orchestrator
    resource = o.resource if o is not None else None
    uid = user.id if user is not None else None
    return Event(
        ts, ip, name,
        dst_port=port,
        pid=p.pid,
        exe=exe,
        command_line=p.command_line,
        ppid=parent.pid if parent is not None else None,
        parent_name=parent_name,
        parent_exe=parent.executable if parent is not None else None,
        user=user_name,
        uid=str(uid) if uid is not None else None,
        host=host,
        container_id=c.id if c is not None else None,
        image=image,
        namespace=namespace,
        pod=resource.name if resource is not None else None,
        cloud=d.cloud.provider if d.cloud is not None else None,
        event_id=d.event.id if d.event is not None else None,
        action=d.event.action if d.event is not None else None,
        raw=raw,
    )
