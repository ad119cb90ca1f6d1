"""The policy in memory: rules naming who may (or may not) reach which endpoints for
which request classes, and the one decision function every mode uses.

A rule's caller fields are all optional; an absent one matches anything. Rules are read
in file order and the first one that covers a call decides it; a call no rule covers gets
the policy's default, which is `allow` unless the operator wrote `default = "deny"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from scoring.detectors import image_repository
from scoring.endpoints import REQUEST_CLASSES
from scoring.known_callers import KnownCallerCatalog, comm

ALLOW = "allow"
DENY = "deny"
ACTIONS = (ALLOW, DENY)
ANY = "*"
# Where a rule came from: the model's history, the known-agent catalog, the operator.
ORIGINS = ("learned", "catalog", "operator")
# The rule name a call no rule covers is decided by (imdswatch.policy.rule).
DEFAULT_RULE = "default"
# The rule name of a known agent's call no rule covers, under `agents = "allow"`.
KNOWN_AGENT_RULE = "known-agent"
AGENT_MODES = ("allow", "policy")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a call, as far as the event tells (None: not established)."""

    name: str | None = None
    executable: str | None = None
    user: str | None = None  # user name
    uid: str | None = None
    image: str | None = None
    namespace: str | None = None
    container: bool = False

    @classmethod
    def of_event(cls, e) -> Caller:  # noqa: ANN001 - scoring.events.Event
        return cls(e.name, e.exe, e.user, e.uid, e.image, e.namespace,
                   e.container_id is not None or e.image is not None)

    def describe(self) -> str:
        parts = [self.name or "?", f"({self.executable or 'unknown executable'})"]
        user = self.user or (f"uid:{self.uid}" if self.uid is not None else None)
        parts.append(f"user {user or '?'}")
        if self.image or self.namespace:
            parts.append(f"image {image_repository(self.image) or '-'} "
                         f"namespace {self.namespace or '-'}")
        elif not self.container:
            parts.append("on the host")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a rule came from, and for a learned one the evidence behind it."""

    kind: str = "operator"
    hosts: int | None = None
    calls: int | None = None
    since: str | None = None  # RFC 3339
    last_seen: str | None = None  # RFC 3339 (day precision for a state)
    vendor: str | None = None  # catalog rules: whose agent


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: str = ALLOW
    process: str | None = None
    executable: str | None = None  # a path or a glob
    user: str | None = None  # a name, a uid number or uid:N
    image: str | None = None  # image repository (tag and digest ignored), glob
    namespace: str | None = None  # Kubernetes namespace, glob
    container: bool | None = None  # True: only in a container, False: only on the host
    endpoints: tuple[str, ...] = (ANY,)  # endpoint ids or addresses of the catalog
    classes: tuple[str, ...] = (ANY,)
    origin: Origin = field(default_factory=Origin)
    comment: str | None = None

    def matches_caller(self, c: Caller) -> bool:
        # Names compare as the kernel's comm (15 bytes): exports may carry the full name.
        if self.process is not None and (c.name is None or comm(c.name) != comm(self.process)):
            return False
        if self.executable is not None and (
                c.executable is None or not fnmatchcase(c.executable, self.executable)):
            return False
        if self.user is not None and not _user_matches(self.user, c):
            return False
        if self.container is not None and c.container != self.container:
            return False
        if self.image is not None:
            repo = image_repository(c.image)
            if repo is None or not fnmatchcase(repo, image_repository(self.image) or ""):
                return False
        if self.namespace is not None and (
                c.namespace is None or not fnmatchcase(c.namespace, self.namespace)):
            return False
        return True

    def matches_endpoint(self, endpoint: str | None, address: str | None = None) -> bool:
        """`endpoint` None: the history does not say which (a model state)."""
        if ANY in self.endpoints or endpoint is None:
            return True
        return endpoint in self.endpoints or (address is not None and address in self.endpoints)

    def all_classes(self) -> bool:
        return ANY in self.classes


def _user_matches(want: str, c: Caller) -> bool:
    if c.user is not None and want == c.user:
        return True
    uid = want[4:] if want.startswith("uid:") else want
    return uid.isdigit() and c.uid is not None and str(c.uid) == uid


_CATALOG = KnownCallerCatalog()


def _known_agent(c: Caller) -> bool:
    return c.name is not None and _CATALOG.lookup(c.name, c.executable, c.image,
                                                  c.container) is not None


@dataclass(frozen=True, slots=True)
class Decision:
    action: str
    rule: str  # the rule's name, or DEFAULT_RULE

    @property
    def denied(self) -> bool:
        return self.action == DENY


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default: str = ALLOW
    header: tuple[str, ...] = ()  # comment lines written at the top of the file
    # Callers the history showed but that were not learned (too little evidence): written
    # as comments for the reviewer, never enforced.
    not_learned: tuple[str, ...] = ()
    # "allow": the node's own agents (the known-agent catalog: name, executable and where
    # they run) are never denied by the default unless a rule names them (then the rules
    # decide); "policy": they follow the rules and the default like any caller.
    agents: str = "allow"

    def decide(self, caller: Caller, endpoint: str | None, request_class: str | None,
               address: str | None = None) -> Decision:
        """The verdict on one call. `request_class` None is a connect (no request seen
        yet): an allow rule for any class lets it connect, and only a deny rule for every
        class refuses it; the requests on it are decided one by one."""
        named = False  # some rule names this caller: the operator's policy speaks for it
        for rule in self.rules:
            if not rule.matches_caller(caller):
                continue
            named = True
            if not rule.matches_endpoint(endpoint, address):
                continue
            if request_class is None:
                if rule.action == ALLOW or rule.all_classes():
                    return Decision(rule.action, rule.name)
                continue
            if rule.all_classes() or request_class in rule.classes:
                return Decision(rule.action, rule.name)
        if (self.default == DENY and self.agents == "allow" and not named
                and _known_agent(caller)):
            return Decision(ALLOW, KNOWN_AGENT_RULE)
        return Decision(self.default, DEFAULT_RULE)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)


CLASSES = REQUEST_CLASSES
