# Metadata addresses in this file are data (event fields): nothing here connects to them.
"""The policy applied to live calls (policy.gate): verdicts, the alert line, its rate limit,
and the agent never judging itself."""

from __future__ import annotations

import os

from helpers_events import T0, ev

from policy.gate import (
    CONNECTION_DENIED,
    REQUEST_DENIED,
    WOULD_DENY,
    PolicyGate,
    action_of,
    build_policy_alert,
)
from policy.model import ALLOW, DENY, Policy, Rule
from scoring.endpoints import EndpointCatalog

CATALOG = EndpointCatalog.from_config()
POLICY = Policy((Rule("ssm", ALLOW, process="amazon-ssm-agent", classes=("metadata",)),),
                default=DENY)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def req(name: str, path: str, pid: int = 42, **kw):  # noqa: ANN201 - Event
    e = ev(T0, name, pid=pid, **kw)
    e.method, e.path, e.guarded = "GET", path, False
    return e


def test_connect_and_request_verdicts() -> None:
    gate = PolicyGate(POLICY, CATALOG)
    v = gate.judge(req("curl", "/latest/meta-data/"))
    assert v.action == CONNECTION_DENIED and v.decision.rule == "default"
    v = gate.judge(req("amazon-ssm-agent", "/latest/meta-data/iam/security-credentials/r"))
    assert v.action == REQUEST_DENIED and v.request_class == "credentials"
    assert gate.judge(req("amazon-ssm-agent", "/latest/meta-data/instance-id")) is None
    assert gate.judge(ev(T0, "curl", dst_ip="10.0.0.1")) is None  # not a metadata endpoint
    assert gate.judge(req("curl", "/", pid=os.getpid())) is None  # never the agent itself
    assert action_of(v, "audit") == WOULD_DENY and action_of(v, "deny") == REQUEST_DENIED


def test_lines_are_rate_limited_per_caller_and_say_how_many_were_folded() -> None:
    clock = Clock()
    gate = PolicyGate(POLICY, CATALOG, clock=clock)
    e = req("curl", "/latest/meta-data/")
    v = gate.judge(e)
    assert gate.admit_line(e, v) == 0
    assert gate.admit_line(e, v) is None and gate.admit_line(e, v) is None
    other = req("wget", "/latest/meta-data/")
    assert gate.admit_line(other, gate.judge(other)) == 0  # another caller: its own line
    clock.t = 61
    assert gate.admit_line(e, v) == 2


def test_the_alert_line_names_the_rule_the_action_and_the_request() -> None:
    e = req("amazon-ssm-agent", "/latest/meta-data/iam/security-credentials/r?token=abcdef0123")
    e.user_agent = "x"
    v = PolicyGate(POLICY, CATALOG).judge(e)
    a = build_policy_alert(e, v, action_of(v, "deny"), "deny", folded=3)
    assert a["event"] == {"kind": "alert", "action": "request_denied", "outcome": "failure"}
    assert a["imdswatch"]["policy"] == {"rule": "default", "mode": "deny", "folded": 3}
    assert a["imdswatch"]["request"] == {"class": "credentials", "guarded": False}
    assert a["imdswatch"]["endpoint"] == "imds"
    a = build_policy_alert(e, v, WOULD_DENY, "audit")
    assert a["event"]["action"] == "would_deny" and "outcome" not in a["event"]
