"""The enforcement's Prometheus metrics, registered beside the agent's own.

Every label is bounded: modes and actions are fixed sets, rule names come from the
operator's policy file (at most `policy.toml_file.MAX_RULES`), endpoints from the
catalog, classes from `scoring.endpoints.REQUEST_CLASSES`.

- `imdswatch_policy_decisions_total{action,rule,endpoint,class}` - calls the policy denied
  (`connection_denied`, `request_denied`) or would deny (`would_deny`, audit)
- `imdswatch_enforcement_mode{mode}` - 1 for the mode in force (`off`, `audit`, `deny`)
- `imdswatch_enforcement_requested_mode{mode}` - 1 for the mode asked for on the command
  line: differs from the one in force after a break glass, a disarm or a failed load
- `imdswatch_policy_rules` - rules of the policy in force
- `imdswatch_policy_loaded_timestamp_seconds` - when it was (re)loaded
- `imdswatch_policy_reload_failures_total` - policy files refused (the previous one stays)
- `imdswatch_enforcement_break_glass` - 1 while the break-glass file exists
- `imdswatch_enforcement_disarmed` - 1 after denials spread past the bound (back in audit)
- `imdswatch_enforcement_failed` - 1 when the kernel side could not load (audit instead)
- `imdswatch_enforcement_requests_failed` - 1 when the request programs (sock_ops, sk_msg)
  could not load or link: connects are still judged in the kernel, requests only reported
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge

MODES = ("off", "audit", "deny")


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decisions = Counter(
            "imdswatch_policy_decisions",
            "Metadata calls the enforcement policy denied or, in audit, would deny.",
            ["action", "rule", "endpoint", "class"], registry=r)
        self.mode = Gauge("imdswatch_enforcement_mode",
                          "1 for the enforcement mode in force on this node.", ["mode"],
                          registry=r)
        self.requested = Gauge(
            "imdswatch_enforcement_requested_mode",
            "1 for the enforcement mode the agent was started with.", ["mode"], registry=r)
        self.rules = Gauge("imdswatch_policy_rules", "Rules of the policy in force.",
                           registry=r)
        self.loaded = Gauge("imdswatch_policy_loaded_timestamp_seconds",
                            "When the policy in force was loaded (Unix seconds).", registry=r)
        self.reload_failures = Counter(
            "imdswatch_policy_reload_failures",
            "Policy files refused at reload (the previous policy stays in force).",
            registry=r)

        self.break_glass = Gauge(
            "imdswatch_enforcement_break_glass",
            "1 while the break-glass file exists: nothing is denied on this node.", registry=r)
        self.disarmed = Gauge(
            "imdswatch_enforcement_disarmed",
            "1 after denials spread past the configured bound: back in audit until the "
            "policy is reloaded.", registry=r)
        self.failed = Gauge(
            "imdswatch_enforcement_failed",
            "1 when the kernel side of --enforce deny could not load: audit instead.",
            registry=r)

        self.requests_failed = Gauge(
            "imdswatch_enforcement_requests_failed",
            "1 when the kernel cannot judge requests (its sock_ops and sk_msg programs did "
            "not load): connects are still judged, a request of a class a caller may not "
            "use is only reported (would_deny).", registry=r)
        self.scope_cgroups = Gauge(
            "imdswatch_enforcement_scope_cgroups",
            "Cgroups whose callers --enforce-scope lets the kernel deny (with a scope), "
            "and pod cgroups whose namespace is not known yet (out of scope: fail open).",
            ["state"], registry=r)

    def set_mode(self, mode: str, requested: str) -> None:
        for m in MODES:
            self.mode.labels(mode=m).set(1 if m == mode else 0)
            self.requested.labels(mode=m).set(1 if m == requested else 0)

    def set_policy(self, rules: int) -> None:
        self.rules.set(rules)
        self.loaded.set(time.time())

    def decided(self, action: str, rule: str, endpoint: str, cls: str | None) -> None:
        self.decisions.labels(action=action, rule=rule, endpoint=endpoint,
                              **{"class": cls or "connect"}).inc()
