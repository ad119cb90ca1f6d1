"""Which callers `run --enforce deny` may deny: the enforcement scope (`--enforce-scope`).

    all               every caller in --enforce-cgroup (the default)
    hosts             host processes: cgroups no container runtime or pod names
    pods              processes in a container or a Kubernetes pod
    namespaces=a,b    processes of pods in these Kubernetes namespaces

The kernel reads the caller's cgroup id at connect time; `ScopeTracker` lists the cgroups
below --enforce-cgroup whose processes are in scope, from their paths (tracer.cgroups) and,
for namespaces, the pod directory the agent keeps from the Kubernetes API. Fail open: a
cgroup not (yet) attributed is out of scope, so its processes are allowed in the kernel and
only audited: one created since the last scan, a pod whose namespace the API has not told
us, every pod while the API is unreachable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from tracer.cgroups import CgroupIdentity, identify

KINDS = ("all", "hosts", "pods", "namespaces")
MAX_NAMESPACES = 256
MAX_CGROUPS = 16383  # the kernel map's room (tracer.enforcer.MAX_ENTRIES) less the switch
# A Kubernetes namespace name: a DNS-1123 label.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class ScopeError(ValueError):
    """An unusable --enforce-scope; the message says which form is expected."""


@dataclass(frozen=True)
class Scope:
    kind: str = "all"
    namespaces: frozenset[str] = frozenset()

    @property
    def everyone(self) -> bool:
        return self.kind == "all"

    def covers(self, container_id: str | None, pod_uid: str | None,
               namespace: str | None) -> bool:
        """True when a caller so attributed may be denied."""
        if self.kind == "all":
            return True
        in_pod = container_id is not None or pod_uid is not None
        if self.kind == "hosts":
            return not in_pod
        if self.kind == "pods":
            return in_pod
        return namespace is not None and namespace in self.namespaces

    def __str__(self) -> str:
        if self.kind == "namespaces":
            return "namespaces=" + ",".join(sorted(self.namespaces))
        return self.kind


def parse_scope(text: str) -> Scope:
    value = text.strip()
    if value in ("all", "hosts", "pods"):
        return Scope(value)
    kind, sep, rest = value.partition("=")
    if kind.strip() == "namespaces" and sep:
        names = [n.strip() for n in rest.split(",") if n.strip()]
        if not names:
            raise ScopeError("namespaces= needs at least one namespace, e.g. namespaces=web,ci")
        if len(names) > MAX_NAMESPACES:
            raise ScopeError(f"at most {MAX_NAMESPACES} namespaces")
        bad = [n for n in names if not _NAMESPACE.fullmatch(n)]
        if bad:
            raise ScopeError(f"not a Kubernetes namespace name: {bad[0][:64]!r}")
        return Scope("namespaces", frozenset(names))
    raise ScopeError(f"{value[:64]!r}: expected all, hosts, pods or namespaces=NAME[,NAME...]")


class ScopeTracker:
    """The ids of the cgroups below `cgroup` (itself included) whose processes are in
    `scope` and, in the same walk, `denials`: the cgroups of pods whose namespace a deny
    rule names alone (`namespace_rules`: (glob, rule number) in policy order) -> the first
    such rule's number. `namespace_of(pod_uid)` names a pod's namespace, or None when
    unknown."""

    def __init__(self, scope: Scope, cgroup: str,
                 namespace_of: Callable[[str], str | None] | None = None) -> None:
        self.scope = scope
        self.cgroup = cgroup.rstrip("/") or "/"
        self.namespace_of = namespace_of
        self.truncated = False
        self.unattributed = 0  # pod cgroups whose namespace was unknown at the last scan
        self.namespace_rules: list[tuple[str, int]] = []
        self.denials: dict[int, int] = {}
        self._identities: dict[str, CgroupIdentity] = {}  # path -> what it names

    @property
    def needed(self) -> bool:
        """Whether the kernel needs the walk at all."""
        return not self.scope.everyone or bool(self.namespace_rules)

    def scan(self) -> set[int]:
        ids: set[int] = set()
        denials: dict[int, int] = {}
        self.truncated = False
        self.unattributed = 0
        try:
            stack = [(self.cgroup, os.stat(self.cgroup).st_ino)]
        except OSError:
            stack = []
        seen = 0
        while stack:
            d, ino = stack.pop()
            seen += 1
            if seen > MAX_CGROUPS * 4:
                self.truncated = True
                break
            try:
                # A directory entry's inode number is its cgroup's id (kernfs): no stat.
                with os.scandir(d) as it:
                    stack.extend((e.path, e.inode()) for e in it
                                 if e.is_dir(follow_symlinks=False))
            except OSError:
                continue  # removed meanwhile
            covered, rule = self._judge(d)
            if rule and len(denials) < MAX_CGROUPS:
                denials[ino] = rule
            if covered:
                if len(ids) >= MAX_CGROUPS:
                    self.truncated = True
                    break
                ids.add(ino)
        self.denials = denials
        return ids

    def _judge(self, path: str) -> tuple[bool, int]:
        """(in scope, the namespace deny rule's number or 0) for one cgroup."""
        ident = self._identities.get(path)
        if ident is None:
            if len(self._identities) > MAX_CGROUPS * 4:
                self._identities.clear()  # bounded: paths of removed cgroups go
            ident = self._identities[path] = identify(f"0::{path}\n")
        namespace = None
        wants = self.scope.kind == "namespaces" or self.namespace_rules
        if wants and ident.pod_uid is not None:
            namespace = self.namespace_of(ident.pod_uid) if self.namespace_of else None
            if namespace is None:
                self.unattributed += 1
        rule = 0
        if namespace is not None:
            rule = next((n for glob, n in self.namespace_rules if fnmatchcase(namespace, glob)),
                        0)
        return self.scope.covers(ident.container_id, ident.pod_uid, namespace), rule
