"""Alerts out (contract §2): one ECS document per alerting Outcome, one NDJSON line each."""

from __future__ import annotations

import io
import os
import threading
from typing import IO, Any

import orjson

from exporters.alertcap import AlertCap
from exporters.redact import redact, redact_args
from exporters.timestamps import rfc3339_millis
from scoring.events import Event
from scoring.scorer import Outcome

# The fields an alert copies from its triggering event: exactly those the contract names
# (sections 1 and 2), nothing else. An allowlist, not a denylist: an export or a future
# tracer field such as `process.env_vars`, `process.title`, `process.entry_leader`,
# `container.labels` or `orchestrator.resource.annotations` must never ride along into the
# SIEM just because it sits under a copied field set. Values are "text" (redacted), "plain"
# (copied as they are: numbers, ids, addresses, names) or a nested allowlist.
_PROCESS_FIELDS: dict = {
    "name": "plain", "pid": "plain", "executable": "plain",
    "command_line": "text", "args": "args",
}
ALLOWED_FIELDS: dict = {
    "process": {**_PROCESS_FIELDS, "thread": {"name": "plain", "id": "plain"},
                "parent": dict(_PROCESS_FIELDS)},
    "user": {"name": "plain", "id": "plain"},
    "host": {"name": "plain", "id": "plain"},
    "container": {"id": "plain", "runtime": "plain", "image": {"name": "plain"}},
    "orchestrator": {"type": "plain", "namespace": "plain",
                     "resource": {"type": "plain", "id": "plain", "name": "plain"}},
    "destination": {"ip": "plain", "port": "plain"},
    # The request fields (http.*, url.*, user_agent.*, imdswatch.request.*) come from the
    # parsed event, redacted, in `_copy_request`.
}
# Kept for callers that list the copied field sets.
COPIED_FIELDS = tuple(ALLOWED_FIELDS)


def copy_allowed(value: Any, allowed: dict) -> dict:
    """The parts of `value` (an ECS object) that `allowed` names, secrets redacted."""
    out: dict[str, Any] = {}
    if not isinstance(value, dict):
        return out
    for key, kind in allowed.items():
        if key not in value:
            continue
        v = value[key]
        if isinstance(kind, dict):
            sub = copy_allowed(v, kind)
            if sub:
                out[key] = sub
        elif kind == "args":
            if isinstance(v, list):
                out[key] = redact_args(v)
        elif isinstance(v, dict | list):
            continue  # a scalar field holding an object is not what the contract names
        elif kind == "text" and isinstance(v, str):
            out[key] = redact(v)
        else:
            out[key] = v
    return out


def build_alert(outcome: Outcome, scored_by: str = "agent") -> dict:
    """The contract §2 alert for `outcome`: the allowed fields only, secrets redacted.
    `scored_by` says which model judged it: `agent` (on the node) or `fleet`
    (`imdswatch serve`).

    The allowed fields are copied into new objects, so redacting the alert never rewrites
    the event the scorer (or a later alert) still holds.
    """
    event = outcome.event
    doc = event.doc or {}
    alert: dict[str, Any] = {"@timestamp": rfc3339_millis(event.ts)}
    ecs_event: dict[str, Any] = {"kind": "alert"}
    if event.event_id:
        ecs_event["id"] = event.event_id
    alert["event"] = ecs_event
    alert["rule"] = {"name": outcome.rule_name}
    anomaly: dict[str, Any] = {
        "score": round(float(outcome.score), 1),
        "detector": outcome.detector,
        "reason": redact(outcome.reason) if isinstance(outcome.reason, str) else outcome.reason,
    }
    anomaly["severity"] = outcome.severity
    if outcome.entity:
        anomaly["entity"] = redact(outcome.entity)
    scores = outcome.scores
    if scores:
        anomaly["scores"] = {k: round(float(v), 1) for k, v in scores.items()}
    alert["anomaly"] = anomaly
    alert.update(copy_allowed(doc, ALLOWED_FIELDS))
    filled = _copy_filled(alert, event, doc)
    own: dict[str, Any] = {"scored_by": scored_by}
    if filled:
        own["identity"] = {"filled": filled}
    own["endpoint"] = outcome.endpoint.id
    if outcome.rollout:
        # The rollout this alert stands for (scoring.scorer: its other hosts are folded).
        own["rollout"] = {"kind": outcome.rollout_kind, "name": redact(outcome.rollout_name),
                          "hosts": outcome.rollout}
    if event.exe_mismatch:
        # The kernel's executable at connect time against /proc's (the caller's
        # process.executable is left out: /proc's is not the caller's).
        kernel: dict[str, Any] = {"exe_mismatch": True,
                                  "kernel_executable": {"name": redact(event.kernel_exe or "")}}
        if event.proc_exe:
            kernel["proc_executable"] = redact(event.proc_exe)
        own["process"] = kernel
    alert["imdswatch"] = own
    _copy_request(alert, event, outcome.request_class)
    return alert


# The caller's fields an Event can hold that its document lacks: filled by the join of an
# export's process events (intake.join) before scoring. (ECS path, Event attribute, kind.)
_FILLABLE = (
    (("process", "executable"), "exe", "plain"),
    (("process", "command_line"), "command_line", "text"),
    (("process", "parent", "name"), "parent_name", "plain"),
    (("process", "parent", "pid"), "ppid", "plain"),
    (("process", "parent", "executable"), "parent_exe", "plain"),
    (("user", "name"), "user", "plain"),
    (("user", "id"), "uid", "plain"),
    (("container", "id"), "container_id", "plain"),
    (("container", "image", "name"), "image", "plain"),
    (("orchestrator", "namespace"), "namespace", "plain"),
    (("orchestrator", "resource", "name"), "pod", "plain"),
)


def _lacks(doc: Any, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(doc, dict) or doc.get(key) in (None, "", []):
            return True
        doc = doc[key]
    return False


def _copy_filled(alert: dict, event: Event, doc: dict) -> list[str]:
    """Show in the alert the identity the scorer judged but the document lacked (the
    join's fills); returns their ECS names, which the alert lists."""
    filled = []
    for path, slot, kind in _FILLABLE:
        v = getattr(event, slot)
        if v is None or not _lacks(doc, path):
            continue
        if path == ("process", "command_line") and not _lacks(doc, ("process", "title")):
            continue  # the parser read the proctitle: the document has it
        node = alert
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = redact(v) if kind == "text" else v
        filled.append(".".join(path))
    return filled


def _copy_request(alert: dict, event: Event, request_class: str | None) -> None:
    """The HTTP request (contract §2): method, path, redacted query, user agent, whether
    the anti-SSRF header was there, and the class of what it asked for."""
    if not event.is_request:
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
    request: dict[str, Any] = {"class": request_class}
    if event.guarded is not None:
        request["guarded"] = event.guarded
    alert.setdefault("imdswatch", {})["request"] = request


class AlertWriter:
    """Writes alerts as NDJSON to a path, a text stream or a binary stream.

    Each alert is flushed as soon as it is written: a SIEM shipper tailing the file, or a
    pipe into `jq`, sees it at once, and a crash loses at most the alert being written.
    """

    def __init__(self, stream: str | os.PathLike[str] | IO[str] | IO[bytes],
                 append: bool = True, cap: AlertCap | None = None,
                 scored_by: str = "agent") -> None:
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
        # Bounds the lines written (exporters.alertcap); None writes every alert.
        self.cap = cap
        self.scored_by = scored_by

    def write(self, outcome: Outcome) -> dict | None:
        """Write one alert line for `outcome` and return the alert document, or None when
        the alert cap held it back."""
        if self.cap is not None:
            admitted, summary = self.cap.admit(outcome.event.ts, outcome.detector)
            if summary is not None:
                self.write_document(summary)
            if not admitted:
                return None
        alert = build_alert(outcome, self.scored_by)
        self.write_document(alert)
        return alert

    def flush_cap(self, now: float | None = None) -> None:
        """Write the alert cap's summary for a window that ended by event time `now` (None:
        the end of the run)."""
        if self.cap is not None:
            summary = self.cap.flush(now)
            if summary is not None:
                self.write_document(summary)

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
        """Write the last cap summary, then close a file this writer opened; a stream passed
        in is only flushed."""
        if not self._stream.closed:
            self.flush_cap()
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
