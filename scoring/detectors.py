"""The detectors: which (context, value) each one judges, what its alert is called, and
the sentence that explains a score.

Each detector is one rarity question over the fleet's history:

  detector           context        value                       catches
  rare_process       whole fleet    process name                the seed rule: a new caller
  rare_executable    process name   executable path             masquerading (ssm-agent in /tmp)
  rare_process_user  process name   user                        curl run by www-data
  rare_user          whole fleet    user                        Elastic's companion user rule
  rare_parent        process name   parent process name         python3 started by a web server
  rare_container     process name   container image, namespace  a tool in an unexpected pod
  exe_mismatch       process name   kernel's executable = /proc's  a copy in /tmp that connects,
                                                                then execs the real agent
  rare_combination   whole fleet    all of the above together   a new way of calling at all

and, for events that carry the HTTP request (contract section 1), per caller (name +
executable + user + parent + image):

  rare_request_class caller         request class               a web app asked for credentials
  unguarded_request  caller, class  anti-SSRF header present    SSRF through a caller that
                                                                always sends the header
  new_user_agent     caller         User-Agent                  a tool speaking for the caller
  unguarded_credential_request                                  credentials, tokens or identity
                     caller, class  anti-SSRF header present    without the header from outside
                                                                the known-agent catalog: alerts
                                                                without history (a fresh node)

Connection events (no request seen) give these detectors no value, so they are scored
exactly as before the request detectors existed.

The last one judges the whole combination (name, executable, user, parent, image,
namespace): a context built from a process's own few calls (curl, run at boot by a
handful of nodes) has too little history for any single new value to be surprising,
while a combination the whole fleet has never produced is, measured against every
call the fleet has made.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from scoring.durations import format_duration
from scoring.endpoints import (
    REQUEST_CLASSES,
    SENSITIVE_CLASSES,
    EndpointCatalog,
    classify_request,
)
from scoring.events import Event
from scoring.rarity import Rarity, RarityTable

# The calibration maps surprise (-log10 p) to 0-100 with a logistic curve: one chance in
# ~300 scores 50, one in 3,000 about 94, one in 30 about 3. Elastic's record scores use the
# same idea (a normalised probability), so its threshold of 50 keeps its meaning here.
SURPRISE_AT_50 = 2.5
SURPRISE_SCALE = 0.36


def score_from_surprise(surprise: float) -> float:
    x = (surprise - SURPRISE_AT_50) / SURPRISE_SCALE
    if x < -40:
        return 0.0
    return 100.0 / (1.0 + math.exp(-x))


def image_repository(image: str | None) -> str | None:
    """`registry:5000/team/app:1.4@sha256:...` -> `registry:5000/team/app`: a new tag on
    every deploy must not look like a new image."""
    if not image:
        return None
    image = image.split("@", 1)[0]
    slash = image.rfind("/")
    colon = image.rfind(":")
    return image[:colon] if colon > slash else image


# A version in a path: a dotted number (`python3.11`, `agent-2.4.1`) or a path component
# that is all digits (a snap revision, `/snap/amazon-ssm-agent/7628/...`).
_VERSION = re.compile(r"\d+(?:\.\d+)+|(?<=/)\d+(?=/|$)")
# Where anyone can put a binary: a path there is never another version of a known one.
_WRITABLE = ("/tmp/", "/var/tmp/", "/dev/shm/", "/run/", "/home/", "/root/", "/proc/")


def writable_path(exe: str) -> bool:
    """True for a path where anyone can put a binary."""
    return exe.startswith(_WRITABLE)


# The suffixes controllers give the pods they make (Kubernetes' safe alphabet): a
# DaemonSet's, Job's or ReplicaSet's `name-x7k2p`, a Deployment's `name-<template hash>-x7k2p`
# (a CronJob's `name-<minute>-x7k2p`), a StatefulSet's `name-0`. A pod made by hand
# (`kubectl run`) has none: it is no workload's rollout.
_POD_SUFFIX = re.compile(r"-[bcdfghjklmnpqrstvwxz2456789]{5}$|-\d+$")
_OWNER_SUFFIX = re.compile(r"-[bcdfghjklmnpqrstvwxz2456789]{6,10}$|-\d{6,}$")


def workload_of(e: Event) -> str | None:
    """The workload an event's pod belongs to (its name without the suffixes its controller
    added), None when the event carries no Kubernetes workload identity (image, namespace
    and a controller-made pod, contract section 1)."""
    pod = e.pod
    if not pod or not e.image or not e.namespace:
        return None
    m = _POD_SUFFIX.search(pod)
    if m is None:
        return None
    owner = pod[:m.start()]
    return _OWNER_SUFFIX.sub("", owner) or owner or None


def version_key(exe: str | None) -> str | None:
    """The executable with its versions replaced by `#`: `/snap/x/1234/x` and `/snap/x/5678/x`
    are one program, as are `/usr/bin/python3.11` and `/usr/bin/python3.12`. None when
    the path holds no version (the key would be the path itself)."""
    if not exe or not exe.startswith("/") or exe.startswith(_WRITABLE):
        return None
    key = _VERSION.sub("#", exe)
    return key if key != exe else None


def probability_for_score(score: float) -> float:
    """The rarity probability that scores `score` (the inverse of the calibration)."""
    surprise = SURPRISE_AT_50 + SURPRISE_SCALE * math.log(score / (100.0 - score))
    return 10.0 ** -surprise


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    rule_name: str
    context: Callable[[Event], Hashable]
    value: Callable[[Event], Hashable]  # None: the event says nothing to this detector
    # True where a known caller's identity (name + executable) vouches for the value.
    vouched_by_known_caller: bool
    # The detector whose context lists the usual values for the reason ("curl is
    # otherwise only run by root"); None: this detector's own context.
    others_from: str | None = None
    # None: every event with a value is scored. Otherwise events for which it is False
    # are learned but not scored (a request WITH the anti-SSRF header is never suspicious
    # for being guarded, but it is the history an unguarded one is judged against).
    judges: Callable[[Event], bool] | None = None
    # None: the rarity of the value (RarityTable.probability). Otherwise the probability
    # this detector assigns, from its table (a fixed rule that history can only silence).
    probability: Callable[[RarityTable, Hashable, Hashable, float], float] | None = None
    # True: suspicious on its own, so it may alert with no history at all, during the
    # learning period too (no blind first day).
    history_free: bool = False
    # True: it judges the caller's whole identity (executable and parent among it). An
    # event lacking part of it is judged at a coarser level (`key_at`), which every more
    # complete event also teaches: a missing field is unknown, never a new value.
    coarsens: bool = False

    def describe(self, event: Event, r: Rarity, others: list[tuple[Hashable, float]],
                 history: float, hosts: int) -> str:
        return _DESCRIBE[self.name](event, r, others, _span(history, hosts))

    def key_at(self, e: Event, level: int) -> tuple[Hashable, Hashable]:
        """(context, value) of `e` at identity `level` (COMPLETE: its own). The coarser
        levels of rare_combination have contexts of their own, so their counts never mix
        with the complete combinations' (whose context is the whole fleet)."""
        if level == COMPLETE:
            return self.context(e), self.value(e)
        c = coarsened(e, level)
        if self.name == "rare_combination":
            return _LEVEL_CONTEXTS[level], self.value(c)
        return self.context(c), self.value(c)


# -- identity the event may lack ----------------------------------------------------------------

# The levels of identity an event can have (contract section 6: a field the agent could
# not establish is absent). COMPLETE: executable, parent and user known. WITHOUT_EXE_PARENT:
# the executable or the parent is missing (the short-lived caller's usual loss), judged as
# name, user and container. WITHOUT_USER: the user is missing too, judged as name and
# container.
COMPLETE, WITHOUT_EXE_PARENT, WITHOUT_USER = 0, 1, 2
_LEVEL_CONTEXTS = ("", "identity without executable and parent",
                   "identity without executable, parent and user")


def identity_level(e: Event) -> int:
    if e.user is None and not e.uid:
        return WITHOUT_USER
    if e.exe is None or e.parent_name is None:
        return WITHOUT_EXE_PARENT
    return COMPLETE


def identity_gaps(e: Event) -> list[str]:
    """The judged identity fields the event lacks, as a reason names them."""
    gaps = ["container"] if e.container_unknown else []
    if e.exe is None:
        gaps.append("executable")
    if e.parent_name is None:
        gaps.append("parent")
    if e.user is None and not e.uid:
        gaps.append("user")
    return gaps


def coarsened(e: Event, level: int) -> Event:
    """`e` as a coarser level knows it: the fields that level does not judge dropped."""
    c = Event(e.ts, e.dst_ip, e.name, e.dst_port, None, None, None, None, None, None,
                 e.user if level < WITHOUT_USER else None,
                 e.uid if level < WITHOUT_USER else None,
                 e.host, e.container_id, e.image, e.namespace, e.pod, e.cloud, None,
                 e.action, e.method, e.path, e.query, e.user_agent, e.guarded)
    c.container_unknown = e.container_unknown
    return c


def _span(history: float, hosts: int) -> str:
    return f"{format_duration(history)} of history on {hosts} host{'s' if hosts != 1 else ''}"


def _container_value(e: Event) -> Hashable:
    if e.container_unknown:
        return None  # unknown, not "the host": rare_container abstains
    return (image_repository(e.image), e.namespace)


def user_of(e: Event) -> str | None:
    """The user name, or `uid:N` when the uid has no name (a container's user, a deleted
    account): the user detectors must not switch off for want of a passwd entry."""
    if e.user:
        return e.user
    return f"uid:{e.uid}" if e.uid else None


def show_name(name: str | None) -> str:
    """A process name as a reason shows it: quoted when empty or odd (a name set with
    prctl can be "" or carry control characters), so the sentence stays readable."""
    if name is None:
        return "an unnamed process"
    if name == "" or not name.isprintable() or name != name.strip():
        return repr(name)
    return name


# -- the HTTP request ------------------------------------------------------------------------

# Requests are classified against the built-in catalog's endpoints by address (a custom
# endpoint gets every provider's path layout). Memoised: a fleet asks few distinct things;
# bounded, because paths come from the traced machine.
_BUILTIN = EndpointCatalog.from_config()
_CLASS_MEMO: dict[tuple, str] = {}
_CLASS_MEMO_LIMIT = 65536


def request_class(e: Event) -> str | None:
    """What the event's request asked for (a scoring.endpoints class), None for a
    connection event."""
    if e.method is None and e.path is None:
        return None
    key = (e.dst_ip, e.dst_port, e.method, e.path, e.query)
    cls = _CLASS_MEMO.get(key)
    if cls is None:
        endpoint = _BUILTIN.match(e.dst_ip, e.dst_port) if isinstance(e.dst_ip, str) else None
        cls = classify_request(endpoint, e.method, e.path, e.query)
        if len(_CLASS_MEMO) >= _CLASS_MEMO_LIMIT:
            _CLASS_MEMO.clear()
        _CLASS_MEMO[key] = cls
    return cls


# A caller is what runs, as far as the event tells: name, executable, user, image, and the
# parent. For an interpreter the name and executable say only "python3"; the program is
# told by what started it: the Azure agent's extension handler (python3 under waagent) and
# an operator's script (python3 under bash) are different callers, and what one of them
# asks for says nothing about what the other may ask for.
def _caller(e: Event) -> Hashable:
    return (e.name, e.exe, user_of(e), e.parent_name, image_repository(e.image))


def _class_value(e: Event) -> Hashable:
    return request_class(e)


def _caller_class(e: Event) -> Hashable:
    return (e.name, e.exe, user_of(e), e.parent_name, image_repository(e.image),
            request_class(e))


def _guard_value(e: Event) -> Hashable:
    if e.guarded is None or not e.is_request:
        return None
    return e.guarded


def _sensitive_guard_value(e: Event) -> Hashable:
    if e.guarded is None or request_class(e) not in SENSITIVE_CLASSES:
        return None
    return e.guarded


def _user_agent_value(e: Event) -> Hashable:
    if not e.is_request:
        return None
    return e.user_agent or ""


def _unguarded(e: Event) -> bool:
    return e.guarded is False


def _class_probability(table: RarityTable, ctx: Hashable, value: Hashable, w: float) -> float:
    """The rarity of a request class. Classes are a closed alphabet, so the predictive
    mass of "a class never asked for" is shared among the classes not yet seen (a
    Dirichlet prior over REQUEST_CLASSES) instead of going whole to this one: a caller
    that asked for metadata 400 times is not 0.5% likely to ask for credentials next,
    but a sixth of that."""
    p = table.probability(ctx, value, w)
    seen = table.distinct(ctx)
    if seen == 0 or table.count(ctx, value, w) > 0:
        return p
    unseen = len(REQUEST_CLASSES) - seen
    return p / unseen if unseen > 1 else p


# The fixed rule's score: high, not certain (a legitimate IMDSv1-only script exists).
RULE_SCORE = 90.0
_RULE_P = probability_for_score(RULE_SCORE)


def _never_unguarded(table: RarityTable, ctx: Hashable, value: Hashable, w: float) -> float:
    """The rule's probability: rare (RULE_SCORE) until this caller has itself made such
    an unguarded request; then the model has learnt it (an old script that only speaks
    IMDSv1 alerts once, fleet-wide, not forever)."""
    if table.count(ctx, False, w) > 0:
        return 1.0
    return _RULE_P


def _show(value: Hashable) -> str:
    if isinstance(value, tuple):  # (image, namespace)
        image, ns = value
        if image is None and ns is None:
            return "the host (no container)"
        return f"image {image or '-'} in namespace {ns or '-'}"
    return str(value)


def _others(others: list[tuple[Hashable, float]], value: Hashable) -> str:
    names = [_show(v) for v, _ in others if v != value]
    if not names:
        return ""
    return " or ".join(names[:3])


def _count(n: float) -> str:
    return f"{n:.0f}" if n >= 10 else f"{n:.1f}".rstrip("0").rstrip(".")


def _seen(r: Rarity) -> str:
    """'has never called' or 'called 3 times (on 1 of 38 hosts)'."""
    if r.n_value <= 0:
        return "has never called the metadata service"
    return (
        f"called the metadata service {_count(r.n_value)} time{'s' if r.n_value >= 1.5 else ''}"
        f" (on {r.hosts_value} of {r.hosts_context} hosts)"
    )


def _rare_process(e: Event, r: Rarity, others: list, span: str) -> str:
    return (
        f"{show_name(e.name)} {_seen(r)} in {span}; "
        f"the fleet's {_count(r.n_context)} calls came from {r.distinct} process names"
    )


def _rare_executable(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, e.exe)
    tail = f"; {show_name(e.name)} otherwise runs from {usual}" if usual else ""
    return f"{show_name(e.name)} from {e.exe} {_seen(r)} in {span}{tail}"


def _rare_process_user(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, user_of(e))
    tail = f"; {show_name(e.name)} is otherwise only run by {usual}" if usual else ""
    return f"{show_name(e.name)} run by {user_of(e)} {_seen(r)} in {span}{tail}"


def _rare_user(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, user_of(e))
    tail = f"; the usual callers run as {usual}" if usual else ""
    return f"user {user_of(e)} ({show_name(e.name)}) {_seen(r)} in {span}{tail}"


def _rare_parent(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, e.parent_name)
    tail = f"; {show_name(e.name)} is otherwise started by {usual}" if usual else ""
    return f"{show_name(e.name)} started by {e.parent_name} {_seen(r)} in {span}{tail}"


def _rare_container(e: Event, r: Rarity, others: list, span: str) -> str:
    where = _show(_container_value(e))
    usual = _others(others, _container_value(e))
    tail = f"; {show_name(e.name)} otherwise calls from {usual}" if usual else ""
    return f"{show_name(e.name)} in {where} {_seen(r)} in {span}{tail}"


def _combination_value(e: Event) -> Hashable:
    if e.container_unknown:
        return None  # the combination needs where it runs: unknown, so it abstains
    return (e.name, e.exe, user_of(e), e.parent_name, image_repository(e.image), e.namespace)


def _rare_combination(e: Event, r: Rarity, others: list, span: str) -> str:
    where = _show(_container_value(e))
    usual = _others(others, user_of(e))
    tail = f"; {show_name(e.name)} is otherwise only run by {usual}" if usual else ""
    # What is unknown is left out (the reason's tail says so), never shown as a value.
    exe = f" ({e.exe})" if e.exe is not None else ""
    user = f" run by {user_of(e)}" if user_of(e) is not None else ""
    parent = f" from {e.parent_name}" if e.parent_name is not None else ""
    return (f"{show_name(e.name)}{exe}{user}{parent} in {where}: this combination "
            f"{_seen(r)} in {span}{tail}")


def _who(e: Event) -> str:
    """The caller as the request detectors key it: name, executable, user, parent, image."""
    image = image_repository(e.image)
    where = f" in image {image}" if image else ""
    parent = f" from {show_name(e.parent_name)}" if e.parent_name is not None else ""
    exe = f" ({e.exe})" if e.exe is not None else ""
    user = f" run by {user_of(e)}" if user_of(e) is not None else ""
    return f"{show_name(e.name)}{exe}{user}{parent}{where}"


def _requests(n: float) -> str:
    return f"{_count(n)} request{'s' if n >= 1.5 or n == 0 else ''}"


def _rare_request_class(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, request_class(e))
    tail = f"; it otherwise asks for {usual}" if usual else ""
    return (f"{_who(e)} asked the metadata service for {request_class(e)}, which it asked "
            f"for in {_requests(r.n_value)} of its {_requests(r.n_context)} in {span}{tail}")


def _unguarded_request(e: Event, r: Rarity, others: list, span: str) -> str:
    return (f"{_who(e)} sent a {request_class(e)} request without the anti-SSRF header; "
            f"{_requests(r.n_context - r.n_value)} of its {_requests(r.n_context)} of this "
            f"kind in {span} carried it")


def _new_user_agent(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, _user_agent_value(e))
    tail = f"; it otherwise sends {usual}" if usual else ""
    return (f"{_who(e)} sent User-Agent {e.user_agent or '(none)'!r}, seen in "
            f"{_requests(r.n_value)} of its {_requests(r.n_context)} in {span}{tail}")


def _unguarded_credential_request(e: Event, r: Rarity, others: list, span: str) -> str:
    head = (f"{_who(e)} asked the metadata service for {request_class(e)} without the "
            f"anti-SSRF header, which is suspicious on its own (no history needed): it is "
            f"not a known agent")
    if r.n_context <= 0:
        return f"{head}, and it made no such request before in {span}"
    return (f"{head}, and its {_requests(r.n_context)} of this kind in {span} all carried "
            f"the header")


# -- the executable seen in the kernel against /proc -------------------------------------------

def _exe_mismatch_value(e: Event) -> Hashable:
    """Whether the executable the kernel saw at connect time is /proc's (None: unknown)."""
    if e.exe_mismatch is None:
        return None
    return "mismatch" if e.exe_mismatch else "match"


def _mismatched(e: Event) -> bool:
    return e.exe_mismatch is True


def _mismatch_probability(table: RarityTable, ctx: Hashable, value: Hashable,
                          w: float) -> float:
    """The rarity of a mismatch for this process name, never more common than the fixed
    rule (RULE_SCORE) until the name has mismatched before: a copy that connects and then
    execs the real agent is evidence without history (a fresh node, the learning period),
    while a binary replaced in place that keeps mismatching is learnt like any value."""
    p = table.probability(ctx, value, w)
    if table.count(ctx, value, w) > 0:
        return p
    return min(p, _RULE_P)


def _exe_mismatch(e: Event, r: Rarity, others: list, span: str) -> str:
    head = (f"{show_name(e.name)} connected from an executable named "
            f"{show_name(e.kernel_exe)} (read in the kernel at connect time), but /proc then "
            f"showed {show_name(e.proc_exe) if e.proc_exe else 'another executable'}: it "
            f"exec'd another binary, or its binary was replaced, after connecting, so the "
            f"executable it appears to run is not the one that called")
    if r.n_value <= 0:
        return f"{head}; {show_name(e.name)} never did so in {span}"
    return (f"{head}; {show_name(e.name)} did so in {_count(r.n_value)} of its "
            f"{_count(r.n_context)} calls in {span}")


_DESCRIBE = {
    "rare_combination": _rare_combination,
    "rare_process": _rare_process,
    "rare_executable": _rare_executable,
    "rare_process_user": _rare_process_user,
    "rare_user": _rare_user,
    "rare_parent": _rare_parent,
    "rare_container": _rare_container,
    "exe_mismatch": _exe_mismatch,
    "rare_request_class": _rare_request_class,
    "unguarded_request": _unguarded_request,
    "new_user_agent": _new_user_agent,
    "unguarded_credential_request": _unguarded_credential_request,
}

RULE_PROCESS = "Unusual Linux Process Calling the Metadata Service"
RULE_USER = "Unusual Linux User Calling the Metadata Service"

DETECTORS: tuple[Detector, ...] = (
    Detector("rare_process", RULE_PROCESS, lambda e: None, lambda e: e.name, True),
    Detector(
        "rare_executable",
        "Metadata Service Called From an Unusual Executable Path for a Known Process Name",
        lambda e: e.name, lambda e: e.exe, True,
    ),
    Detector(
        "rare_process_user",
        "Metadata Service Called by a Process Run by an Unusual User",
        lambda e: e.name, user_of, False,
    ),
    Detector("rare_user", RULE_USER, lambda e: None, user_of, False),
    Detector(
        "rare_parent",
        "Metadata Service Called by a Process With an Unusual Parent",
        lambda e: e.name, lambda e: e.parent_name, False,
    ),
    Detector(
        "rare_container",
        "Metadata Service Called by a Process in an Unusual Container Image or Namespace",
        lambda e: e.name, _container_value, False,
    ),
    # Evidence on its own, never vouched for by the known-caller catalog (the identity it
    # questions is what the catalog would vouch by); it may alert without history. Before
    # rare_combination, which it outranks: the reason says what happened.
    Detector(
        "exe_mismatch",
        "Metadata Service Called by a Process Whose Executable Changed After Connecting",
        lambda e: e.name, _exe_mismatch_value, False, judges=_mismatched,
        probability=_mismatch_probability, history_free=True,
    ),
    Detector(
        "rare_combination",
        "Metadata Service Called by an Unusual Combination of Process, User, Parent and Container",
        lambda e: None, _combination_value, True, others_from="rare_process_user",
        coarsens=True,
    ),
    # The request detectors never trust a known caller's identity: SSRF goes through
    # exactly the processes that call every day. Their rule names say what was asked.
    Detector(
        "rare_request_class",
        "Metadata Service Asked by a Process for a Kind of Data It Does Not Ask For",
        _caller, _class_value, False, probability=_class_probability, coarsens=True,
    ),
    Detector(
        "unguarded_request",
        "Metadata Request Without the Anti-SSRF Header the Process Always Sends",
        _caller_class, _guard_value, False, judges=_unguarded, coarsens=True,
    ),
    Detector(
        "new_user_agent",
        "Metadata Service Called With a User Agent New for the Process",
        _caller, _user_agent_value, False, coarsens=True,
    ),
    # A fixed rule, not a rarity: it fires with no history (a fresh node, the learning
    # period) and only a caller's own unguarded requests of the class silence it. Known
    # agents are vouched for (their score is scaled below the threshold).
    Detector(
        "unguarded_credential_request",
        "Credentials Requested From the Metadata Service Without the Anti-SSRF Header",
        _caller_class, _sensitive_guard_value, True, judges=_unguarded,
        probability=_never_unguarded, history_free=True, coarsens=True,
    ),
)

DETECTOR_NAMES = tuple(d.name for d in DETECTORS)
REQUEST_DETECTORS = frozenset(("rare_request_class", "unguarded_request", "new_user_agent",
                               "unguarded_credential_request"))
