"""The policy file: TOML the operator reads, edits and keeps in git.

Reading refuses anything it does not understand (an unknown key, a class or endpoint the
catalog does not have, two rules of one name) with the file, the rule and the reason:
a policy that can deny must never be half-read. Writing puts each rule's origin and
evidence beside it, as keys and as a comment a reviewer reads first.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tomllib
from collections.abc import Iterable
from typing import Any

from policy.model import (
    ACTIONS,
    AGENT_MODES,
    ALLOW,
    ANY,
    CLASSES,
    ORIGINS,
    Origin,
    Policy,
    Rule,
)

VERSION = 1
MAX_BYTES = 4 << 20  # a policy is written by people and tools, not a data dump
MAX_RULES = 10_000
_RULE_KEYS = frozenset((
    "name", "action", "process", "executable", "user", "image", "namespace", "container",
    "endpoints", "classes", "origin", "hosts", "calls", "since", "last_seen", "vendor",
    "comment",
))
_POLICY_KEYS = frozenset(("version", "default", "agents"))


class PolicyError(ValueError):
    """A policy file that cannot be used, with where and why."""


def load_policy(path: str | os.PathLike, endpoints: Iterable[Any] = ()) -> Policy:
    """Read and check a policy file. `endpoints` (the catalog) names the endpoint ids and
    addresses a rule may name; empty: not checked."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise PolicyError(f"{source}: larger than {MAX_BYTES >> 20} MiB; not a policy file")
    return parse_policy(raw, source, endpoints)


def parse_policy(raw: bytes | str, source: str = "policy",
                 endpoints: Iterable[Any] = ()) -> Policy:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    known_endpoints = _endpoint_names(endpoints)
    unknown = set(doc) - {"policy", "rule"}
    if unknown:
        raise PolicyError(f"{source}: unknown table or key {sorted(unknown)[0]!r} "
                          "(a policy has [policy] and [[rule]] entries)")
    head = doc.get("policy", {})
    if not isinstance(head, dict):
        raise PolicyError(f"{source}: [policy] must be a table")
    bad = set(head) - _POLICY_KEYS
    if bad:
        raise PolicyError(f"{source}: [policy] has unknown key {sorted(bad)[0]!r}")
    version = head.get("version", VERSION)
    if version != VERSION:
        raise PolicyError(f"{source}: [policy] version {version!r} is not one this imdswatch "
                          f"reads ({VERSION})")
    default = head.get("default", ALLOW)
    if default not in ACTIONS:
        raise PolicyError(f"{source}: [policy] default must be \"allow\" or \"deny\", "
                          f"not {default!r}")
    agents = head.get("agents", "allow")
    if agents not in AGENT_MODES:
        raise PolicyError(f"{source}: [policy] agents must be \"allow\" or \"policy\", "
                          f"not {agents!r}")
    rules_raw = doc.get("rule", [])
    if not isinstance(rules_raw, list):
        raise PolicyError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    if len(rules_raw) > MAX_RULES:
        raise PolicyError(f"{source}: {len(rules_raw)} rules, more than {MAX_RULES}")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, r in enumerate(rules_raw, 1):
        rule = _rule(r, f"{source}: rule {i}", known_endpoints)
        if rule.name in names:
            raise PolicyError(f"{source}: rule {i}: name {rule.name!r} is used by an earlier "
                              "rule (names identify the deciding rule in events)")
        names.add(rule.name)
        rules.append(rule)
    return Policy(tuple(rules), default, agents=agents)


def _endpoint_names(endpoints: Iterable[Any]) -> frozenset[str]:
    names: set[str] = set()
    for e in endpoints:
        names.add(e.id)
        names.add(e.address)
    return frozenset(names)


def _text(r: dict, key: str, where: str, required: bool = False) -> str | None:
    v = r.get(key)
    if v is None:
        if required:
            raise PolicyError(f"{where}: {key!r} is required")
        return None
    if isinstance(v, dt.datetime | dt.date):
        return v.isoformat()
    if not isinstance(v, str) or not v or len(v) > 4096:
        raise PolicyError(f"{where}: {key!r} must be a non-empty string, not {v!r:.80}")
    if any(ord(ch) < 32 for ch in v):
        raise PolicyError(f"{where}: {key!r} holds a control character")
    return v


def _count(r: dict, key: str, where: str) -> int | None:
    v = r.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise PolicyError(f"{where}: {key!r} must be a whole number >= 0, not {v!r:.80}")
    return v


def _names(r: dict, key: str, where: str, allowed: frozenset[str] | None) -> tuple[str, ...]:
    v = r.get(key, [ANY])
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise PolicyError(f"{where}: {key!r} must be a non-empty list of strings "
                          f"(\"*\" for all), not {v!r:.80}")
    if ANY in v:
        return (ANY,)
    if allowed:
        for x in v:
            if x not in allowed:
                raise PolicyError(f"{where}: {key} entry {x!r} is not one of "
                                  f"{', '.join(sorted(allowed))}")
    return tuple(dict.fromkeys(v))


def _rule(r: Any, where: str, known_endpoints: frozenset[str]) -> Rule:
    if not isinstance(r, dict):
        raise PolicyError(f"{where}: must be a table")
    bad = set(r) - _RULE_KEYS
    if bad:
        raise PolicyError(f"{where}: unknown key {sorted(bad)[0]!r} (a rule has "
                          f"{', '.join(sorted(_RULE_KEYS))})")
    name = _text(r, "name", where, required=True)
    assert name is not None
    where = f"{where} ({name})"
    action = r.get("action", ALLOW)
    if action not in ACTIONS:
        raise PolicyError(f"{where}: action must be \"allow\" or \"deny\", not {action!r:.80}")
    container = r.get("container")
    if container is not None and not isinstance(container, bool):
        raise PolicyError(f"{where}: 'container' must be true or false")
    user = _text(r, "user", where)
    if isinstance(r.get("user"), int) and not isinstance(r.get("user"), bool):
        user = str(r["user"])
    origin_kind = r.get("origin", "operator")
    if origin_kind not in ORIGINS:
        raise PolicyError(f"{where}: origin must be one of {', '.join(ORIGINS)}, "
                          f"not {origin_kind!r:.80}")
    origin = Origin(origin_kind, _count(r, "hosts", where), _count(r, "calls", where),
                    _text(r, "since", where), _text(r, "last_seen", where),
                    _text(r, "vendor", where))
    return Rule(
        name=name, action=action, process=_text(r, "process", where),
        executable=_text(r, "executable", where), user=user,
        image=_text(r, "image", where), namespace=_text(r, "namespace", where),
        container=container,
        endpoints=_names(r, "endpoints", where, known_endpoints or None),
        classes=_names(r, "classes", where, frozenset(CLASSES)),
        origin=origin, comment=_text(r, "comment", where),
    )


# -- writing -------------------------------------------------------------------------------

def _q(v: str) -> str:
    # A JSON string is a TOML basic string (same escapes), on one line.
    return json.dumps(v, ensure_ascii=False)


def _list(vs: tuple[str, ...]) -> str:
    return "[" + ", ".join(_q(v) for v in vs) + "]"


def origin_sentence(o: Origin) -> str:
    if o.kind == "learned":
        bits = ["learned"]
        if o.calls is not None:
            bits.append(f"{o.calls} call{'s' if o.calls != 1 else ''}")
        if o.hosts is not None:
            bits.append(f"on {o.hosts} host{'s' if o.hosts != 1 else ''}")
        if o.since:
            bits.append(f"since {o.since}")
        if o.last_seen:
            bits.append(f"last {o.last_seen}")
        text = " ".join(bits)
        return text + (f"; a known {o.vendor} agent" if o.vendor else "")
    if o.kind == "catalog":
        return f"the known-agent catalog ({o.vendor or 'vendor'} agent)"
    return "the operator"


def dump_policy(policy: Policy) -> str:
    out = [f"# {h}" if h else "#" for h in policy.header]
    if out:
        out.append("")
    out += [
        "[policy]",
        f"version = {VERSION}",
        "# \"allow\": only calls a deny rule covers are denied; \"deny\": every call no",
        "# allow rule covers is denied too. Nothing is enforced unless the agent runs with",
        "# --enforce audit (reported only) or --enforce deny.",
        f"default = {_q(policy.default)}",
        "# \"allow\": the node's own agents (the known-agent catalog, by name, executable and",
        "# where they run) are never denied by the default, only by a rule naming them;",
        "# \"policy\": they follow the rules and the default like any caller.",
        f"agents = {_q(policy.agents)}",
    ]
    for rule in policy.rules:
        out.append("")
        out.append(f"# {origin_sentence(rule.origin)}")
        out.append("[[rule]]")
        out.append(f"name = {_q(rule.name)}")
        out.append(f"action = {_q(rule.action)}")
        for key in ("process", "executable", "user", "image", "namespace"):
            v = getattr(rule, key)
            if v is not None:
                out.append(f"{key} = {_q(v)}")
        if rule.container is not None:
            out.append(f"container = {'true' if rule.container else 'false'}")
        out.append(f"endpoints = {_list(rule.endpoints)}")
        out.append(f"classes = {_list(rule.classes)}")
        o = rule.origin
        out.append(f"origin = {_q(o.kind)}")
        for key in ("hosts", "calls"):
            v = getattr(o, key)
            if v is not None:
                out.append(f"{key} = {v}")
        for key in ("since", "last_seen", "vendor"):
            v = getattr(o, key)
            if v is not None:
                out.append(f"{key} = {_q(v)}")
        if rule.comment:
            out.append(f"comment = {_q(rule.comment)}")
    if policy.not_learned:
        out.append("")
        out.append("# Seen in the history but not learned (too little evidence); add a rule")
        out.append("# by hand to allow one:")
        out += [f"#   {line}" for line in policy.not_learned]
    return "\n".join(out) + "\n"


def write_policy(path: str | os.PathLike, policy: Policy) -> None:
    """Atomically (a crash mid-write leaves the old file)."""
    from scoring.state import write_atomic

    write_atomic(path, dump_policy(policy).encode())
