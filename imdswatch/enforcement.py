"""`run --enforce deny`: the kernel enforcer driven by the agent's loop.

Each loop turn (every POLL_MS): the break-glass file is looked at (its existence disarms
the kernel at once: one map write), the kernel is armed when nothing holds it back
(break glass, an automatic disarm, the model's learning period, a failed load), and the
kernel's denials are read and reported: an alert line (`event.action:
connection_denied`, `event.outcome: failure`, the deciding rule), a metric. When the
distinct callers denied within a minute pass `max_callers`, the node disarms by itself
and stays in audit until the policy is reloaded (SIGHUP): a bad policy cannot take a
node's workloads down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from intake.parser import MalformedEvent, event_from_ecs
from policy.gate import (
    CONNECTION_DENIED,
    REQUEST_DENIED,
    PolicyGate,
    Verdict,
    build_policy_alert,
)
from policy.kernel_rules import project, request_patterns
from policy.metrics import PolicyMetrics
from policy.model import DEFAULT_RULE, DENY, Caller, Decision, Policy
from scoring.endpoints import classify_request
from tracer.enforce_scope import Scope, ScopeTracker
from tracer.enforcer import KIND_REQUEST, DeniedConnect, EnforceError, KernelEnforcer

log = logging.getLogger("imdswatch.enforce")

DEFAULT_OFF_FILE = "/run/imdswatch/enforce-off"
DISARM_WINDOW = 60.0
SCOPE_SCAN_S = 1.0  # how often the scope's cgroups are listed again (new pods join it)
# Refused connects remembered by socket cookie until the tracer's event for them is judged;
# a cgroup-mode tracer's event follows its denial record at once, so a bound is enough.
REFUSED_KEPT = 4096


class DenyController:
    def __init__(self, gate: PolicyGate, metrics: PolicyMetrics, cgroup: str, off_file: str,
                 max_callers: int, write: Callable[[dict], None],
                 learning: Callable[[], bool], passwd: str = "/etc/passwd",
                 scope: Scope | None = None,
                 namespace_of: Callable[[str], str | None] | None = None) -> None:
        self.gate = gate
        self.metrics = metrics
        self.cgroup = cgroup
        self.off_file = off_file
        self.max_callers = max_callers
        self.write = write
        self.learning = learning
        self.passwd = passwd
        self.kernel: KernelEnforcer | None = None
        self.failed: str | None = None
        self.disarmed = False
        self.break_glass = False
        self._recent: deque[tuple[float, tuple]] = deque(maxlen=100_000)
        self._said_learning = False
        self.scope = scope or Scope()
        self._scope_tracker = ScopeTracker(self.scope, cgroup, namespace_of)
        self._scope_scanned = -SCOPE_SCAN_S
        self._said_unattributed = False
        self._refused: OrderedDict[int, None] = OrderedDict()

    # -- start and policy ---------------------------------------------------------------

    def start(self) -> None:
        """Load and link the kernel side, disarmed. On failure the agent stays in audit and
        says why (log, imdswatch_enforcement_failed)."""
        try:
            self.kernel = KernelEnforcer(self.gate.catalog, self.cgroup)
            self.kernel.start(self._projection(self.gate.policy), self._denied,
                              request_patterns())
        except (EnforceError, OSError) as exc:
            self.kernel = None
            self.failed = str(exc)
            self.metrics.failed.set(1)
            log.error("enforcement in the kernel is unavailable, staying in audit: %s", exc)
        self.metrics.requests_failed.set(
            0 if self.kernel is not None and self.kernel.requests_unavailable is None else 1)
        self._scan_scope()
        if not self.scope.everyone:
            log.info("enforcement scope %s: only its callers can be denied; the others are "
                     "audited", self.scope)
        self.tick()

    def _projection(self, policy: Policy):  # noqa: ANN202 - tracer.enforcer.KernelRules
        p = project(policy, self.passwd)
        for note in p.notes:
            log.warning("policy: %s", note)
        self._scope_tracker.namespace_rules = p.deny_namespaces
        self._scope_scanned = -SCOPE_SCAN_S  # the namespace denials follow at once
        return p.rules

    def set_policy(self, policy: Policy) -> None:
        """A reloaded policy: the kernel's rules replaced (no moment denies what both allow);
        an automatic disarm is lifted."""
        if self.kernel is not None:
            self.kernel.set_rules(self._projection(policy))
            self._scan_scope()
        if self.disarmed:
            log.info("policy reloaded: the automatic disarm is lifted")
        self.disarmed = False
        self.metrics.disarmed.set(0)
        self._recent.clear()

    # -- each loop turn -----------------------------------------------------------------

    def mode(self) -> str:
        if self.break_glass:
            return "off"
        if self.kernel is not None and self.kernel.armed:
            return "deny"
        return "audit"

    def covers(self, container_id: str | None, pod_uid: str | None,
               namespace: str | None) -> bool:
        """The caller is in the scope: the kernel refuses it when the policy denies."""
        return self.scope.covers(container_id, pod_uid, namespace)

    def refused(self, cookie: int | None) -> bool:
        """The kernel refused the connect of the socket with this cookie (and reported it
        as a connection_denied line). A fact from the kernel, not the policy: the enforcer
        records the cookie of each connect it refuses. Only the tracer's cgroup mode sees
        refused connects (its root program runs after the enforcer's, which is on a
        descendant cgroup, in the same connect()); the tracepoint, kprobe and fentry modes
        fire only in tcp_v4/v6_connect, which a refused connect never reaches, so their
        events are calls the kernel let through. The denial buffer is read first: the
        record was written before the tracer's event."""
        if not cookie or self.kernel is None:
            return False
        self.kernel.poll(0)
        if cookie in self._refused:
            del self._refused[cookie]
            return True
        return False

    def _scan_scope(self) -> None:
        """The kernel's scope and namespace-denial maps kept current (every SCOPE_SCAN_S),
        before arming."""
        t = self._scope_tracker
        if self.kernel is None or not (t.needed or self.kernel.cgroup_denials):
            return
        now = time.monotonic()
        if now - self._scope_scanned < SCOPE_SCAN_S:
            return
        self._scope_scanned = now
        ids = t.scan()
        self.kernel.set_cgroup_denials(t.denials)
        if not self.scope.everyone:
            self.kernel.set_scope(ids)
            self.metrics.scope_cgroups.labels(state="in_scope").set(len(ids))
        self.metrics.scope_cgroups.labels(state="unattributed").set(t.unattributed)
        if t.truncated:
            log.warning("enforcement scope: more cgroups than the kernel map holds; the "
                        "rest are out of scope (allowed, audited)")
        if t.unattributed and not self._said_unattributed:
            self._said_unattributed = True
            log.warning("enforcement scope: %d pod cgroups have no known namespace yet (the "
                        "Kubernetes API has not named their pods): out of a namespaces= scope and "
                        "of namespace deny rules (allowed, audited) until it does",
                        t.unattributed)

    def tick(self) -> None:
        self._scan_scope()
        self.break_glass = os.path.exists(self.off_file)
        want = (self.kernel is not None and not self.break_glass and not self.disarmed
                and not self.learning())
        if self.kernel is not None and want != self.kernel.armed:
            self.kernel.arm(want)
            if want:
                log.info("enforcement armed: the kernel denies per the policy in %s",
                         self.cgroup)
            elif self.break_glass:
                log.warning("break glass: %s exists, nothing is denied on this node",
                            self.off_file)
            else:
                log.warning("enforcement disarmed: audit only")
        if (self.kernel is not None and not want and self.learning()
                and not self._said_learning):
            self._said_learning = True
            log.warning("the model is learning: enforcement arms once it is done (or start "
                        "with a warmed --state, or --learning-period 0s)")
        self.metrics.break_glass.set(1 if self.break_glass else 0)
        self.metrics.set_mode(self.mode(), "deny")
        self.gate.mode = "deny" if self.mode() == "deny" else "audit"
        if self.kernel is not None:
            self.kernel.poll(0)

    # -- the kernel's denials -----------------------------------------------------------

    def _denied(self, rec: DeniedConnect) -> None:
        if rec.kind != KIND_REQUEST and rec.cookie:
            self._refused[rec.cookie] = None
            while len(self._refused) > REFUSED_KEPT:
                self._refused.popitem(last=False)
        try:
            self._report(rec)
        except Exception:  # a report must never stop the loop
            log.exception("reporting a denied connect failed")

    def _report(self, rec: DeniedConnect) -> None:
        doc = denied_doc(rec)
        try:
            event = event_from_ecs(doc)
        except MalformedEvent as exc:
            log.warning("unusable denial record: %s", exc)
            return
        endpoint = self.gate.catalog.match(event.dst_ip, event.dst_port)
        if endpoint is None:
            return
        rule = DEFAULT_RULE
        if rec.rule and rec.rule <= len(self.gate.policy.rules):
            rule = self.gate.policy.rules[rec.rule - 1].name
        action, cls = CONNECTION_DENIED, None
        if rec.kind == KIND_REQUEST:
            action = REQUEST_DENIED
            cls = classify_request(endpoint, event.method, event.path, event.query)
            d = self.gate.policy.decide(Caller.of_event(event), endpoint.id, cls,
                                        endpoint.address)
            # A request the kernel could not read whole and canonical is refused whatever
            # it names: then the policy's own verdict may be an allow.
            rule = d.rule if d.denied else DEFAULT_RULE
        verdict = Verdict(Decision(DENY, rule), endpoint, cls, action)
        self.metrics.decided(action, rule, endpoint.id, cls)
        folded = self.gate.admit_line(event, verdict)
        if folded is not None:
            self.write(build_policy_alert(event, verdict, action, "deny", folded))
        self._spread((rec.uid, rec.dev, rec.ino, bytes(rec.comm), rec.cgroup_id))

    def _spread(self, caller: tuple) -> None:
        now = time.monotonic()
        self._recent.append((now, caller))
        while self._recent and now - self._recent[0][0] > DISARM_WINDOW:
            self._recent.popleft()
        distinct = {c for _, c in self._recent}
        if len(distinct) > self.max_callers and not self.disarmed:
            self.disarmed = True
            self.metrics.disarmed.set(1)
            if self.kernel is not None:
                self.kernel.arm(False)
            log.error("enforcement disarmed: %d distinct callers denied within %.0fs (bound "
                      "%d); back in audit until the policy is reloaded (SIGHUP)",
                      len(distinct), DISARM_WINDOW, self.max_callers)
            self.write({"@timestamp": _now(), "event": {"kind": "alert",
                                                        "action": "enforcement_disarmed"},
                        "rule": {"name": "Metadata Enforcement Disarmed: Denials Spread Past "
                                         "Their Bound"},
                        "imdswatch": {"policy": {"mode": "audit",
                                                 "denied_callers": len(distinct)}}})
            self.tick()

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None


def _now() -> str:
    from exporters.timestamps import rfc3339_millis

    return rfc3339_millis(time.time())


def denied_doc(rec: DeniedConnect) -> dict[str, Any]:
    """The ECS document of a connect the kernel refused: what the kernel read, and the
    executable from /proc while the process lives."""
    family = socket.AF_INET if rec.family == 2 else socket.AF_INET6
    raw = bytes(rec.daddr[:4] if family == socket.AF_INET else rec.daddr)
    process: dict[str, Any] = {"pid": rec.tgid,
                               "name": rec.comm.decode(errors="replace") or "?"}
    try:
        process["executable"] = os.readlink(f"/proc/{rec.tgid}/exe")
    except OSError:
        pass
    doc: dict[str, Any] = {
        "@timestamp": _now(),
        "destination": {"ip": socket.inet_ntop(family, raw), "port": rec.dport},
        "process": process,
        "user": {"id": str(rec.uid)},
        "event": {"action": CONNECTION_DENIED, "outcome": "failure"},
    }
    if rec.kind == KIND_REQUEST:
        doc["event"]["action"] = REQUEST_DENIED
        method = rec.method.decode(errors="replace")
        target = rec.path.decode(errors="replace")
        path, _, query = target.partition("?")
        if method:
            doc["http"] = {"request": {"method": method}}
        doc["url"] = {"path": path or "?"}
        if query:
            doc["url"]["query"] = query
    return doc
