"""The one reader of ECS documents: from a typed document to the Event the model scores.

Live documents (the tracer's dicts) and replayed lines (ECS NDJSON bytes) go through the
same schema (`intake.ecs_schema`) and the same rules (`read_doc`), so both paths accept,
refuse and score exactly alike.

Rules beyond the schema's types:
- `@timestamp`: RFC 3339 with a zone, or epoch seconds, milliseconds, microseconds or
  nanoseconds (told apart by magnitude), finite and within 2000-2100; anything else is
  malformed, so a `nan` or year-9999 time never reaches the reorder buffer or the decay.
- `process.name` is required; an empty string is a value (a process may rename itself to
  "" with prctl), not an absence. Other empty strings are treated as absent.
- Only connection starts and HTTP requests are calls (`is_call`): connection ends and
  inbound connections in an export are counted and skipped, never scored twice.
- Strings longer than `MAX_FIELD_CHARS` are cut to it, so no field can grow the model.
- A field `imdswatch.identity.missing` lists (contract section 6) is absent whatever the
  document holds in its place: the agent says it could not establish it, so a placeholder
  never becomes a value the model judges.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from intake.ecs_schema import EcsDoc, convert
from scoring.events import Event


class MalformedEvent(ValueError):
    """A document that is JSON but not a usable event; the message says why, `kind` is
    a short category for the replay summary's count by reason."""

    def __init__(self, message: str, kind: str = "invalid field") -> None:
        super().__init__(message)
        self.kind = kind


# -- time --------------------------------------------------------------------------------

# Event times outside [2000, 2100) are refused: no real metadata call happened before
# 2000, and a bounded spread of times keeps every decay computation finite.
MIN_TS = 946684800.0  # 2000-01-01T00:00:00Z
MAX_TS = 4102444800.0  # 2100-01-01T00:00:00Z


def _epoch(value: float, text: Any) -> float:
    """Epoch seconds of a number in seconds, ms, µs or ns. Within 2000-2100 these units
    occupy disjoint magnitude bands (1e9, 1e12, 1e15, 1e18), so the unit is never guessed
    wrong for a valid time."""
    if not math.isfinite(value):
        raise MalformedEvent(f"@timestamp {text!r} is not a finite time", "bad @timestamp")
    a = abs(value)
    if a < 1e11:
        ts = float(value)
    elif a < 1e14:
        ts = value / 1e3
    elif a < 1e17:
        ts = value / 1e6
    else:
        ts = value / 1e9
    if not MIN_TS <= ts < MAX_TS:
        raise MalformedEvent(f"@timestamp {text!r} is outside 2000-2100", "bad @timestamp")
    return ts


# The last time string read and its value, as one tuple: rebinding it is atomic, so a
# second thread never pairs one string with another's time.
_last: tuple[str | None, float] = (None, 0.0)


def _parse_text(value: str) -> float:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        try:  # RFC 3339 allows lower-case t and z; fromisoformat does not
            dt = datetime.fromisoformat(value.upper())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise MalformedEvent(f"@timestamp {value[:40]!r} is not RFC 3339",
                                     "bad @timestamp") from None
            return _epoch(number, value[:40])
    if dt.tzinfo is None:
        raise MalformedEvent(f"@timestamp {value[:40]!r} has no time zone", "bad @timestamp")
    ts = dt.timestamp()
    if not MIN_TS <= ts < MAX_TS:
        raise MalformedEvent(f"@timestamp {value[:40]!r} is outside 2000-2100",
                             "bad @timestamp")
    return ts


def parse_timestamp(value: Any) -> float:
    """RFC 3339 string, or an epoch number (or decimal string) in s/ms/µs/ns, to epoch
    seconds within 2000-2100. Raises MalformedEvent."""
    if value.__class__ is str:
        # Sorted exports repeat a time string for every event of the same millisecond.
        global _last
        last = _last
        if value == last[0]:
            return last[1]
        ts = _parse_text(value)
        _last = (value, ts)
        return ts
    if isinstance(value, bool):
        raise MalformedEvent("@timestamp is a boolean", "bad @timestamp")
    if isinstance(value, int | float):
        try:
            return _epoch(float(value), value)
        except OverflowError:  # an integer beyond any float
            raise MalformedEvent("@timestamp is outside 2000-2100", "bad @timestamp") from None
    if value is None:
        raise MalformedEvent("@timestamp is missing", "missing field")
    raise MalformedEvent("@timestamp is not a string or number", "bad @timestamp")


# -- calls ---------------------------------------------------------------------------------

# event.action values that start a connection or carry a request: the contract's own, Elastic
# Defend's, and Auditd Manager's / Auditbeat's (go-libaudit's names for connect(); a failed
# connect is reported with the same action and is still an attempt).
CALL_ACTIONS = frozenset({
    "connection_attempted", "http_request", "connected-to", "socket_opened",
})
# Actions that name something other than a call to the destination: the end of a
# connection, an inbound connection, a listening or bound socket, data on an existing
# connection, a DNS lookup.
NOT_CALL_ACTIONS = frozenset({
    "disconnect_received", "connection_accepted", "accepted-connection-from",
    "bound-socket", "listen-for-connections", "received-from", "sent-to", "socket_closed",
    "lookup_requested", "lookup_result",
})
_INBOUND = frozenset({"ingress", "inbound"})


def _has(tags: list[str] | str | None, value: str) -> bool:
    return tags == value if tags.__class__ is str else tags is not None and value in tags


def call_skip_reason(d: EcsDoc) -> str | None:
    """Why `d` is not a call, or None when it is one. A known call action decides; then a
    known other action; otherwise an event typed `end`, or an inbound connection, is not a
    call, and anything else (no categorisation at all included) is."""
    e = d.event
    if e is not None:
        action = e.action
        if action is not None:
            if action in CALL_ACTIONS:
                return None
            if action in NOT_CALL_ACTIONS:
                return f"not a connection start (event.action {action})"
        if _has(e.type, "end"):
            return "not a connection start (event.type end)"
    n = d.network
    if n is not None and n.direction in _INBOUND:
        return "not a connection start (inbound)"
    return None


# -- the rules -------------------------------------------------------------------------------

MAX_FIELD_CHARS = 4096
NOT_METADATA = "not a metadata endpoint"

_STRING_SLOTS = ("dst_ip", "name", "exe", "command_line", "parent_name", "parent_exe", "user",
                 "uid", "host", "container_id", "image", "namespace", "pod", "cloud",
                 "event_id", "action", "method", "path", "query", "user_agent",
                 "thread_name", "kernel_exe", "proc_exe")


def read_doc(
    d: EcsDoc,
    match: Callable[[str, int | None], Any] | None = None,
    raw: bytes | None = None,
    doc: dict | None = None,
) -> tuple[Event, Any] | str:
    """(the Event of `d`, `match(ip, port)`: its endpoint, None without `match`), or the
    reason `d` is skipped: not a call, or a destination `match` turns down
    (`NOT_METADATA`). Raises MalformedEvent for a document that breaks a rule. `raw` (the
    line) or `doc` (the decoded dict) become the Event's `doc`."""
    hit_id = None
    if d.source is not None:  # an Elasticsearch hit: the document is its _source
        hit_id = d.hit_id
        d = d.source
    elif d.hits is not None:
        raise MalformedEvent("a _search response page is read as a whole line only")
    dst = d.destination
    ip = dst.ip if dst is not None else None
    if dst is None or not ip:
        e = d.event
        category = e.category if e is not None else None
        if category is not None and not _has(category, "network"):
            first = category if category.__class__ is str else ",".join(category)
            return f"not a network event (event.category {first or 'empty'})"
        raise MalformedEvent("destination.ip is missing", "missing field")
    port = dst.port
    if port is not None and not 0 <= port <= 65535:
        raise MalformedEvent(f"destination.port {port} is out of range 0-65535")
    endpoint = None
    if match is not None:
        endpoint = match(ip, port)
        if endpoint is None:
            return NOT_METADATA
    e = d.event
    if e is None or e.action not in CALL_ACTIONS:  # the common case decides at once
        reason = call_skip_reason(d)
        if reason is not None:
            return reason
    when = d.timestamp
    if when.__class__ is str and when == _last[0]:  # parse_timestamp's cache, inline
        ts = _last[1]
    else:
        ts = parse_timestamp(when)
    p = d.process
    name = p.name if p is not None else None
    if p is None or name is None:
        raise MalformedEvent("process.name is missing", "missing field")
    pid = p.pid
    if pid is not None and not 0 <= pid <= 0xFFFFFFFF:
        raise MalformedEvent(f"process.pid {pid} is out of range")
    parent = p.parent
    ppid = parent_name = parent_exe = None
    if parent is not None:
        ppid = parent.pid
        if ppid is not None and not 0 <= ppid <= 0xFFFFFFFF:
            raise MalformedEvent(f"process.parent.pid {ppid} is out of range")
        parent_name = parent.name or None
        parent_exe = parent.executable or None
    user = d.user
    host = d.host
    c = d.container
    o = d.orchestrator
    image = c.image if c is not None else None
    resource = o.resource if o is not None else None
    http = d.http
    url = d.url
    request = d.imdswatch.request if d.imdswatch is not None else None
    kp = d.imdswatch.process if d.imdswatch is not None else None
    mismatch = kernel_exe = proc_exe = None
    if kp is not None:
        if kp.exe_mismatch:
            mismatch = True
            kernel_exe = (kp.kernel_executable.name or ""
                          if kp.kernel_executable is not None else "")
            proc_exe = kp.proc_executable or None
        elif kp.kernel_executable is not None:
            mismatch = False
    ev = Event(
        ts, ip, name, port, pid,
        p.executable or None,
        p.command_line or p.title or None,
        ppid, parent_name, parent_exe,
        (user.name or None) if user is not None else None,
        (user.id or None) if user is not None else None,
        (host.name or host.hostname or host.id or None) if host is not None else None,
        (c.id or None) if c is not None else None,
        (image.name or None) if image is not None else None,
        (o.namespace or None) if o is not None else None,
        (resource.name or None) if resource is not None else None,
        (d.cloud.provider or None) if d.cloud is not None else None,
        ((e.id or None) if e is not None else None) or hit_id,
        (e.action or None) if e is not None else None,
        (http.request.method or None) if http is not None and http.request is not None
        else None,
        (url.path or None) if url is not None else None,
        (url.query or None) if url is not None else None,
        (d.user_agent.original or None) if d.user_agent is not None else None,
        request.guarded if request is not None else None,
        (p.thread.name or None) if p.thread is not None else None,
        mismatch, kernel_exe, proc_exe, None,
        doc, raw,
    )
    ident = d.imdswatch.identity if d.imdswatch is not None else None
    if ident is not None and ident.missing:
        forget_missing(ev, ident.missing)
    # Only a line longer than the cap can hold a field longer than it.
    if raw is None or len(raw) > MAX_FIELD_CHARS:
        for slot in _STRING_SLOTS:
            v = getattr(ev, slot)
            if v is not None and len(v) > MAX_FIELD_CHARS:
                setattr(ev, slot, v[:MAX_FIELD_CHARS])
    return ev, endpoint


# The Event's attribute for each identity field the contract lets the agent declare missing.
MISSING_SLOTS = {
    "process.executable": "exe", "process.command_line": "command_line",
    "process.parent.name": "parent_name", "process.parent.pid": "ppid",
    "process.parent.executable": "parent_exe", "user.name": "user", "user.id": "uid",
}


def forget_missing(ev: Event, missing: list[str] | str) -> None:
    """Make absent the fields `missing` names; names it does not know are ignored."""
    names = [missing] if isinstance(missing, str) else missing
    for name in names:
        slot = MISSING_SLOTS.get(name) if isinstance(name, str) else None
        if slot is not None:
            setattr(ev, slot, None)
        elif name == "container.id" and ev.image is None and ev.namespace is None \
                and ev.pod is None:
            # Whether it runs in a container is unknown: not "in the host".
            ev.container_id = None
            ev.container_unknown = True


# -- other forms of the same document -----------------------------------------------------------

def schema_error(exc: msgspec.ValidationError) -> MalformedEvent:
    """msgspec's 'Expected `str | null`, got `int` - at `$.process.name`' as a reason
    that names the field first."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `$.")
    if sep:
        field = where.rstrip("`").replace("_source.", "", 1)
        return MalformedEvent(f"{field}: {message[0].lower()}{message[1:]}")
    return MalformedEvent(text)


def unflatten(doc: dict) -> dict:
    """Turn dotted keys ("process.name": x) into nested objects; Kibana CSV-to-JSON and
    some exporters write ECS that way, and Elasticsearch `_source` may mix both forms."""
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


def has_dotted_keys(doc: dict) -> bool:
    return any("." in k for k in doc if k != "@timestamp")


# Fields some exporters write as numbers although ECS makes them keywords.
_IDENTS = frozenset({"user.id", "host.id", "event.id"})


def _plan(cls: type) -> dict[str, tuple[str, Any]]:
    """Per field of a schema struct: ("struct", its class) or the leaf's kind."""
    out: dict[str, tuple[str, Any]] = {}
    for f in msgspec.structs.fields(cls):
        kinds = set(getattr(f.type, "__args__", (f.type,))) - {type(None)}
        struct = next((k for k in kinds if isinstance(k, type)
                       and issubclass(k, msgspec.Struct)), None)
        if struct is not None:
            out[f.encode_name] = ("struct", struct)
        elif kinds == {int}:
            out[f.encode_name] = ("number", None)
        elif kinds == {str}:
            out[f.encode_name] = ("text", None)
    return out


_PLANS: dict[type, dict[str, tuple[str, Any]]] = {}


def normalize(obj: dict, cls: type = EcsDoc, path: str = "") -> dict:
    """A copy of the fields of `obj` the schema reads, in their canonical types: an array's
    first value, a numeric id as text, a decimal pid or port as a number. Anything still
    wrong is left for the schema to name. Raises MalformedEvent for a number that is not."""
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _plan(cls)
    out = dict(obj)
    for key, (kind, sub) in plan.items():
        if key not in obj:
            continue
        v = obj[key]
        if v.__class__ is list:
            if not v:
                del out[key]
                continue
            v = v[0]
        where = f"{path}{key}"
        if kind == "struct":
            if isinstance(v, dict) and key != "hits":
                v = normalize(v, sub, f"{where}.")
        elif kind == "number":
            if v.__class__ is str:
                if not (v.isascii() and v.isdigit() and len(v) <= 10):
                    raise MalformedEvent(f"{where} {v[:40]!r} is not an integer")
                v = int(v)
        elif kind == "text" and v.__class__ is int and where in _IDENTS:
            v = str(v)
        out[key] = v
    return out


def typed_doc(doc: Any) -> tuple[EcsDoc, dict]:
    """A decoded JSON value as (schema document, the dict its alerts copy): dotted keys
    unflattened (in an Elasticsearch hit's `_source` too), other ECS forms normalised.
    Raises MalformedEvent."""
    if not isinstance(doc, dict):
        raise MalformedEvent("line is not a JSON object", "not a JSON object")
    source = doc.get("_source")
    if isinstance(source, dict):
        if has_dotted_keys(source):
            doc = {**doc, "_source": unflatten(source)}
        copied = doc["_source"]
    else:
        if has_dotted_keys(doc):
            doc = unflatten(doc)
        copied = doc
    try:
        return convert(doc), copied
    except msgspec.ValidationError:
        pass
    try:
        return convert(normalize(doc)), copied
    except msgspec.ValidationError as exc:
        raise schema_error(exc) from None


def event_from_ecs(doc: Any) -> Event:
    """The Event of a decoded ECS document (the live path), under the same rules as a
    replayed line; a document that is not a call raises MalformedEvent too, since the
    tracer only ever sends calls."""
    d, copied = typed_doc(doc)
    out = read_doc(d, doc=copied)
    if isinstance(out, str):
        raise MalformedEvent(out, "not a call")
    return out[0]
