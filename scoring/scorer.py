"""The scorer: every metadata event is scored by each detector the moment it arrives
(event time), then learned; the best-scoring detector decides whether it is an alert.

`Scorer.process` is the one entry point the live agent and `imdswatch replay` share, so
both score identically. Nothing here reads the wall clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from math import log10

from scoring.detectors import (
    DETECTOR_NAMES,
    DETECTORS,
    Detector,
    probability_for_score,
    score_from_surprise,
)
from scoring.endpoints import Endpoint, EndpointCatalog
from scoring.events import Event
from scoring.exceptions import ExceptionRule, first_match
from scoring.known_callers import KnownCallerCatalog
from scoring.rarity import Decay, RarityTable
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
        "alert", "learning", "suppressed", "excepted", "known_caller",
    )

    def __init__(self, event: Event, endpoint: Endpoint) -> None:
        self.event = event
        self.endpoint = endpoint
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

    @property
    def severity(self) -> str:
        return severity_of(self.score)

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
# Scores under QUIET_SCORE are noise and reported as 0.
QUIET_SCORE = 10.0
QUIET_P = probability_for_score(QUIET_SCORE)


def entity_text(detector: Detector, ctx: Hashable, value: Hashable) -> str:
    def show(v: Hashable) -> str:
        if isinstance(v, tuple):
            return "@".join("-" if x is None else str(x) for x in v)
        return str(v)

    return show(value) if ctx is None else f"{show(ctx)}/{show(value)}"


class Scorer:
    """Rarity model + alert policy (learning period, thresholds, exceptions, suppression)."""

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
        self.decay = Decay(self.settings.half_life)
        self.tables: tuple[RarityTable, ...] = tuple(RarityTable() for _ in DETECTORS)
        self.host_ids: dict[str, int] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.events_learned = 0
        self.last_alert: dict[tuple, float] = {}
        self._thresholds = tuple(self.settings.threshold_for(d.name) for d in DETECTORS)
        self._factor = self.settings.known_caller_factor
        self._next_prune = 0.0

    # -- time ------------------------------------------------------------------
    @property
    def learning(self) -> bool:
        """True until `learning_period` of event time has passed since the first event."""
        if self.first_ts is None or self.last_ts is None:
            return True
        return self.last_ts - self.first_ts < self.settings.learning_period

    def _weight(self, ts: float) -> float:
        w = self.decay.weight(ts)
        if w > Decay.RESCALE_AT:
            # Move the reference to now: stored counts shrink by w, weights restart at 1.
            for t in self.tables:
                t.rescale(1.0 / w)
            self.decay.ref = ts
            w = 1.0
        return w

    def _host_bit(self, host: str | None) -> int:
        key = host or ""
        hid = self.host_ids.get(key)
        if hid is None:
            hid = self.host_ids[key] = len(self.host_ids)
        return 1 << hid

    # -- the entry point -------------------------------------------------------
    def process(self, event: Event) -> Outcome | None:
        """Score then learn one event. None when it is not to a metadata endpoint."""
        endpoint = self.catalog.match(event.dst_ip, event.dst_port)
        if endpoint is None:
            return None
        ts = event.ts
        if self.first_ts is None:
            self.first_ts = ts
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts
        w = self._weight(ts)
        known = self.known_callers.lookup_event(event) is not None
        out = Outcome(event, endpoint)
        out.known_caller = known
        out.learning = learning = self.learning

        # Score every detector against the history before this event (score, then learn).
        factor = self._factor
        scores = out.scores
        keys: list[tuple[RarityTable, Hashable, Hashable]] = []
        best_i, best_margin = -1, -1e9
        for i, det in enumerate(DETECTORS):
            value = det.value(event)
            if value is None:
                continue
            ctx = det.context(event)
            table = self.tables[i]
            keys.append((table, ctx, value))
            if det.judges is not None and not det.judges(event):
                continue  # learned, not scored
            p = (table.probability(ctx, value, w) if det.probability is None
                 else det.probability(table, ctx, value, w))
            if p >= QUIET_P:
                s = 0.0
            else:
                s = score_from_surprise(-log10(p) if p > 0 else 12.0)
                if known and det.vouched_by_known_caller:
                    s *= factor
                if s < QUIET_SCORE:
                    s = 0.0
            scores[det.name] = s
            margin = s - self._thresholds[i]
            # rare_combination (last) fires on any new combination, so it names the alert
            # only when no specific detector reaches its threshold: "curl run by www-data"
            # says more than "a new combination".
            if margin > best_margin and not (best_margin >= 0 and det.name == GENERIC):
                best_i, best_margin = i, margin

        if learning and best_margin >= 0 and not DETECTORS[best_i].history_free:
            # Only what needs no history may alert while learning: let it name the event.
            free = [(scores[d.name] - self._thresholds[i], i) for i, d in enumerate(DETECTORS)
                    if d.history_free and d.name in scores]
            if free and max(free)[0] >= 0:
                best_margin, best_i = max(free)
        if best_i >= 0 and scores[DETECTORS[best_i].name] > 0:
            det = DETECTORS[best_i]
            out.score = scores[det.name]
            out.detector = det.name
            out.rule_name = det.rule_name
            if best_margin >= 0:
                self._explain(out, best_i, w)
                self._decide(out, best_i, learning)

        host_bit = self._host_bit(event.host)
        for table, ctx, value in keys:
            table.learn(ctx, value, host_bit, w, ts)
        self.events_learned += 1
        return out

    def _explain(self, out: Outcome, i: int, w: float) -> None:
        det = DETECTORS[i]
        table = self.tables[i]
        event = out.event
        ctx, value = det.context(event), det.value(event)
        rarity = table.assess(ctx, value, w)
        if det.others_from is None:
            others = table.top_values(ctx, w)
        else:
            j = DETECTOR_NAMES.index(det.others_from)
            others = self.tables[j].top_values(DETECTORS[j].context(event), w)
        history = (self.last_ts or 0.0) - (self.first_ts or 0.0)
        out.entity = entity_text(det, ctx, value)
        out.reason = det.describe(event, rarity, others, history, len(self.host_ids))

    def _decide(self, out: Outcome, i: int, learning: bool) -> None:
        det = DETECTORS[i]
        event = out.event
        if learning and not det.history_free:
            return
        if first_match(self.exceptions, event, det.name) is not None:
            out.excepted = True
            return
        key = (det.name, out.entity)
        last = self.last_alert.get(key)
        window = self.settings.suppression_window
        if last is not None and event.ts - last < window:
            out.suppressed = True
            return
        self.last_alert[key] = event.ts
        out.alert = True
        if event.ts >= self._next_prune:
            self._prune_suppression(event.ts)

    def _prune_suppression(self, now: float) -> None:
        window = self.settings.suppression_window
        self.last_alert = {k: t for k, t in self.last_alert.items() if now - t < window}
        self._next_prune = now + window

    # -- introspection -----------------------------------------------------------
    def model_size(self) -> dict[str, int]:
        """Tracked (context, value) entities per detector."""
        return {d.name: len(t) for d, t in zip(DETECTORS, self.tables, strict=True)}

    @property
    def hosts_seen(self) -> int:
        return len(self.host_ids)

