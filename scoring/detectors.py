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
  rare_combination   whole fleet    all of the above together   a new way of calling at all

The last one judges the whole combination (name, executable, user, parent, image,
namespace): a context built from a process's own few calls (curl, run at boot by a
handful of nodes) has too little history for any single new value to be surprising,
while a combination the whole fleet has never produced is, measured against every
call the fleet has made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from scoring.durations import format_duration
from scoring.events import Event
from scoring.rarity import Rarity

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

    def describe(self, event: Event, r: Rarity, others: list[tuple[Hashable, float]],
                 history: float, hosts: int) -> str:
        return _DESCRIBE[self.name](event, r, others, _span(history, hosts))


def _span(history: float, hosts: int) -> str:
    return f"{format_duration(history)} of history on {hosts} host{'s' if hosts != 1 else ''}"


def _container_value(e: Event) -> Hashable:
    return (image_repository(e.image), e.namespace)


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
        f"{e.name} {_seen(r)} in {span}; "
        f"the fleet's {_count(r.n_context)} calls came from {r.distinct} process names"
    )


def _rare_executable(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, e.exe)
    tail = f"; {e.name} otherwise runs from {usual}" if usual else ""
    return f"{e.name} from {e.exe} {_seen(r)} in {span}{tail}"


def _rare_process_user(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, e.user)
    tail = f"; {e.name} is otherwise only run by {usual}" if usual else ""
    return f"{e.name} run by {e.user} {_seen(r)} in {span}{tail}"


def _rare_user(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, e.user)
    tail = f"; the usual callers run as {usual}" if usual else ""
    return f"user {e.user} ({e.name}) {_seen(r)} in {span}{tail}"


def _rare_parent(e: Event, r: Rarity, others: list, span: str) -> str:
    usual = _others(others, e.parent_name)
    tail = f"; {e.name} is otherwise started by {usual}" if usual else ""
    return f"{e.name} started by {e.parent_name} {_seen(r)} in {span}{tail}"


def _rare_container(e: Event, r: Rarity, others: list, span: str) -> str:
    where = _show(_container_value(e))
    usual = _others(others, _container_value(e))
    tail = f"; {e.name} otherwise calls from {usual}" if usual else ""
    return f"{e.name} in {where} {_seen(r)} in {span}{tail}"


def _combination_value(e: Event) -> Hashable:
    return (e.name, e.exe, e.user, e.parent_name, image_repository(e.image), e.namespace)


def _rare_combination(e: Event, r: Rarity, others: list, span: str) -> str:
    where = _show(_container_value(e))
    usual = _others(others, e.user)
    tail = f"; {e.name} is otherwise only run by {usual}" if usual else ""
    return (
        f"{e.name} ({e.exe or 'unknown executable'}) run by {e.user or 'an unknown user'} "
        f"from {e.parent_name or 'an unknown parent'} in {where}: this combination "
        f"{_seen(r)} in {span}{tail}"
    )


_DESCRIBE = {
    "rare_combination": _rare_combination,
    "rare_process": _rare_process,
    "rare_executable": _rare_executable,
    "rare_process_user": _rare_process_user,
    "rare_user": _rare_user,
    "rare_parent": _rare_parent,
    "rare_container": _rare_container,
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
        lambda e: e.name, lambda e: e.user, False,
    ),
    Detector("rare_user", RULE_USER, lambda e: None, lambda e: e.user, False),
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
    Detector(
        "rare_combination",
        "Metadata Service Called by an Unusual Combination of Process, User, Parent and Container",
        lambda e: None, _combination_value, True, others_from="rare_process_user",
    ),
)

DETECTOR_NAMES = tuple(d.name for d in DETECTORS)
