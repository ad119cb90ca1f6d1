"""The scorer: every metadata event is scored by each detector the moment it arrives
(event time), then learned; the best-scoring detector decides whether it is an alert.

`Scorer.process` is the one entry point the live agent and `imdswatch replay` share, so
both score identically. Nothing here reads the wall clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from math import log10
from typing import cast

from scoring.allowlist import ExceptionRule, first_match
from scoring.detectors import (
    COMPLETE,
    DETECTOR_NAMES,
    DETECTORS,
    WITHOUT_USER,
    Detector,
    identity_gaps,
    identity_level,
    image_repository,
    probability_for_score,
    request_class,
    score_from_surprise,
    show_name,
    user_of,
    version_key,
    workload_of,
    writable_path,
)
from scoring.durations import format_duration
from scoring.endpoints import SENSITIVE_CLASSES, Endpoint, EndpointCatalog
from scoring.events import Event
from scoring.known_callers import KnownCallerCatalog
from scoring.rarity import (
    DAY,
    HOUR,
    NOVELTY_EPISODE,
    NOVELTY_RECUR,
    Clock,
    Context,
    Entry,
    Host,
    HostSet,
    Rarity,
    RarityTable,
    Sketch,
    add_host,
    assess,
    drop_hosts,
    exact_hosts,
    hosts_len,
    probability,
)
from scoring.settings import ScorerSettings


def severity_of(score: float) -> str:
    if score >= 90:
        return "critical"
    if score >= 75:
        return "high"
    if score >= 50:
        return "medium"
    return "low"


class Outcome:
    """The verdict on one metadata event."""

    __slots__ = (
        "event", "endpoint", "score", "detector", "rule_name", "reason", "entity", "scores",
        "alert", "learning", "suppressed", "excepted", "known_caller", "novel", "burst",
        "request_class", "rollout", "rollout_kind", "rollout_name",
    )

    def __init__(self, event: Event, endpoint: Endpoint,
                 request_class: str | None = None) -> None:
        self.event = event
        self.endpoint = endpoint
        # What the request asked for (a `scoring.endpoints` class), None for a connection.
        self.request_class = request_class
        self.score = 0.0
        self.detector: str | None = None
        self.rule_name: str | None = None
        self.reason = ""
        self.entity = ""
        self.scores: dict[str, float] = {}
        self.alert = False
        self.learning = False
        self.suppressed = False
        self.excepted = False
        self.known_caller = False
        # The alerting detector's value was never seen in its context.
        self.novel = False
        # > 0: this novel anomaly belongs to a burst of that many new callers on its host
        # (the burst's own alert when `alert`, folded into it when `suppressed`).
        self.burst = 0
        # > 0: this anomaly belongs to a rollout across that many hosts (a new caller
        # spreading over the fleet, or a known caller's new version): low severity, and
        # folded into the rollout's one alert when `suppressed`.
        self.rollout = 0
        # What spreads (ROLLOUT_KINDS) and its name, when `rollout`.
        self.rollout_kind = ""
        self.rollout_name = ""

    @property
    def severity(self) -> str:
        return "low" if self.rollout else severity_of(self.score)

    @property
    def anomalous(self) -> bool:
        """Reached its detector's threshold, whether or not it became an alert."""
        return bool(self.reason)

    def __repr__(self) -> str:
        return (
            f"Outcome(score={self.score:.1f}, detector={self.detector}, alert={self.alert}, "
            f"reason={self.reason!r})"
        )


GENERIC = "rare_combination"
# Names the alert whenever it reaches its threshold (see `_score`).
DECISIVE = "exe_mismatch"
_DECISIVE = DETECTOR_NAMES.index(DECISIVE)
_EXECUTABLE = DETECTOR_NAMES.index("rare_executable")
_CONTAINER = DETECTOR_NAMES.index("rare_container")
_USER = DETECTOR_NAMES.index("rare_user")
# Scores under QUIET_SCORE are noise and reported as 0.
QUIET_SCORE = 10.0
QUIET_P = probability_for_score(QUIET_SCORE)
# A caller whose every detector scores under QUIET_SCORE is not re-scored for QUIET_FOR
# seconds of event time (doubling on each quiet verdict, up to QUIET_MAX); its events are
# still learned, with a score of 0, the verdict full scoring gives. Its scores cannot climb
# from there to a threshold unless the fleet's history changes several-fold, and the next
# full scoring sees that change. Learning within one hour is deferred to `_flush` (the
# counts only grow, and nothing reads them before the next full scoring or save).
QUIET_FOR = 6 * HOUR
QUIET_MAX = 24 * HOUR
# Bounds the memory of the callers memo: an eighth of the cap on entries, from CALLER_MIN
# to CALLER_MAX; past it the memo starts again from empty. A caller has 5-7 entries, so an
# eighth holds every caller the model can keep with room to spare, and under a flood of
# new names (each seen once: nothing to reuse) the memo's share of the agent's memory
# stays small. The upper bound is for the fleet scorer, whose large cap would otherwise
# let the memo alone hold more callers than a fleet's spread of callers repays.
CALLER_MIN = 4_000
CALLER_MAX = 50_000
# Entries whose decayed count fell below this are pruned (a single call, after ~4.3
# half-lives), and hosts silent for HOST_RETIRE half-lives are retired, each day.
PRUNE_FLOOR = 0.05
HOST_RETIRE = 4.0
MAINTAIN_EVERY = 24 * HOUR
# Past the cap on entries, the weakest go until this share of the cap is left.
EVICT_TO = 0.9
# Suppression per (detector, entity) doubles while an entity keeps alerting within this
# many windows of its last alert, up to SUPPRESSION_MAX.
SUPPRESSION_STREAK = 4.0
SUPPRESSION_MAX = 24 * HOUR
# New callers (a process name, or a whole caller combination, never seen) on one host
# whose anomalies follow each other within BURST_GAP make a burst; the first BURST_SINGLES
# alert on their own, the next one alerts for the burst (naming it) and later ones are
# folded into that alert. A new executable, user or request of a known caller is judged on
# its own, never folded; so is a new caller's credential, token or identity request.
BURST_GAP = 600.0
BURST_SINGLES = 5
BURST_DETECTORS = frozenset(("rare_process", "rare_combination"))
BURST_NAMES = 8
# A fleet-wide rollout: the same caller (name, executable up to its versions, user, parent,
# image, namespace) anomalous on further hosts within ROLLOUT_GAP of its last anomaly is
# folded into the alert of its first host (which cannot be told from a one-off when it
# happens); an executable that is a known one of the same name but for its version numbers
# (a snap revision, a new interpreter on a new node image) is an upgrade: one low-severity
# alert naming it, its other hosts folded. At most ROLLOUTS are followed at once, each
# remembering ROLLOUT_HOSTS hosts. The first host's alert is low severity, naming the
# rollout, when the caller is the first the fleet sees of a new Kubernetes workload (a pod
# of a controller, in an image and namespace never seen calling, running a path not
# writable by anyone): the leading edge of a new DaemonSet or Deployment.
ROLLOUT_GAP = 6 * HOUR
ROLLOUTS = 10_000
ROLLOUT_HOSTS = 256
ROLLOUT_DETECTORS = frozenset(("rare_process", "rare_executable", "rare_process_user",
                               "rare_user", "rare_parent", "rare_container",
                               "rare_combination"))
# The detectors a new version of a known executable makes anomalous, and nothing else.
UPGRADE_DETECTORS = frozenset(("rare_executable", "rare_combination"))
# What a rollout spreads: a caller anomalous on further hosts (its first host alerts as
# any anomaly), a known caller's new version, a new workload's first caller.
SPREAD, UPGRADE, WORKLOAD, BRING_UP = "spread", "upgrade", "workload", "bring-up"
ROLLOUT_KINDS = frozenset((SPREAD, UPGRADE, WORKLOAD, BRING_UP))
# Node bring-up: what runs at a node's boot (its user data, its configure script) runs at
# every new node's boot, days apart, past ROLLOUT_GAP. A caller anomalous within BOOT_WINDOW
# of its host's first event, that was anomalous within that window of another host's first
# event before, is folded like a rollout's further host: the fleet's first such boot alerted.
# A caller whose executable is unknown (an export that lost it) falls back to the coarser
# caller (name, user, image, namespace) of boots whose executable was known and not in a
# writable place: unknown is judged by what is known, never as new.
BOOT_WINDOW = 30 * 60.0
# Where rare_executable's table keeps each name's versions-replaced executables (learned
# only; never scored): ("versions", name) -> version_key(exe).
VERSIONS = "versions"
# Where rare_executable's table keeps when each host was first seen (BORN -> host name), and
# the callers anomalous in a host's first BOOT_WINDOW, with those hosts (BOOTED -> the
# caller's rollout_key); learned only, never scored.
BORN = ("born",)
BOOTED = ("booted",)
# Where rare_user's table keeps the names each uid had where it ran (learned only; never
# scored): (UIDS, host, image repository, uid) -> user name. An event with a uid but no
# name is judged as the user the uid is there, not as `uid:N`, another user.
UIDS = "uids"
# Where rare_container's table keeps the workloads seen calling (learned only; never
# scored): WORKLOADS -> (image repository, namespace).
WORKLOADS = ("workloads",)
# The signatures (hashed) of new callers folded into a burst once and not learned; past
# this many the set starts again (a name seen again after that is learned one sighting
# later than it could have been, nothing more).
FOLDED_MEMORY = 65_536
# Event times are epoch seconds; anything past this is not a time (year ~5000).
MAX_ABS_TS = 1e11


class _Caller:
    """The model's memo of one caller (an event signature: name, executable, user,
    parent, image, namespace, host): its detectors' keys, where their counts live, and
    whether it is common. Valid while the model's generation is `gen`."""

    __slots__ = ("host", "known", "keys", "scored", "nodes", "gen", "quiet_until",
                 "quiet_for", "pending", "dirty", "day", "last_ts", "request_class")

    def __init__(self, host: Host, known: bool, keys: tuple, gen: int,
                 request_class: str | None, scored: int) -> None:
        self.host = host
        self.known = known
        self.request_class = request_class  # a function of the signature
        self.keys = keys  # ((detector index, context, value), ...)
        # The first `scored` keys are scored and learned; the rest are only learned (the
        # coarser identity levels a complete event teaches, for events lacking a field).
        self.scored = scored
        # Where the keys' counts live once learned: context, entry, context, entry, ... in
        # the keys' order (None before). One flat tuple rather than a list of pairs: a
        # flood of new names fills the memo, and the pairs would cost more per caller.
        self.nodes: tuple[Entry, ...] | None = None
        self.gen = gen
        self.quiet_until = -1.0
        self.quiet_for = QUIET_FOR / 2  # doubled by the first quiet verdict
        self.pending = 0.0
        self.dirty = False
        self.day = -1
        self.last_ts = -1e300


class Rollout:
    __slots__ = ("start", "last", "hosts", "first_host", "kind", "name", "folded")

    def __init__(self, ts: float, host: str, kind: str, name: str) -> None:
        self.start = ts
        self.last = ts
        self.hosts = {host}
        self.first_host = host
        self.kind = kind
        self.name = name
        self.folded = 0


def _uid_context(event: Event) -> tuple:
    return (UIDS, event.host or "", image_repository(event.image), event.uid)


def rollout_key(event: Event) -> tuple:
    """The caller a rollout spreads: versions in its executable do not count."""
    exe = event.exe
    return (event.name, version_key(exe) or exe, user_of(event), event.parent_name,
            image_repository(event.image), event.namespace)


def boot_caller(event: Event) -> tuple:
    """The coarser caller node bring-up falls back to when the executable is unknown."""
    return ("caller", event.name, user_of(event), image_repository(event.image),
            event.namespace)


class _Burst:
    __slots__ = ("start", "last", "count", "names", "alerted")

    def __init__(self, ts: float) -> None:
        self.start = ts
        self.last = ts
        self.count = 0
        self.names: list[str] = []
        self.alerted = False


def entity_text(detector: Detector, ctx: Hashable, value: Hashable) -> str:
    def show(v: Hashable) -> str:
        if isinstance(v, tuple):
            return "@".join("-" if x is None else str(x) for x in v)
        return str(v)

    return show(value) if ctx is None else f"{show(ctx)}/{show(value)}"


class Scorer:
    """Rarity model + alert policy (learning period, thresholds, exceptions, suppression,
    bursts). `process` is the one way in."""

    def __init__(
        self,
        settings: ScorerSettings | None = None,
        catalog: EndpointCatalog | None = None,
        exceptions: tuple[ExceptionRule, ...] = (),
        known_callers: KnownCallerCatalog | None = None,
    ) -> None:
        self.settings = settings or ScorerSettings()
        self.catalog = catalog or EndpointCatalog.from_config()
        self.exceptions = tuple(exceptions)
        self.known_callers = known_callers or KnownCallerCatalog()
        self.clock = Clock(self.settings.half_life, rescale=self._rescale)
        self.tables: tuple[RarityTable, ...] = tuple(RarityTable(self.clock)
                                                     for _ in DETECTORS)
        self.hosts: dict[str, Host] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.events_learned = 0
        self.last_alert: dict[tuple, tuple[float, float]] = {}
        self.bursts: dict[str, _Burst] = {}
        self.rollouts: dict[tuple, Rollout] = {}
        self._thresholds = tuple(self.settings.threshold_for(d.name) for d in DETECTORS)
        self._factor = self.settings.known_caller_factor
        self._next_prune = 0.0
        self._next_maintain: float | None = None
        self._callers: dict[tuple, _Caller] = {}
        self._folded_once: set[int] = set()
        self._dirty: list[_Caller] = []
        self._gen = 0
        self._over_cap = False
        self._caller_limit = min(CALLER_MAX, max(CALLER_MIN, self.settings.max_entities // 8))
        self._epoch_len = HOST_RETIRE * self.settings.half_life / 2

    # -- time ------------------------------------------------------------------
    @property
    def learning(self) -> bool:
        """True until `learning_period` of event time has passed since the first event."""
        if self.first_ts is None or self.last_ts is None:
            return True
        return self.last_ts - self.first_ts < self.settings.learning_period

    def _rescale(self, factor: float) -> None:
        self._flush()
        for t in self.tables:
            t.rescale(factor)
        if factor < PRUNE_FLOOR:
            self._next_maintain = None  # most history just faded out: prune it now

    # -- the one way in -------------------------------------------------------------
    def process(self, event: Event) -> Outcome | None:
        """Score then learn one event. None when it is not to a metadata endpoint.
        Raises ValueError for an event time that is not a finite epoch time."""
        endpoint = self.catalog.match(event.dst_ip, event.dst_port)
        if endpoint is None:
            return None
        ts = event.ts
        if not -MAX_ABS_TS <= ts <= MAX_ABS_TS:  # also refuses NaN
            raise ValueError(f"event time {ts!r} is not an epoch time in seconds")
        if self.first_ts is None:
            self.first_ts = ts
        if event.user is None and event.uid:
            event.user = self._user_named(event)
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts
        w = self.clock.weight(ts)
        if self._over_cap or self._next_maintain is None or ts >= self._next_maintain:
            self.maintain(ts)
        # The detectors' keys depend on the signature and, beyond it, on the uid (user
        # detectors without a user name), being in a container (known callers) and the
        # endpoint (request classes).
        # An interpreted agent's script (known_callers.script_of) decides whether it is
        # the agent: `python3 /tmp/yum` must not share the memo of `python3 /usr/bin/yum`.
        sig = (event.signature(), event.uid, event.container_id is None, event.dst_ip,
               event.dst_port, self.known_callers.script_key(event))
        caller = self._callers.get(sig)
        if caller is None or caller.gen != self._gen:
            caller = self._caller(event, sig, ts)
        day = int(ts // DAY)
        self.events_learned += 1
        if ts < caller.quiet_until:
            # A common caller: count it. Within the day it was last learned in, only its
            # count grows, and that is deferred to `_flush` (sums commute; nothing reads
            # them before the next full scoring or save).
            if caller.day == day:
                caller.pending += w
                if ts > caller.last_ts:
                    caller.last_ts = ts
                if not caller.dirty:
                    caller.dirty = True
                    self._dirty.append(caller)
            else:
                self._learn(caller, w, ts, day)
            out = Outcome(event, endpoint, caller.request_class)
            out.known_caller = caller.known
            out.learning = (self.last_ts - self.first_ts  # self.learning, inlined
                            < self.settings.learning_period)
            return out
        self._flush()
        out = self._score(event, endpoint, caller, w, ts)
        if out.burst and out.suppressed and caller.nodes is None:
            # A new caller folded into its host's burst is learned from its second
            # sighting on: a flood of throwaway names, each seen once, then costs no model
            # entries at all (nor the eviction work of pushing them out again), in every
            # mode, while a caller that comes back is learned like any other.
            key = hash(sig)
            folded = self._folded_once
            if key not in folded:
                if len(folded) >= FOLDED_MEMORY:
                    folded.clear()
                folded.add(key)
                if ts > caller.host.last_seen:
                    caller.host.last_seen = ts
                self._callers.pop(sig, None)
                return out
        self._learn(caller, w, ts, day)
        return out

    def _caller(self, event: Event, sig: tuple, ts: float) -> _Caller:
        name = event.host or ""
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = Host(name, ts)
            c, e = self.tables[_EXECUTABLE].ensure(BORN, name, ts)
            w = self.clock.weight(ts)
            c.n += w
            e.n += w
        keys = []
        taught = []
        level = identity_level(event)
        # Without its executable a caller named like a known agent may be that agent: what
        # needs the catalog's word to stay quiet without history cannot judge it.
        undecided = event.exe is None and self.known_callers.knows_name(event.name)
        for i, det in enumerate(DETECTORS):
            if not det.coarsens:
                value = det.value(event)
                if value is not None:
                    keys.append((i, det.context(event), value))
                continue
            # Judged at the event's own level of identity; every coarser level learns it.
            for lv in range(level, WITHOUT_USER + 1):
                ctx, value = det.key_at(event, lv)
                if value is None:
                    continue
                if lv == level and not (undecided and det.history_free
                                        and det.vouched_by_known_caller):
                    keys.append((i, ctx, value))
                else:
                    taught.append((i, ctx, value))
        vkey = version_key(event.exe)
        if vkey is not None:
            taught.append((_EXECUTABLE, (VERSIONS, event.name), vkey))
        if event.user is not None and event.uid:
            taught.append((_USER, _uid_context(event), event.user))
        if event.image is not None:
            taught.append((_CONTAINER, WORKLOADS, (image_repository(event.image),
                                                   event.namespace)))
        known = self.known_callers.lookup_event(event) is not None
        if undecided and not known:
            # The executable is unknown, not new: a catalog agent's name where that agent
            # runs is vouched for, as its complete event would be, by the detectors that
            # judge what runs (the no-history rule, which would need the catalog's word on
            # the executable, abstains above; who runs it and how are judged in full).
            known = self.known_callers.runs_here(
                event.name, event.image,
                event.container_id is not None or event.image is not None
                or bool(event.container_unknown))
        if len(self._callers) >= self._caller_limit:
            self._flush()
            self._callers.clear()
        caller = self._callers[sig] = _Caller(host, known, (*keys, *taught), self._gen,
                                              request_class(event), len(keys))
        return caller

    def _key(self, i: int, event: Event) -> tuple[Hashable, Hashable]:
        """(context, value) detector `i` judges `event` at (as `_caller` keyed it)."""
        det = DETECTORS[i]
        return det.key_at(event, identity_level(event) if det.coarsens else COMPLETE)

    def _score(self, event: Event, endpoint: Endpoint, caller: _Caller, w: float,
               ts: float) -> Outcome:
        out = Outcome(event, endpoint, caller.request_class)
        out.known_caller = known = caller.known
        out.learning = learning = self.learning
        clock = self.clock
        tables = self.tables
        factor = self._factor
        scores = out.scores
        best_i, best_margin = -1, -1e9
        best_ref: tuple[Context | None, Entry | None] = (None, None)
        min_p = 1.0
        nodes = caller.nodes
        c: Context | None
        e: Entry | None
        scored = caller.scored
        for k, (i, ctx, value) in enumerate(caller.keys):
            if k >= scored:
                break
            det = DETECTORS[i]
            if det.judges is not None and not det.judges(event):
                continue  # learned, not scored
            if nodes is not None:
                c = cast(Context, nodes[2 * k])
                e = nodes[2 * k + 1]
            else:
                c, e = tables[i].lookup(ctx, value)
            p = (probability(clock, c, e, w, ts) if det.probability is None
                 else det.probability(tables[i], ctx, value, w))
            if p < min_p:
                min_p = p
            if p >= QUIET_P:
                s = 0.0
            else:
                s = score_from_surprise(-log10(p) if p > 0 else 12.0)
                if known and det.vouched_by_known_caller:
                    s *= factor
                if s < QUIET_SCORE:
                    s = 0.0
            scores[det.name] = s
            # A score of 0 reaches no threshold, not even 0 (what `--threshold 0` asks:
            # every score shown, not every event an anomaly of every detector).
            margin = s - self._thresholds[i] if s > 0 else -1e9
            # rare_combination (last) fires on any new combination, so it names the alert
            # only when no specific detector reaches its threshold: "curl run by www-data"
            # says more than "a new combination".
            if margin > best_margin and not (best_margin >= 0 and det.name == GENERIC):
                best_i, best_margin, best_ref = i, margin, (c, e)

        # Only a detector that scored the event (a key of `scores`) and scored above 0 can
        # name it: a threshold of 0 is reached by every score, including "did not judge".
        decisive = scores.get(DECISIVE, 0.0)
        if (best_i != _DECISIVE and decisive > 0
                and decisive >= self._thresholds[_DECISIVE]):
            # The executable changed after connecting: the other detectors judge an
            # identity (/proc's executable, parent, command line) this shows to be false.
            best_i = _DECISIVE
            best_margin = decisive - self._thresholds[_DECISIVE]
            best_ref = tables[best_i].lookup(*self._key(best_i, event))
        if learning and best_margin >= 0 and not DETECTORS[best_i].history_free:
            # Only what needs no history may alert while learning: let it name the event.
            free = [(scores[d.name] - self._thresholds[j], j) for j, d in enumerate(DETECTORS)
                    if d.history_free and scores.get(d.name, 0.0) > 0]
            if free and max(free)[0] >= 0:
                best_margin, best_i = max(free)
                best_ref = tables[best_i].lookup(*self._key(best_i, event))
        if best_i >= 0 and scores[DETECTORS[best_i].name] > 0:
            det = DETECTORS[best_i]
            out.score = scores[det.name]
            out.detector = det.name
            out.rule_name = det.rule_name
            if best_margin >= 0:
                rarity = assess(clock, best_ref[0], best_ref[1], w, ts)
                out.novel = rarity.new
                self._explain(out, best_i, w, rarity)
                self._decide(out, best_i, learning)
                if out.burst and not out.alert:
                    self._beside_burst(out, caller, w, ts, learning)

        # Callers common on every count are not re-scored for a while.
        if min_p >= QUIET_P:
            caller.quiet_for = min(caller.quiet_for * 2, QUIET_MAX)
            caller.quiet_until = ts + caller.quiet_for
        else:
            caller.quiet_until = -1.0
            caller.quiet_for = QUIET_FOR / 2
        return out

    def _learn(self, caller: _Caller, w: float, ts: float, day: int) -> None:
        host = caller.host
        if ts > host.last_seen:
            host.last_seen = ts
        if ts > caller.last_ts:
            caller.last_ts = ts
        caller.day = day
        epoch = int(ts // self._epoch_len)
        slot_idx, slot_rank = host.slot
        nodes = caller.nodes
        if nodes is None:
            tables = self.tables
            nodes = caller.nodes = tuple(x for i, ctx, value in caller.keys
                                         for x in tables[i].ensure(ctx, value, ts))
            if self.entities > self.settings.max_entities:
                self._over_cap = True
        pending = caller.pending
        if pending:
            caller.pending = 0.0  # still listed as dirty: `_flush` adds nothing then
        for k in range(0, len(nodes), 2):
            c = cast(Context, nodes[k])
            e = nodes[k + 1]
            c.n += w + pending
            e.n += w + pending
            if e.day != day:
                # Diversity: a value's first day adds 1/NOVELTY_RECUR of a value, times
                # the time since the context's last new value (a burst of throwaway names
                # adds about one name's worth); each later active day adds 1/NOVELTY_RECUR
                # more, as if the first had counted in full: values that recur count.
                if not e.days > 0:
                    gap = ts - c.last_novelty
                    credit = (min(1.0, gap / NOVELTY_EPISODE) if gap > 0 else 0.0) \
                        / NOVELTY_RECUR
                    if ts > c.last_novelty:
                        c.last_novelty = ts
                else:
                    credit = min(1.0, max(e.credit, 1.0 / NOVELTY_RECUR) + 1.0 / NOVELTY_RECUR)
                if credit > e.credit:
                    c.novelty += w * (credit - e.credit)
                    e.credit = credit
                e.day = day
                e.days += w
            if c.day != day:
                c.day = day
                c.days += w
            hs = e.hosts
            if hs is not host:
                if hs.__class__ is Sketch:
                    if hs.epoch != epoch or hs.cur[slot_idx] < slot_rank:
                        hs.add(host.slot, epoch)
                elif hs.__class__ is not set or host not in hs:
                    e.hosts = add_host(hs, host, epoch)
            hs = c.hosts
            if hs is not host:
                if hs.__class__ is Sketch:
                    if hs.epoch != epoch or hs.cur[slot_idx] < slot_rank:
                        hs.add(host.slot, epoch)
                elif hs.__class__ is not set or host not in hs:
                    c.hosts = add_host(hs, host, epoch)

    def _flush(self) -> None:
        """Apply deferred learning (before anything reads the counts)."""
        dirty = self._dirty
        if not dirty:
            return
        for caller in dirty:
            pending = caller.pending
            nodes = caller.nodes
            if caller.gen == self._gen and nodes is not None:
                for x in nodes:
                    x.n += pending
            host = caller.host
            if caller.last_ts > host.last_seen:
                host.last_seen = caller.last_ts
            caller.pending = 0.0
            caller.dirty = False
        dirty.clear()

    # -- bounds -----------------------------------------------------------------
    @property
    def entities(self) -> int:
        """Tracked (context, value) entries over all detectors."""
        return sum(t.entries for t in self.tables)

    def maintain(self, now: float | None = None) -> None:
        """Prune entries faded below PRUNE_FLOOR, retire hosts silent past the horizon,
        and evict the weakest entries while over `settings.max_entities`. Runs by itself
        once a day of event time and whenever the cap is passed."""
        now = self.last_ts if now is None else now
        if now is None:
            return
        self._flush()
        w = self.clock.weight(now)
        floor = PRUNE_FLOOR * w
        horizon = now - HOST_RETIRE * self.settings.half_life
        retired = {h for h in self.hosts.values() if h.last_seen < horizon}
        for h in retired:
            del self.hosts[h.name]
        for table in self.tables:
            _prune(table, floor, retired)
        cap = self.settings.max_entities
        if self.entities > cap:
            self._evict(self.entities - int(cap * EVICT_TO))
        self._over_cap = False
        self._gen += 1
        self._keep_callers(retired)
        self._prune_suppression(now)
        self.bursts = {k: b for k, b in self.bursts.items() if now - b.last < BURST_GAP}
        self.rollouts = {k: r for k, r in self.rollouts.items() if now - r.last < ROLLOUT_GAP}
        self._next_maintain = now + MAINTAIN_EVERY

    def _keep_callers(self, retired: set[Host]) -> None:
        """Keep in the memo the callers whose host and entries all survived maintenance,
        with their quiet state; the others are rebuilt at their next event. Pruning
        removes only values faded below PRUNE_FLOOR (contexts keep their totals) and hosts
        silent past the horizon, so a surviving caller's own evidence is what it was judged
        quiet on: re-scoring every caller after each daily maintenance (what clearing the
        memo did) gave the same verdicts at twice the cost."""
        tables = self.tables
        kept: dict[tuple, _Caller] = {}
        for sig, caller in self._callers.items():
            if caller.host in retired:
                continue
            nodes = caller.nodes
            if nodes is not None:
                for k, (i, ctx, value) in enumerate(caller.keys):
                    c = cast(Context, nodes[2 * k])
                    found = tables[i].contexts.get(ctx)
                    if found is not c or c.values.get(value) is not nodes[2 * k + 1]:
                        break
                else:
                    caller.gen = self._gen
                    kept[sig] = caller
        self._callers = kept

    def _evict(self, count: int) -> None:
        """Drop the `count` weakest entries: fewest active days, then fewest calls, the
        newest first among equals. A flood of throwaway names is recent and one call each,
        so it goes before the established history that real attacks are compared against;
        contexts keep their totals, so what a value is compared with does not shrink."""
        victims = heapq.nsmallest(count, (
            (e.days, e.n, -e.first_seen, i, ctx, value)
            for i, table in enumerate(self.tables)
            for ctx, c in table.contexts.items()
            for value, e in c.values.items()
        ), key=lambda v: v[:3])
        for _, _, _, i, ctx, value in victims:
            table = self.tables[i]
            c = table.contexts[ctx]
            del c.values[value]
            table.entries -= 1
            if not c.values:
                del table.contexts[ctx]

    def _explain(self, out: Outcome, i: int, w: float, rarity: Rarity) -> None:
        det = DETECTORS[i]
        table = self.tables[i]
        event = out.event
        ctx, value = self._key(i, event)
        if det.others_from is None:
            others = table.top_values(ctx, w)
        else:
            j = DETECTOR_NAMES.index(det.others_from)
            others = self.tables[j].top_values(DETECTORS[j].context(event), w)
        history = (self.last_ts or 0.0) - (self.first_ts or 0.0)
        out.entity = entity_text(det, ctx, value)
        out.reason = det.describe(event, rarity, others, history, len(self.hosts))
        gaps = identity_gaps(event)
        if gaps:
            # Say what the verdict could not use: a missing field was not judged new.
            what = " and ".join((", ".join(gaps[:-1]), gaps[-1])) if len(gaps) > 1 else gaps[0]
            them = "them" if len(gaps) > 1 else "it"
            out.reason += f" ({what} unknown: judged without {them})"

    def _decide(self, out: Outcome, i: int, learning: bool) -> None:
        det = DETECTORS[i]
        event = out.event
        if learning and not det.history_free:
            return
        if first_match(self.exceptions, event, det.name) is not None:
            out.excepted = True
            return
        if det.name in ROLLOUT_DETECTORS and self._in_rollout(out):
            return
        if out.novel and det.name in BURST_DETECTORS and self._in_burst(out):
            return
        key = (det.name, out.entity)
        last = self.last_alert.get(key)
        base = self.settings.suppression_window
        ts = event.ts
        if last is not None and ts - last[0] < last[1]:
            out.suppressed = True
            return
        # An entity that keeps alerting waits twice as long each time (up to a day), so
        # a newcomer that is noticed but not acted upon does not alert once an hour.
        window = base
        if last is not None and ts - last[0] < SUPPRESSION_STREAK * last[1]:
            window = max(base, min(last[1] * 2, SUPPRESSION_MAX))
        self.last_alert[key] = (ts, window)
        out.alert = True
        if ts >= self._next_prune:
            self._prune_suppression(ts)

    def _beside_burst(self, out: Outcome, caller: _Caller, w: float, ts: float,
                      learning: bool) -> None:
        """A new caller folded into its host's burst still alerts when a detector that
        bursts never fold reaches its threshold (a new user, a credential request without
        the header): a flood of new names must not hide the attack that follows it."""
        best_j, best_margin = -1, -1e9
        for j, _ctx, _value in caller.keys[:caller.scored]:
            det = DETECTORS[j]
            s = out.scores.get(det.name)
            if (s is None or s <= 0 or det.name in BURST_DETECTORS
                    or (learning and not det.history_free)):
                continue
            margin = s - self._thresholds[j]
            if margin >= 0 and margin > best_margin:
                best_j, best_margin = j, margin
        if best_j < 0:
            return
        det = DETECTORS[best_j]
        folded = out.burst
        out.suppressed = False
        out.burst = 0
        out.score = out.scores[det.name]
        out.detector = det.name
        out.rule_name = det.rule_name
        c, e = self.tables[best_j].lookup(*self._key(best_j, out.event))
        rarity = assess(self.clock, c, e, w, ts)
        out.novel = rarity.new
        self._explain(out, best_j, w, rarity)
        out.reason += f" (a new caller in a burst of {folded} on its host)"
        self._decide(out, best_j, learning)

    def _upgrade_of(self, out: Outcome) -> str | None:
        """The version-free executable `out`'s event is a new version of, when that is all
        that is new about it: only the detectors that judge the executable reach their
        thresholds, and the name has called from another version of this path before."""
        event = out.event
        vkey = version_key(event.exe)
        if vkey is None:
            return None
        for j, det in enumerate(DETECTORS):
            s = out.scores.get(det.name, 0.0)  # a detector that did not score reaches nothing
            if det.name not in UPGRADE_DETECTORS and s > 0 and s >= self._thresholds[j]:
                return None
        if self.last_ts is None:
            return None
        w = self.clock.weight(self.last_ts)
        table = self.tables[_EXECUTABLE]
        if table.count((VERSIONS, event.name), vkey, w) <= table.count(event.name, event.exe, w):
            return None  # every call of this key was this very executable: nothing known
        return vkey

    def _user_named(self, event: Event) -> str | None:
        """The name `event`'s uid had where it ran (its host and image), None when no
        event there carried both."""
        c = self.tables[_USER].contexts.get(_uid_context(event))
        if c is None or not c.values:
            return None
        name, _ = max(c.values.items(), key=lambda kv: kv[1].n)
        return name if isinstance(name, str) else None

    def _new_workload(self, out: Outcome) -> str | None:
        """The workload `out`'s event is the first caller of, when the fleet has never seen
        its image and namespace call and the event carries its workload identity (a
        controller's pod) and runs a path not writable by anyone."""
        event = out.event
        workload = workload_of(event)
        exe = event.exe
        if workload is None or exe is None or writable_path(exe) or self.last_ts is None:
            return None
        seen = self.tables[_CONTAINER].count(
            WORKLOADS, (image_repository(event.image), event.namespace),
            self.clock.weight(self.last_ts))
        return workload if seen <= 0 else None

    def _booted_before(self, event: Event, key: tuple) -> int:
        """When the event being judged is in its host's first BOOT_WINDOW: records its
        caller (rollout `key`, and its coarser boot_caller when its executable is known and
        not writable) as anomalous at that host's boot, and returns how many other hosts it
        was anomalous at the boot of before (0 when none, or not booting). An event whose
        executable is unknown only reads the coarser record."""
        name = event.host or ""
        host = self.hosts.get(name)
        table = self.tables[_EXECUTABLE]
        _, born = table.lookup(BORN, name)
        ts = event.ts
        if host is None or born is None or not 0 <= ts - born.first_seen < BOOT_WINDOW:
            return 0
        exe = event.exe
        if exe is None:
            _, coarse = table.lookup(BOOTED, boot_caller(event))
            return 0 if coarse is None else self._other_hosts(coarse.hosts, host)
        before = self._record_boot(table, key, host, ts)
        if not writable_path(exe):
            self._record_boot(table, boot_caller(event), host, ts)
        return before

    def _record_boot(self, table: RarityTable, key: tuple, host: Host, ts: float) -> int:
        c, e = table.ensure(BOOTED, key, ts)
        before = self._other_hosts(e.hosts, host)
        w = self.clock.weight(ts)
        c.n += w
        e.n += w
        e.hosts = add_host(e.hosts, host, int(ts // self._epoch_len))
        if self.entities > self.settings.max_entities:
            self._over_cap = True
        return before

    @staticmethod
    def _other_hosts(hosts: HostSet, host: Host) -> int:
        if hosts.__class__ is Sketch:
            return hosts_len(hosts)
        return sum(1 for h in exact_hosts(hosts) if h is not host)

    def _boot_without_exe(self, out: Outcome) -> bool:
        event = out.event
        booted = self._booted_before(event, ())
        if not booted:
            return False
        out.rollout = booted + 1
        out.rollout_kind = BRING_UP
        out.rollout_name = show_name(event.name)
        out.suppressed = True
        out.reason = (f"node bring-up: {show_name(event.name)} (executable unknown) anomalous "
                      f"in {event.host or 'an unnamed host'}'s first "
                      f"{format_duration(BOOT_WINDOW)}; by name, user and image it was "
                      f"anomalous at the boot of {booted} other "
                      f"host{'s' if booted > 1 else ''} before, from a known executable (the "
                      f"first of them alerted); folded. {out.reason}")
        return True

    def _in_rollout(self, out: Outcome) -> bool:
        """Counts an anomaly in its caller's rollout across hosts; True when the rollout
        decided it (its one alert, or folded into it)."""
        event = out.event
        if event.exe is None:
            # Not known well enough to say it is spreading; only a node's boot, by the
            # coarser caller of boots whose executable was known, folds it.
            return self._boot_without_exe(out)
        ts = event.ts
        host = event.host or ""
        upgrade = self._upgrade_of(out)
        key = rollout_key(event)
        if upgrade is not None:
            key = (*key, event.exe)  # one rollout per new version
        r = self.rollouts.get(key)
        if r is None or not -ROLLOUT_GAP < ts - r.last < ROLLOUT_GAP:
            if len(self.rollouts) >= ROLLOUTS:
                self.rollouts.pop(next(iter(self.rollouts)))
            booted = self._booted_before(event, key) if upgrade is None else 0
            workload = self._new_workload(out) if upgrade is None and not booted else None
            kind = (UPGRADE if upgrade is not None else BRING_UP if booted
                    else WORKLOAD if workload else SPREAD)
            name = (f"{show_name(event.name)} {event.exe}" if upgrade is not None
                    else f"{event.namespace}/{workload}" if workload else show_name(event.name))
            r = self.rollouts[key] = Rollout(ts, host, kind, name)
            if kind == SPREAD:
                return False  # its first host alerts as any anomaly would
            if kind == BRING_UP:
                out.rollout = booted + 1
                out.rollout_kind = kind
                out.rollout_name = name
                out.suppressed = True
                out.reason = (f"node bring-up: {show_name(event.name)} ({event.exe}) anomalous "
                              f"in {host or 'an unnamed host'}'s first "
                              f"{format_duration(BOOT_WINDOW)}, as it was at the boot of "
                              f"{booted} other host{'s' if booted > 1 else ''} before (the "
                              f"first of them alerted); folded. {out.reason}")
                return True
            out.rollout = 1
            out.rollout_kind = kind
            out.rollout_name = name
            out.alert = True
            if upgrade is not None:
                usual = [v for v, _ in self.tables[_EXECUTABLE].top_values(
                    event.name, self.clock.weight(ts)) if v != event.exe]
                was = f" (it called from {usual[0]})" if usual else ""
                out.reason = (f"upgrade of {show_name(event.name)}: {event.exe} is a new "
                              f"version of {upgrade}{was}; one alert per upgrade, its other "
                              f"hosts are folded into it. {out.reason}")
            else:
                out.reason = (f"new workload {name} (image {event.image}) on "
                              f"{host or 'an unnamed host'}: {show_name(event.name)} "
                              f"({event.exe}) is the first caller of a workload the fleet has "
                              f"never seen call; one alert per rollout, its other hosts are "
                              f"folded into it. {out.reason}")
            return True
        if ts > r.last:
            r.last = ts
        if host in r.hosts and len(r.hosts) < 2 and r.kind == SPREAD:
            # The same host again, before any other showed it: not spreading, so
            # suppression decides, as for any anomaly (a one-host newcomer re-alerts).
            return False
        if len(r.hosts) < ROLLOUT_HOSTS:
            r.hosts.add(host)
        r.folded += 1
        out.rollout = len(r.hosts)
        out.rollout_kind = r.kind
        out.rollout_name = r.name
        out.suppressed = True
        what = "upgrade" if r.kind == UPGRADE else "rollout"
        out.reason = (f"{what} across hosts: {show_name(event.name)} anomalous on "
                      f"{len(r.hosts)} hosts within {format_duration(ts - r.start)}, first on "
                      f"{r.first_host or 'an unnamed host'}; folded into that alert. "
                      f"{out.reason}")
        return True

    def _in_burst(self, out: Outcome) -> bool:
        """Counts a novel anomaly in its host's burst; True when the burst decided it
        (its alert, or folded into it)."""
        event = out.event
        ts = event.ts
        host = event.host or ""
        b = self.bursts.get(host)
        # Live events reach the model slightly out of time order (request capture reports
        # a connection when it goes idle): an event a little older than the burst's last
        # belongs to it, rather than starting a new burst with five more single alerts.
        if b is None or not -BURST_GAP < ts - b.last < BURST_GAP:
            b = self.bursts[host] = _Burst(ts)
        b.count += 1
        b.last = max(b.last, ts)
        if len(b.names) < BURST_NAMES:
            b.names.append(out.entity)
        if b.count <= BURST_SINGLES:
            return False
        if out.request_class in SENSITIVE_CLASSES:
            # Folding groups noise; it never hides a credential, token or identity request:
            # that one is reported on its own, when it happens, naming the burst.
            out.reason += (f" (a new caller asking for {out.request_class} in a burst of "
                           f"{b.count} new callers on its host: reported on its own, never "
                           f"folded)")
            return False
        out.burst = b.count
        if b.alerted:
            out.suppressed = True
            return True
        b.alerted = True
        out.alert = True
        names = ", ".join(b.names)
        out.reason = (
            f"burst of new callers on {host or 'an unnamed host'}: {b.count} never seen "
            f"within {format_duration(ts - b.start)} ({names}); later new callers of this "
            f"burst are folded into this alert. {out.reason}"
        )
        return True

    def _prune_suppression(self, now: float) -> None:
        self.last_alert = {k: (t, win) for k, (t, win) in self.last_alert.items()
                           if now - t < SUPPRESSION_STREAK * win}
        self._next_prune = now + self.settings.suppression_window

    # -- introspection -----------------------------------------------------------
    def model_size(self) -> dict[str, int]:
        """Tracked (context, value) entities per detector."""
        return {d.name: len(t) for d, t in zip(DETECTORS, self.tables, strict=True)}

    def count(self, detector: str, ctx: Hashable, value: Hashable) -> float:
        """The decayed number of calls with `value` in `ctx` of `detector`, as of the last
        event (0 when not in the model)."""
        self._flush()
        if self.last_ts is None:
            return 0.0
        table = self.tables[DETECTOR_NAMES.index(detector)]
        return table.count(ctx, value, self.clock.weight(self.last_ts))

    @property
    def hosts_seen(self) -> int:
        return len(self.hosts)

    def reset_memo(self) -> None:
        """Forget the callers memo (after the tables or hosts were replaced)."""
        self._dirty.clear()
        self._callers.clear()
        self._gen += 1


def _prune(table: RarityTable, floor: float, retired: set[Host]) -> None:
    for ctx in list(table.contexts):
        c = table.contexts[ctx]
        values = c.values
        for value in [v for v, e in values.items() if e.n < floor]:
            del values[value]
            table.entries -= 1
        if not values:
            del table.contexts[ctx]
            continue
        if retired:
            for e in (c, *values.values()):
                e.hosts = drop_hosts(e.hosts, retired)

