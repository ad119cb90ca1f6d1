"""Joining an export's network events to its process events by `process.entity_id`.

Elastic Defend's network events name the process (`process.entity_id`, name, executable,
pid) but not its parent's name or its command line, which the same export's process
events (exec, fork, already_running) carry. Without them `rare_parent` is blind on a
Defend export, and a network event without its user is judged without one. The join
remembers, per entity id, what the process events say, and fills only what a network event
lacks (the user too, name and id together): its own fields always win. Alerts list what
was filled (`imdswatch.identity.filled`).

Bounded: at most `max_entities` entities, least recently used evicted first (counted), so
an export of any length holds a fixed amount; `max_age` seconds of event time after its
last sighting an entity is no longer used (an entity id is unique per process, so an old
entry is never wrong, but a process seen once weeks ago is unlikely to connect now).
Process events must come before the network events they explain (file order), as they
do in a time-sorted export: a process event that arrives after its connection does not
change a verdict already given.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from intake.ecs_schema import EcsDoc
from scoring.events import Event

DEFAULT_MAX_ENTITIES = 100_000
DEFAULT_MAX_AGE = 7 * 86400.0


def _text(v: Any) -> str | None:
    if v.__class__ is list:
        v = v[0] if v else None
    return v or None


class _Facts:
    __slots__ = ("name", "exe", "command_line", "parent_id", "parent_name", "parent_exe",
                 "ppid", "user", "uid", "container_id", "image", "namespace", "pod", "seen")

    def __init__(self, d: EcsDoc, seen: float) -> None:
        p = d.process
        assert p is not None, "learn() keeps only documents with a process"
        parent = p.parent
        self.name = _text(p.name)
        self.exe = _text(p.executable)
        self.command_line = _text(p.command_line) or _text(p.title)
        self.parent_id = _text(parent.entity_id) if parent is not None else None
        self.parent_name = _text(parent.name) if parent is not None else None
        self.parent_exe = _text(parent.executable) if parent is not None else None
        pid = parent.pid if parent is not None else None
        self.ppid = pid if pid.__class__ is int else None
        u = d.user
        self.user = _text(u.name) if u is not None else None
        self.uid = _text(u.id) if u is not None else None
        c, o = d.container, d.orchestrator
        self.container_id = _text(c.id) if c is not None else None
        self.image = _text(c.image.name) if c is not None and c.image is not None else None
        self.namespace = _text(o.namespace) if o is not None else None
        self.pod = _text(o.resource.name) if o is not None and o.resource is not None else None
        self.seen = seen


class ProcessJoin:
    def __init__(self, max_entities: int = DEFAULT_MAX_ENTITIES,
                 max_age: float = DEFAULT_MAX_AGE) -> None:
        self.max_entities = max_entities
        self.max_age = max_age
        self._facts: OrderedDict[str, _Facts] = OrderedDict()
        self.learned = 0
        self.evicted = 0
        self.filled = 0

    def __len__(self) -> int:
        return len(self._facts)

    def learn(self, d: EcsDoc, ts: float | None) -> bool:
        """Remember a process event's facts under its entity id; False when it has none."""
        p = d.process
        entity = _text(p.entity_id) if p is not None else None
        if entity is None:
            return False
        facts = self._facts
        facts[entity] = _Facts(d, ts if ts is not None else 0.0)
        facts.move_to_end(entity)
        self.learned += 1
        if len(facts) > self.max_entities:
            facts.popitem(last=False)
            self.evicted += 1
        return True

    def _get(self, entity: str | None, now: float) -> _Facts | None:
        if entity is None:
            return None
        f = self._facts.get(entity)
        if f is None or now - f.seen > self.max_age:
            return None
        self._facts.move_to_end(entity)
        return f

    def fill(self, ev: Event, d: EcsDoc) -> None:
        """Fill what `ev` (the Event of network document `d`) lacks from its process's
        and its parent's process events."""
        if not self._facts:
            return
        p = d.process
        assert p is not None, "an Event has a process name"
        own = self._get(_text(p.entity_id), ev.ts)
        parent_id = _text(p.parent.entity_id) if p.parent is not None else None
        if parent_id is None and own is not None:
            parent_id = own.parent_id
        parent = self._get(parent_id, ev.ts)
        if own is None and parent is None:
            return
        self.filled += 1
        if own is not None:
            if ev.exe is None:
                ev.exe = own.exe
            if ev.command_line is None:
                ev.command_line = own.command_line
            if ev.parent_name is None:
                ev.parent_name = own.parent_name
            if ev.parent_exe is None:
                ev.parent_exe = own.parent_exe
            if ev.ppid is None:
                ev.ppid = own.ppid
            if ev.user is None and ev.uid is None:  # a user is its name and id together
                ev.user, ev.uid = own.user, own.uid
            if ev.container_id is None:
                ev.container_id = own.container_id
            if ev.image is None:
                ev.image = own.image
            if ev.namespace is None:
                ev.namespace = own.namespace
            if ev.pod is None:
                ev.pod = own.pod
        if parent is not None:
            if ev.parent_name is None:
                ev.parent_name = parent.name
            if ev.parent_exe is None:
                ev.parent_exe = parent.exe
