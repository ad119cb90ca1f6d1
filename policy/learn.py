"""A policy proposed from the model's history: one allow rule per caller the fleet has
seen often enough, with the request classes it asked for, and the known-agent catalog.

The model keeps, per caller combination (name, executable, user, parent, image,
namespace), its decayed calls, active days, hosts and first sighting; per caller (without
the namespace) the request classes it asked for. A rule is learned for a caller seen on
at least `min_hosts` hosts or on `min_days` days: a one-off (an attacker's curl in the
history) is listed in the file as a comment, never allowed by itself. The model does not
keep which endpoint each caller reached, so learned rules cover every endpoint.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from policy.model import ALLOW, ANY, Origin, Policy, Rule
from scoring.detectors import DETECTOR_NAMES
from scoring.known_callers import KNOWN_CALLERS, KnownCallerCatalog, comm
from scoring.rarity import DAY, RarityTable, Sketch, exact_hosts, hosts_len
from scoring.scorer import Scorer


@dataclass(frozen=True, slots=True)
class LearnOptions:
    min_hosts: int = 2
    min_days: int = 2
    catalog: bool = True  # add the known-agent catalog's agents as rules
    source: str = "a model state"


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def day_text(day: int) -> str:
    return dt.datetime.fromtimestamp(day * DAY, dt.UTC).strftime("%Y-%m-%d")


@dataclass(slots=True)
class _Seen:
    """One caller's evidence, summed over the combinations that make it."""

    calls: float = 0.0
    days: float = 0.0
    first_seen: float = float("inf")
    last_day: int = -1
    host_names: set = field(default_factory=set)
    sketch_hosts: int = 0

    @property
    def hosts(self) -> int:
        return max(len(self.host_names), self.sketch_hosts)


def weight_now(scorer: Scorer) -> float:
    """What the stored counts are multiplied by at the model's last event."""
    clock = scorer.clock
    if clock.ref is None or scorer.last_ts is None:
        return 1.0
    return 2.0 ** ((scorer.last_ts - clock.ref) / clock.half_life)


def table(scorer: Scorer, detector: str) -> RarityTable:
    return scorer.tables[DETECTOR_NAMES.index(detector)]


@dataclass(frozen=True, slots=True)
class Who:
    name: str | None
    exe: str | None
    user: str | None
    image: str | None
    namespace: str | None


def callers(scorer: Scorer) -> dict[Who, _Seen]:
    """Every caller of the model with its evidence (calls and days decayed to the last
    event, as the scorer weighs them)."""
    w = weight_now(scorer)
    out: dict[Who, _Seen] = {}
    for value, e in combinations(scorer):
        name, exe, user, _parent, image, namespace = _tuple(value, 6)
        seen = out.setdefault(Who(name, exe, user, image, namespace), _Seen())
        seen.calls += e.n / w
        seen.days += e.days / w
        seen.first_seen = min(seen.first_seen, e.first_seen)
        seen.last_day = max(seen.last_day, e.day)
        if e.hosts is not None and e.hosts.__class__ is Sketch:
            seen.sketch_hosts = max(seen.sketch_hosts, hosts_len(e.hosts))
        else:
            seen.host_names.update(h.name for h in exact_hosts(e.hosts))
    return out


def combinations(scorer: Scorer) -> list[tuple[Hashable, Any]]:
    """Every caller combination of rare_combination with its entry. The model also learns
    each event at coarser levels of identity (without executable and parent, without the
    user too: contexts of their own), so that an event lacking those fields can be judged;
    a coarse combination is a caller of its own only when no finer one accounts for it (a
    caller whose executable was never established), else it would widen a rule to every
    executable of that name."""
    contexts = dict(table(scorer, "rare_combination").items())
    out = [(v, e) for v, e in (contexts[None].values.items() if None in contexts else ())]
    finer = {_coarse(v, 1) for v, _ in out}
    finest = {_coarse(v, 2) for v, _ in out}
    levels = [c for c in contexts if c is not None]
    for ctx in sorted(levels, key=str):
        for v, e in contexts[ctx].values.items():
            t = _tuple(v, 6)
            level = 2 if t[2] is None else 1
            if (level == 1 and _coarse(t, 1) in finer) or _coarse(t, 2) in finest:
                continue
            out.append((v, e))
            finest.add(_coarse(t, 2))
    return out


def _coarse(v: Hashable, level: int) -> tuple:
    name, _exe, user, _parent, image, namespace = _tuple(v, 6)
    return (name, image, namespace) if level == 2 else (name, user, image, namespace)


def classes_by_caller(scorer: Scorer) -> dict[tuple, dict[str, float]]:
    """(name, exe, user, image) -> request class -> calls."""
    w = weight_now(scorer)
    out: dict[tuple, dict[str, float]] = {}
    for ctx, c in table(scorer, "rare_request_class").items():
        name, exe, user, _parent, image = _tuple(ctx, 5)
        per = out.setdefault((name, exe, user, image), {})
        for cls, e in c.values.items():
            if isinstance(cls, str):
                per[cls] = per.get(cls, 0.0) + e.n / w
    return out


def _tuple(value: Hashable, n: int) -> tuple:
    if isinstance(value, tuple) and len(value) == n:
        return value
    return (None,) * n


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:48] or "caller"


def _unique(base: str, used: set[str]) -> str:
    name, i = base, 2
    while name in used:
        name, i = f"{base}-{i}", i + 1
    used.add(name)
    return name


def describe_who(who: Who) -> str:
    where = (f" in image {who.image or '-'} namespace {who.namespace or '-'}"
             if who.image or who.namespace else "")
    return (f"{who.name or '?'} ({who.exe or 'unknown executable'}) "
            f"user {who.user or '?'}{where}")


def learn_policy(scorer: Scorer, options: LearnOptions = LearnOptions()) -> Policy:
    """The proposed policy (default allow: the operator chooses to deny)."""
    known = KnownCallerCatalog()
    classes = classes_by_caller(scorer)
    rules: list[Rule] = []
    not_learned: list[str] = []
    used: set[str] = set()
    ranked = sorted(callers(scorer).items(), key=lambda kv: (-kv[1].hosts, -kv[1].calls,
                                                             describe_who(kv[0])))
    for who, seen in ranked:
        days = round(seen.days)
        calls = round(seen.calls)
        if seen.hosts < options.min_hosts and days < options.min_days:
            not_learned.append(
                f"{describe_who(who)}: {calls} call{'s' if calls != 1 else ''} on "
                f"{seen.hosts} host{'s' if seen.hosts != 1 else ''}, {days} active "
                f"day{'s' if days != 1 else ''}, first {rfc3339(seen.first_seen)}")
            continue
        asked = classes.get((who.name, who.exe, who.user, who.image), {})
        agent = None if who.name is None else known.lookup(
            who.name, who.exe, who.image, who.image is not None or who.namespace is not None)
        comment = None
        if asked:
            cls = tuple(sorted(asked))
        else:
            cls = (ANY,)
            comment = "no request of this caller was seen (connections only): every class"
        rules.append(Rule(
            name=_unique("learned-" + _slug(who.name or who.exe or "caller"), used),
            action=ALLOW, process=who.name, executable=who.exe, user=who.user,
            image=who.image, namespace=who.namespace,
            container=True if (who.image or who.namespace) else None,
            endpoints=(ANY,), classes=cls,
            origin=Origin("learned", seen.hosts, calls, rfc3339(seen.first_seen),
                          day_text(seen.last_day) if seen.last_day >= 0 else None,
                          agent.vendor if agent else None),
            comment=comment,
        ))
    if options.catalog:
        for agent in KNOWN_CALLERS:
            for exe in agent.executables:
                images = agent.images if not agent.host else (None, *agent.images)
                for image in images or (None,):
                    rules.append(Rule(
                        name=_unique("catalog-" + _slug(agent.name), used), action=ALLOW,
                        process=comm(agent.name), executable=exe, image=image,
                        container=image is not None, endpoints=(ANY,), classes=(ANY,),
                        origin=Origin("catalog", vendor=agent.vendor),
                    ))
    span = ""
    if scorer.first_ts is not None and scorer.last_ts is not None:
        span = f" {rfc3339(scorer.first_ts)} to {rfc3339(scorer.last_ts)}"
    header = (
        "imdswatch policy: who may ask the metadata service for what.",
        f"Proposed by `imdswatch policy generate` from {options.source}",
        f"(history{span}):" if span else "(no history):",
        f"{len(rules) - sum(r.origin.kind == 'catalog' for r in rules)} callers learned "
        f"(seen on >= {options.min_hosts} hosts or >= {options.min_days} days), "
        f"{len(not_learned)} not learned, "
        f"{sum(r.origin.kind == 'catalog' for r in rules)} known-agent catalog rules.",
        "Review it and keep it in git. Rules are read in order; the first that covers a",
        "call decides it. A rule's absent fields match anything; executable, image and",
        "namespace take globs; classes: credentials, token, identity, user-data, session",
        "(the IMDSv2 token handshake), metadata, other, or \"*\".",
        "Check it with `imdswatch policy plan` before `imdswatch run --enforce`.",
    )
    return Policy(tuple(rules), ALLOW, header, tuple(not_learned))
