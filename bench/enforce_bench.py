"""Enforcement on the labelled scenario: a policy learned from the first days of the trace
(`imdswatch policy generate` on a model replayed from them, `default = "deny"`), applied to
the rest exactly as the agent decides (`Policy.decide`: the connect, then the request's
class), beside the static equivalents an operator has today:

- hop limit 1: IMDSv2 answers do not reach pod-network containers, so a container's token
  handshake and its token-carrying requests fail (its IMDSv1 requests still work; the
  events do not say which pods share the node's network, so every container counts);
- a uid allowlist (AWS's iptables owner rule): the users seen calling in the first days;
- the known-agent catalog alone, default deny.

Counted after the learning days: attack actors blocked (one of their calls denied), and
benign calls denied, with the distinct benign callers (host, process, user) listed.
`run(quick, seed)` returns a bench.rows.Section.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.evaluate import labels_of, read_events
from bench.rows import Row, Section
from bench.scenario import generate
from policy.learn import LearnOptions, learn_policy, table
from policy.model import DENY, Caller, Policy
from scoring.detectors import request_class, user_of
from scoring.endpoints import SESSION, EndpointCatalog
from scoring.events import Event
from scoring.rarity import DAY
from scoring.scorer import Scorer

LEARN_DAYS = 3


@dataclass
class Outcome:
    name: str
    blocked: set = field(default_factory=set)  # attack actors with a denied call
    benign_denied: int = 0
    benign_callers: Counter = field(default_factory=Counter)  # (host, process, user) -> calls


def _policy_judge(policy: Policy, catalog: EndpointCatalog) -> Callable[[Event], bool]:
    def denied(e: Event) -> bool:
        ep = catalog.match(e.dst_ip, e.dst_port)
        ep_id = ep.id if ep is not None else None
        caller = Caller.of_event(e)
        if policy.decide(caller, ep_id, None).denied:
            return True
        cls = request_class(e)
        return cls is not None and policy.decide(caller, ep_id, cls).denied
    return denied


def _hop_limit(e: Event) -> bool:
    in_container = e.container_id is not None or e.image is not None
    return in_container and (request_class(e) == SESSION or e.guarded is True)


def run(quick: bool, seed: int = 7) -> Section:
    sc = generate(seed, 0.25 if quick else 1.0)
    labels = labels_of(sc)
    split = sc.start + LEARN_DAYS * DAY
    catalog = EndpointCatalog.from_config()
    scorer = Scorer()
    rest: list[tuple[int, Event]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario-unlabelled.ndjson.gz"
        sc.write(path, labels=False)
        for i, e in read_events(path):
            if catalog.match(e.dst_ip, e.dst_port) is None:
                continue  # not a metadata call: no policy, nor the kernel, judges it
            if e.ts < split:
                scorer.process(e)
            else:
                rest.append((i, e))
    learned = learn_policy(scorer, LearnOptions(source=f"the first {LEARN_DAYS} days"))
    policy = Policy(learned.rules, DENY)
    users = table(scorer, "rare_user").contexts.get(None)  # the users the model saw call
    learned_users = {v for v in users.values if v is not None} if users is not None else set()
    catalog_only = Policy(tuple(r for r in learned.rules if r.origin.kind == "catalog"), DENY)
    systems: list[tuple[str, Callable[[Event], bool]]] = [
        ("learned policy", _policy_judge(policy, catalog)),
        ("hop limit 1", _hop_limit),
        ("uid allowlist (users of the learning days)",
         lambda e: user_of(e) not in learned_users),
        ("known-agent catalog alone", _policy_judge(catalog_only, catalog)),
    ]
    outcomes = [Outcome(name) for name, _ in systems]
    actors_after: set[str] = set()
    for i, e in rest:
        attack = labels.attack[i]
        if attack:
            actors_after.add(labels.actor[i])
        for out, (_, judge) in zip(outcomes, systems, strict=True):
            if not judge(e):
                continue
            if attack:
                out.blocked.add(labels.actor[i])
            else:
                out.benign_denied += 1
                out.benign_callers[labels.entity[i]] += 1
    n = len(actors_after)
    mine, anchors = outcomes[0], outcomes[1:]
    scope = f"seed {seed}{', quick scale' if quick else ''}"
    rows = [Row(f"enforcement: attack actors blocked, {scope}", len(mine.blocked), "",
                f"of {n} attack actors after day {LEARN_DAYS}", n, "every actor",
                len(mine.blocked) == n)]
    for a in anchors:
        rows.append(Row(f"enforcement: attack actors blocked by {a.name}", len(a.blocked), "",
                        "learned policy", len(mine.blocked), "", None))
    benign = len(rest) - sum(labels.attack[i] for i, _ in rest)
    rows.append(Row(f"enforcement: benign metadata calls denied, {scope}", mine.benign_denied,
                    "", f"of {benign} benign metadata calls", None, "", None))
    rows.append(Row("enforcement: benign callers denied (host, process, user)",
                    len(mine.benign_callers), "", "fewest of the static equivalents",
                    min(len(a.benign_callers) for a in anchors), "", None))
    for a in anchors:
        rows.append(Row(f"enforcement: benign callers denied by {a.name}",
                        len(a.benign_callers), "", "", None, "", None))
    listed = "\n".join(f"{h} {p} {u}: {c} calls" for (h, p, u), c in
                       sorted(mine.benign_callers.items(), key=lambda kv: -kv[1]))
    return Section(
        rows,
        notes=[f"A policy learned from the first {LEARN_DAYS} days of the scenario (callers "
               "seen on 2+ hosts or 2+ days, their request classes, the known-agent catalog) "
               "with default deny, applied to the remaining days by Policy.decide, the "
               "decision the agent and the kernel projection share; the static equivalents "
               "as the module docstring of bench/enforce_bench.py models them."],
        details=[("benign callers the learned policy denies", listed or "(none)"),
                 ("attack actors the learned policy lets through", "\n".join(
                     f"{a.id} ({a.kind}): {a.description}" for a in sc.actors
                     if a.id in actors_after and a.id not in mine.blocked) or "(none)")],
    )
