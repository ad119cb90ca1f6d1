"""The policy applied to live calls: what the agent reports (audit) or refuses (deny).

`PolicyGate.judge` decides one traced call exactly as `imdswatch policy plan` does
(`Policy.decide`); a call the policy denies becomes an alert line with `event.action`
`would_deny` (audit) or `connection_denied`/`request_denied` (deny) and the deciding rule
in `imdswatch.policy.rule`, and a count in the metrics. Lines are rate-limited per caller
and rule: one a minute, the next one saying how many were folded into it. The agent's own
calls are never judged.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from exporters.alerts import ALLOWED_FIELDS, copy_allowed
from exporters.redact import redact
from exporters.timestamps import rfc3339_millis
from policy.model import Caller, Decision, Policy
from scoring.detectors import request_class
from scoring.endpoints import EndpointCatalog
from scoring.events import Event

WOULD_DENY = "would_deny"
CONNECTION_DENIED = "connection_denied"
REQUEST_DENIED = "request_denied"
RULE_NAME = "Metadata Service Call Outside the Enforcement Policy"
LINE_INTERVAL = 60.0  # seconds between alert lines for one (caller, rule, what)
MAX_KEYS = 4096  # rate-limit memory: the least recently seen keys are forgotten


class Verdict:
    __slots__ = ("decision", "endpoint", "request_class", "action")

    def __init__(self, decision: Decision, endpoint: Any, request_class: str | None,
                 action: str) -> None:
        self.decision = decision
        self.endpoint = endpoint
        self.request_class = request_class
        self.action = action


class PolicyGate:
    def __init__(self, policy: Policy, catalog: EndpointCatalog, mode: str = "audit",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy  # replaced whole on reload: a reader sees one policy or the next
        self.catalog = catalog
        self.mode = mode
        self._clock = clock
        self._own_pid = os.getpid()
        self._lines: OrderedDict[tuple, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def judge(self, event: Event) -> Verdict | None:
        """The verdict on a traced call the policy denies; None when it allows it."""
        if event.pid == self._own_pid:
            return None  # never the agent itself
        endpoint = self.catalog.match(event.dst_ip, event.dst_port)
        if endpoint is None:
            return None
        policy = self.policy
        caller = Caller.of_event(event)
        d = policy.decide(caller, endpoint.id, None, endpoint.address)
        cls = request_class(event)
        if d.denied:
            return Verdict(d, endpoint, cls, CONNECTION_DENIED)
        if cls is None:
            return None
        d = policy.decide(caller, endpoint.id, cls, endpoint.address)
        return Verdict(d, endpoint, cls, REQUEST_DENIED) if d.denied else None

    def admit_line(self, event: Event, verdict: Verdict) -> int | None:
        """None: hold the line back (rate limit); else the number of lines folded into it
        since the last one for this caller, rule and action."""
        key = (event.name, event.exe, event.uid, event.user, event.container_id,
               verdict.decision.rule, verdict.action, verdict.request_class)
        now = self._clock()
        with self._lock:
            last = self._lines.get(key)
            if last is not None and now - last[0] < LINE_INTERVAL:
                self._lines[key] = (last[0], last[1] + 1)
                self._lines.move_to_end(key)
                return None
            self._lines[key] = (now, 0)
            self._lines.move_to_end(key)
            while len(self._lines) > MAX_KEYS:
                self._lines.popitem(last=False)
        return last[1] if last is not None else 0


def action_of(verdict: Verdict, mode: str) -> str:
    return WOULD_DENY if mode != "deny" else verdict.action


def build_policy_alert(event: Event, verdict: Verdict, action: str, mode: str,
                       folded: int = 0) -> dict:
    """The alert line of a denied (or would-be denied) call: the contract's alert fields
    copied from the event (redacted), with what the policy decided."""
    doc = event.doc or {}
    alert: dict[str, Any] = {"@timestamp": rfc3339_millis(event.ts)}
    ecs_event: dict[str, Any] = {"kind": "alert", "action": action}
    if action != WOULD_DENY:
        ecs_event["outcome"] = "failure"
    if event.event_id:
        ecs_event["id"] = event.event_id
    alert["event"] = ecs_event
    alert["rule"] = {"name": RULE_NAME}
    alert.update(copy_allowed(doc, ALLOWED_FIELDS))
    policy: dict[str, Any] = {"rule": verdict.decision.rule, "mode": mode}
    if folded:
        policy["folded"] = folded
    own: dict[str, Any] = {"scored_by": "agent", "endpoint": verdict.endpoint.id,
                           "policy": policy}
    if verdict.request_class is not None:
        request: dict[str, Any] = {"class": verdict.request_class}
        if event.guarded is not None:
            request["guarded"] = event.guarded
        own["request"] = request
        if event.method is not None:
            alert["http"] = {"request": {"method": event.method}}
        if event.path is not None:
            alert["url"] = {"path": redact(event.path)}
    alert["imdswatch"] = own
    return alert
