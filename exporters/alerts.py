"""Alerts out (contract §2): one ECS document per alerting Outcome, one NDJSON line each."""

from __future__ import annotations

import copy
import io
import os
import threading
from datetime import UTC, datetime
from typing import IO, Any, Protocol

import orjson

from exporters.redact import redact
from scoring.detectors import request_class

# The ECS field sets the contract says an alert copies from its triggering event.
COPIED_FIELDS = ("process", "user", "host", "container", "orchestrator", "destination")


class OutcomeLike(Protocol):
    """The attributes of `scoring.scorer.Outcome` this module reads."""

    event: Any
    endpoint: Any
    score: float
    detector: str
    rule_name: str
    reason: str
    severity: str
    entity: str
    scores: dict


def rfc3339_millis(ts: float) -> str:
    """Epoch seconds to `2024-05-01T12:00:00.123Z` (ECS `@timestamp` style)."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _redact_command_lines(process: dict) -> None:
    cmd = process.get("command_line")
    if isinstance(cmd, str):
        process["command_line"] = redact(cmd)
    parent = process.get("parent")
    if isinstance(parent, dict) and isinstance(parent.get("command_line"), str):
        parent["command_line"] = redact(parent["command_line"])
    # ECS also carries the argument vector; a token in argv is the same token.
    for holder in (process, parent if isinstance(parent, dict) else {}):
        args = holder.get("args")
        if isinstance(args, list):
            holder["args"] = [redact(a) if isinstance(a, str) else a for a in args]


def _endpoint_id(endpoint: Any) -> str | None:
    if endpoint is None:
        return None
    return getattr(endpoint, "id", None) or str(endpoint)


def build_alert(outcome: OutcomeLike, scored_by: str = "agent") -> dict:
    """The contract §2 alert for `outcome`, with command lines redacted. `scored_by` says
    which model judged it: `agent` (on the node) or `fleet` (`imdswatch serve`).

    The event document is deep-copied field set by field set, so redacting the alert never
    rewrites the event the scorer (or a later alert) still holds.
    """
    event = outcome.event
    doc = event.doc if isinstance(getattr(event, "doc", None), dict) else {}
    alert: dict[str, Any] = {"@timestamp": rfc3339_millis(event.ts)}
    ecs_event: dict[str, Any] = {"kind": "alert"}
    event_id = getattr(event, "event_id", None)
    if event_id:
        ecs_event["id"] = event_id
    alert["event"] = ecs_event
    alert["rule"] = {"name": outcome.rule_name}
    anomaly: dict[str, Any] = {
        "score": round(float(outcome.score), 1),
        "detector": outcome.detector,
        "reason": outcome.reason,
    }
    severity = getattr(outcome, "severity", None)
    if severity:
        anomaly["severity"] = severity
    entity = getattr(outcome, "entity", None)
    if entity:
        anomaly["entity"] = entity
    scores = getattr(outcome, "scores", None)
    if scores:
        anomaly["scores"] = {k: round(float(v), 1) for k, v in scores.items()}
    alert["anomaly"] = anomaly
    for key in COPIED_FIELDS:
        value = doc.get(key)
        if isinstance(value, dict):
            alert[key] = copy.deepcopy(value)
    if "process" in alert:
        _redact_command_lines(alert["process"])
    own: dict[str, Any] = {"scored_by": scored_by}
    endpoint = _endpoint_id(getattr(outcome, "endpoint", None))
    if endpoint:
        own["endpoint"] = endpoint
    alert["imdswatch"] = own
    _copy_request(alert, event, doc)
    return alert


def _copy_request(alert: dict, event: Any, doc: dict) -> None:
    """The HTTP request (contract §2): method, path, redacted query, user agent, whether
    the anti-SSRF header was there, and the class of what it asked for."""
    if getattr(event, "method", None) is None and getattr(event, "path", None) is None:
        return
    if event.method is not None:
        alert["http"] = {"request": {"method": event.method}}
    url: dict[str, Any] = {}
    if event.path is not None:
        url["path"] = redact(event.path)
    if event.query is not None:
        url["query"] = redact(event.query)
    if url:
        alert["url"] = url
    if event.user_agent is not None:
        alert["user_agent"] = {"original": redact(event.user_agent)}
    request: dict[str, Any] = {"class": request_class(event)}
    if event.guarded is not None:
        request["guarded"] = event.guarded
    alert.setdefault("imdswatch", {})["request"] = request


class AlertWriter:
    """Writes alerts as NDJSON to a path, a text stream or a binary stream.

    Each alert is flushed as soon as it is written: a SIEM shipper tailing the file, or a
    pipe into `jq`, sees it at once, and a crash loses at most the alert being written.
    """

    def __init__(self, stream: str | os.PathLike[str] | IO[str] | IO[bytes],
                 append: bool = True, scored_by: str = "agent") -> None:
        # A path is appended to by default: a restarted agent must not erase the alerts it
        # wrote before; a replay that should start afresh passes append=False.
        self._owned = isinstance(stream, str | os.PathLike)
        if self._owned:
            self._stream: IO[Any] = open(stream, "ab" if append else "wb")  # closed by close()
            self._binary = True
        else:
            self._stream = stream  # type: ignore[assignment]
            self._binary = _is_binary(stream)
        # The agent may write from the tracer thread while the main thread closes.
        self._lock = threading.Lock()
        self.written = 0
        self.scored_by = scored_by

    def write(self, outcome: OutcomeLike) -> dict:
        """Write one alert line for `outcome` and return the alert document."""
        alert = build_alert(outcome, self.scored_by)
        self.write_document(alert)
        return alert

    def write_document(self, alert: dict) -> None:
        line = orjson.dumps(alert) + b"\n"
        with self._lock:
            if self._binary:
                self._stream.write(line)
            else:
                self._stream.write(line.decode("utf-8"))
            self._stream.flush()
            self.written += 1

    def close(self) -> None:
        """Close a file this writer opened; a stream passed in is only flushed."""
        with self._lock:
            if self._stream.closed:
                return
            if self._owned:
                self._stream.close()
            else:
                self._stream.flush()

    def __enter__(self) -> AlertWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_binary(stream: Any) -> bool:
    if isinstance(stream, io.TextIOBase):
        return False
    if isinstance(stream, io.BufferedIOBase | io.RawIOBase):
        return True
    # Unknown file-like objects: text streams announce an encoding, binary ones do not.
    return getattr(stream, "encoding", None) is None and "b" in getattr(stream, "mode", "b")
