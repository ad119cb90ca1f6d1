"""What a policy would have done to past calls: the blast radius before enforcing it.

From a trace (every call, with its endpoint and request) or from a model state (every
caller and request class the model remembers, with decayed counts), it lists the calls
the policy would deny, by caller, with hosts, counts and first and last sighting. The same
pass answers two cloud-hardening questions: who breaks if the instance required IMDSv2
(its requests to the AWS instance metadata service carried no session token), and who
breaks if the token's hop limit were 1 (containers asking for the session token: the
answer does not reach a container behind the node's network address; the events do not
say which pods use the node's own network, so those are listed too).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from policy.learn import combinations, day_text, rfc3339, table, weight_now
from policy.model import Caller, Policy
from scoring.detectors import request_class
from scoring.endpoints import SESSION
from scoring.events import Event
from scoring.rarity import exact_hosts, hosts_len
from scoring.scorer import Scorer

# The endpoints where IMDSv2 is what "required" refers to.
IMDSV2_ENDPOINTS = frozenset(("imds", "aws-imds-v6"))
MAX_ROWS = 100_000  # distinct (caller, what) rows kept; more are counted, not listed


@dataclass(slots=True)
class Row:
    caller: str
    what: str  # "connect to imds", "credentials on imds", ...
    rule: str = ""
    count: float = 0.0
    hosts: set = field(default_factory=set)
    host_count: int = 0  # from a state: hosts the model counted (may be a sketch)
    first: str | None = None
    last: str | None = None

    @property
    def n_hosts(self) -> int:
        return max(len(self.hosts), self.host_count)


@dataclass(slots=True)
class Table:
    rows: dict[tuple, Row] = field(default_factory=dict)
    dropped: int = 0

    def add(self, caller: str, what: str, rule: str, count: float, host: str | None,
            first: str | None, last: str | None, host_count: int = 0) -> None:
        key = (caller, what, rule)
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= MAX_ROWS:
                self.dropped += 1
                return
            row = self.rows[key] = Row(caller, what, rule)
        row.count += count
        if host is not None:
            row.hosts.add(host)
        row.host_count = max(row.host_count, host_count)
        if first is not None and (row.first is None or first < row.first):
            row.first = first
        if last is not None and (row.last is None or last > row.last):
            row.last = last

    def total(self) -> float:
        return sum(r.count for r in self.rows.values())


@dataclass(slots=True)
class Plan:
    source: str
    calls: float = 0.0
    denied: Table = field(default_factory=Table)
    imdsv2: Table = field(default_factory=Table)
    hop_limit: Table = field(default_factory=Table)
    from_state: bool = False


def plan_events(policy: Policy, events: Iterable[tuple[Event, Any]], source: str) -> Plan:
    """`events`: (Event, endpoint) of metadata calls, as `intake.reader` yields them."""
    plan = Plan(source)
    for e, endpoint in events:
        plan.calls += 1
        caller = Caller.of_event(e)
        who = caller.describe()
        ep = getattr(endpoint, "id", None)
        addr = getattr(endpoint, "address", None)
        ts = rfc3339(e.ts)
        host = e.host or "(this host)"
        cls = request_class(e)
        d = policy.decide(caller, ep, None, addr)
        if d.denied:
            plan.denied.add(who, f"connect to {ep}", d.rule, 1, host, ts, ts)
        elif cls is not None:
            d = policy.decide(caller, ep, cls, addr)
            if d.denied:
                plan.denied.add(who, f"{cls} on {ep}", d.rule, 1, host, ts, ts)
        if cls is None:
            continue
        if ep in IMDSV2_ENDPOINTS and e.guarded is False and cls != SESSION:
            plan.imdsv2.add(who, f"{cls} without a token on {ep}", "", 1, host, ts, ts)
        if cls == SESSION and caller.container:
            plan.hop_limit.add(who, f"session token on {ep}", "", 1, host, ts, ts)
    return plan


def plan_state(policy: Policy, scorer: Scorer, source: str) -> Plan:
    """The model's callers (connects) and request classes, judged as if each were a call
    to every endpoint the rules name: a state does not keep endpoints."""
    plan = Plan(source, from_state=True)
    w = weight_now(scorer)
    callers = set()
    for value, e in combinations(scorer):
        if isinstance(value, tuple) and len(value) == 6:
            callers.add((value[0], value[1], value[2], value[4]))
        if not (isinstance(value, tuple) and len(value) == 6):
            continue
        name, exe, user, _parent, image, namespace = value
        caller = _caller(name, exe, user, image, namespace)
        n = e.n / w
        plan.calls += n
        d = policy.decide(caller, None, None)
        if d.denied:
            _add_entry(plan.denied, caller.describe(), "connect", d.rule, n, e)
    for ctx_key, c in table(scorer, "rare_request_class").items():
        if not (isinstance(ctx_key, tuple) and len(ctx_key) == 5):
            continue
        name, exe, user, _parent, image = ctx_key
        if (name, exe, user, image) not in callers:
            continue  # a coarser copy of a caller counted at its own identity
        caller = _caller(name, exe, user, image, None)
        if policy.decide(caller, None, None).denied:
            continue  # its connects are listed already
        for cls, e in c.values.items():
            d = policy.decide(caller, None, str(cls))
            if d.denied:
                _add_entry(plan.denied, caller.describe(), f"{cls}", d.rule, e.n / w, e)
            if cls == SESSION and caller.container:
                _add_entry(plan.hop_limit, caller.describe(), "session token", "", e.n / w, e)
    for ctx_key, c in table(scorer, "unguarded_request").items():
        if not (isinstance(ctx_key, tuple) and len(ctx_key) == 6):
            continue
        name, exe, user, _parent, image, cls = ctx_key
        if (name, exe, user, image) not in callers:
            continue
        e = c.values.get(False)
        if e is None or cls == SESSION:
            continue
        caller = _caller(name, exe, user, image, None)
        _add_entry(plan.imdsv2, caller.describe(), f"{cls} without a token", "", e.n / w, e)
    return plan


def _caller(name: Any, exe: Any, user: Any, image: Any, namespace: Any) -> Caller:
    uid = user[4:] if isinstance(user, str) and user.startswith("uid:") else None
    return Caller(name, exe, None if uid is not None else user, uid, image, namespace,
                  image is not None or namespace is not None)


def _add_entry(t: Table, caller: str, what: str, rule: str, n: float, e: Any) -> None:
    hosts = exact_hosts(e.hosts)
    first = rfc3339(e.first_seen)
    last = day_text(e.day) if e.day >= 0 else None
    if hosts:
        for i, h in enumerate(hosts):
            t.add(caller, what, rule, n if i == 0 else 0.0, h.name, first, last)
    else:
        t.add(caller, what, rule, n, None, first, last, hosts_len(e.hosts))


# -- the report ------------------------------------------------------------------------------

def _count(n: float) -> str:
    return f"{n:.0f}" if n >= 10 or n == int(n) else f"{n:.1f}"


def _rows(t: Table, with_rule: bool) -> list[str]:
    out = []
    for r in sorted(t.rows.values(), key=lambda r: (-r.n_hosts, -r.count, r.caller, r.what)):
        hosts = r.n_hosts
        rule = f" (rule {r.rule})" if with_rule else ""
        out.append(f"  {r.caller}: {r.what}{rule}: {_count(r.count)} call"
                   f"{'s' if r.count != 1 else ''} on {hosts} host{'s' if hosts != 1 else ''}"
                   f", first {r.first or '?'}, last {r.last or '?'}")
    if t.dropped:
        out.append(f"  ... and {t.dropped} more rows not listed")
    return out


def render(plan: Plan) -> str:
    unit = "calls (decayed counts)" if plan.from_state else "calls"
    denied = plan.denied.total()
    lines = [f"plan for {plan.source}: {_count(plan.calls)} metadata {unit}; "
             f"the policy would deny {_count(denied)} of them "
             f"({len({r.caller for r in plan.denied.rows.values()})} callers)"]
    if plan.from_state:
        lines.append("  (a state keeps no endpoints: every rule's endpoints are assumed; plan "
                     "a trace for per-endpoint results)")
    lines.append("would be denied:" if plan.denied.rows else "would be denied: nothing")
    lines += _rows(plan.denied, True)
    lines.append("if IMDSv2 were required (requests without the session token would fail):")
    lines += _rows(plan.imdsv2, False) or ["  nobody: every request seen carried the token"]
    lines.append("if the IMDSv2 hop limit were 1 (containers asking for the session token; "
                 "hostNetwork pods, which keep working, are not told apart):")
    lines += _rows(plan.hop_limit, False) or ["  nobody: no container asked for the token"]
    return "\n".join(lines) + "\n"
