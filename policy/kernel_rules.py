"""The policy projected onto what the kernel can check at connect time: the executable's
(device, inode) or file name, the process's name, the uid.

The projection is safe by construction: the kernel never denies a connect the policy
allows. An allow rule's entries may cover more callers than the rule (fields the kernel
cannot read, image, namespace, endpoints and classes, are dropped, which widens it); a
deny rule is put in the kernel only when its entries cover exactly its callers (an
executable that resolves on this host, a user, and nothing else, for every class and
endpoint; or a namespace alone, denied by the cgroups of that namespace's pods); the rest
stay audit-only (reported as would-be denials). The kernel applies
every allow entry before any deny entry, which can only allow more than the policy's
first-match order.

An executable path is resolved on this host (globs expanded): a rule for host processes
only (`container = false`) matches that inode and nothing else; otherwise the file name is
allowed too, since a container's copy of the same program has another inode. A path
that does not resolve here is allowed by file name (or, for a glob in the file name, by
the process name, else by user alone).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from policy.model import ALLOW, ANY, Policy, Rule
from policy.request_patterns import ALL_CLASSES, class_bit, patterns
from scoring.known_callers import comm
from tracer.enforcer import (
    ANY_UID,
    KIND_COMM,
    KIND_EXE_NAME,
    KernelRules,
    RequestPattern,
    kernel_file_id,
)

_GLOB = frozenset("*?[")
MAX_FILES_PER_RULE = 64


@dataclass
class Projection:
    rules: KernelRules
    notes: list[str] = field(default_factory=list)  # what the kernel does differently
    # Deny rules naming only a namespace (glob, rule number), in policy order: the kernel
    # denies them by the caller's cgroup, which the agent attributes to a pod's namespace.
    deny_namespaces: list[tuple[str, int]] = field(default_factory=list)


def _uids(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) > 2 and parts[2].isdigit():
                    out.setdefault(parts[0], int(parts[2]))
    except OSError:
        pass
    return out


def _uid(rule: Rule, names: dict[str, int]) -> int | None:
    """The rule's uid, ANY_UID without a user, None when the user is a name unknown here."""
    if rule.user is None:
        return ANY_UID
    u = rule.user[4:] if rule.user.startswith("uid:") else rule.user
    if u.isdigit():
        return int(u)
    return names.get(rule.user)


def _files(pattern: str, root: str) -> list[tuple[int, int]]:
    """The (dev_t, inode) the kernel sees for each regular file the pattern names."""
    path = os.path.join(root, pattern.lstrip("/"))
    found = glob.glob(path) if _GLOB & set(pattern) else [path]
    out = []
    for p in found[:MAX_FILES_PER_RULE]:
        if not os.path.isfile(p):
            continue
        file_id = kernel_file_id(p)
        if file_id is not None:
            out.append(file_id)
    return out


def request_patterns() -> list[RequestPattern]:
    """The request classifier's rules as the kernel's sk_msg program matches them."""
    return [RequestPattern(tuple(p.hashes()), p.rest, p.flags, p.family, p.mask)
            for p in patterns()]


def _classes(rule: Rule) -> int:
    if rule.all_classes():
        return ALL_CLASSES
    return sum(class_bit(c) for c in set(rule.classes))


class _Entries:
    """Adds allow entries with the rule's classes, merged (OR) with what the same entry
    already allows."""

    def __init__(self, kr: KernelRules, mask: int) -> None:
        self.kr, self.mask = kr, mask

    def _merge(self, key: object) -> None:
        m = self.kr.mask(key) if self._present(key) else 0
        m |= self.mask
        if m == ALL_CLASSES:
            self.kr.classes.pop(key, None)
        else:
            self.kr.classes[key] = m

    def _present(self, key: object) -> bool:
        kr = self.kr
        return key in kr.allow_exe or key in kr.allow_name or key in kr.allow_uid

    def exe(self, key: tuple[int, int, int]) -> None:
        self._merge(key)
        self.kr.allow_exe.add(key)

    def name(self, key: tuple[str, int, int]) -> None:
        self._merge(key)
        self.kr.allow_name.add(key)

    def uid(self, uid: int) -> None:
        self._merge(uid)
        self.kr.allow_uid.add(uid)


def project(policy: Policy, passwd: str = "/etc/passwd", root: str = "/") -> Projection:
    names = _uids(passwd)
    kr = KernelRules(default_deny=policy.default != ALLOW)
    notes: list[str] = []
    if policy.agents == "allow" and kr.default_deny:
        _agents(root, kr)
    deny_namespaces: list[tuple[str, int]] = []
    for number, rule in enumerate(policy.rules, 1):
        uid = _uid(rule, names)
        if rule.action != ALLOW and _namespace_only(rule):
            deny_namespaces.append((rule.namespace, number))  # type: ignore[arg-type]
            continue
        if rule.action == ALLOW:
            _allow(rule, ANY_UID if uid is None else uid, root, kr, notes)
            if uid is None:
                notes.append(f"rule {rule.name}: user {rule.user} is unknown here: allowed "
                             "for every user in the kernel")
        else:
            _deny(rule, number, uid, root, kr, notes)
    return Projection(kr, notes, deny_namespaces)


def _namespace_only(rule: Rule) -> bool:
    """A deny of every class and endpoint for the pods of a namespace, and nothing else:
    exact by the caller's cgroup once the agent knows the pod's namespace."""
    return (rule.namespace is not None and rule.all_classes() and ANY in rule.endpoints
            and rule.executable is None and rule.process is None and rule.image is None
            and rule.user is None and rule.container is not False)


def _agents(root: str, kr: KernelRules) -> None:
    """`agents = "allow"`: the known-agent catalog allowed in the kernel. A host agent's
    executables by inode where they resolve here; an agent shipped as an image (or one not
    installed here) by its executable's file name, or, for a path ending in a glob, by its
    process name: wider than the catalog, never narrower."""
    from scoring.known_callers import KNOWN_CALLERS

    add = _Entries(kr, ALL_CLASSES)
    for agent in KNOWN_CALLERS:
        for exe in agent.executables:
            files = _files(exe, root) if agent.host else []
            for file_id in files:
                add.exe((*file_id, ANY_UID))
            if files and not agent.images:
                continue
            base = os.path.basename(exe)
            if base and not _GLOB & set(base):
                add.name((base, ANY_UID, KIND_EXE_NAME))
            else:
                add.name((comm(agent.name), ANY_UID, KIND_COMM))


def _allow(rule: Rule, uid: int, root: str, kr: KernelRules, notes: list[str]) -> None:
    """Allow entries for the rule's callers, each allowing the rule's request classes (the
    kernel refuses a request of another class on their connections when the default is
    deny; endpoints are not checked: every endpoint gets the rule's classes)."""
    add = _Entries(kr, _classes(rule))
    if rule.image is not None or rule.namespace is not None:
        notes.append(f"rule {rule.name}: image and namespace are not checked in the kernel "
                     "(its allow covers the executable or process wherever it runs)")
    if rule.executable is not None:
        files = _files(rule.executable, root)
        for file_id in files:
            add.exe((*file_id, uid))
        base = os.path.basename(rule.executable)
        if not files or rule.container is not False:
            if base and not _GLOB & set(base):
                add.name((base, uid, KIND_EXE_NAME))
                return
            for st_name in {os.path.basename(p) for p in glob.glob(
                    os.path.join(root, rule.executable.lstrip("/")))[:MAX_FILES_PER_RULE]}:
                add.name((st_name, uid, KIND_EXE_NAME))
            if files:
                return
        else:
            return
    if rule.process is not None:
        add.name((comm(rule.process), uid, KIND_COMM))
        return
    if uid != ANY_UID:
        add.uid(uid)
        return
    kr.allow_all = True
    notes.append(f"rule {rule.name}: names no executable, process or user the kernel can "
                 "check, so the kernel allows every caller (enforcement in the kernel is "
                 "off while this rule is in the policy)")


def _deny(rule: Rule, number: int, uid: int | None, root: str, kr: KernelRules,
          notes: list[str]) -> None:
    exact = (rule.all_classes() and ANY in rule.endpoints and uid is not None
             and rule.process is None and rule.image is None and rule.namespace is None
             and rule.container is not True)
    if exact and rule.executable is not None:
        files = _files(rule.executable, root)
        # Only a host-only rule is exact by inode; a copy in a container would escape it,
        # which is fine for a deny (the kernel may deny less than the policy).
        for file_id in files:
            kr.deny_exe[(*file_id, uid)] = number  # type: ignore[index]
        if files:
            return
    elif exact and uid is not None and uid != ANY_UID:
        kr.deny_uid[uid] = number
        return
    elif exact and rule.executable is None and uid == ANY_UID:
        kr.default_deny = True  # a deny of everyone for everything: the default, from here on
        notes.append(f"rule {rule.name}: denies every caller: the kernel denies what no "
                     "allow rule covers")
        return
    notes.append(f"rule {rule.name}: not enforced in the kernel (it names a class, endpoint, "
                 "process, image or namespace, or an executable not on this host): reported "
                 "as would_deny only")
