"""The scorer's tunables, with defaults meant for production fleets."""

from __future__ import annotations

from dataclasses import dataclass, field

DAY = 86400.0

# The model's cap on (context, value) entries, by mode; `scoring.max_entities` in the
# config sets any of them. A node's own callers are few, so the agent's cap is what keeps
# its memory within the DaemonSet's limit under a flood of new names; the fleet scorer's
# holds the callers of a large fleet; replay keeps the scorer's default. `make bench`
# measures the memory each cap costs.
REPLAY_MAX_ENTITIES = 200_000
AGENT_MAX_ENTITIES = 75_000
FLEET_MAX_ENTITIES = 1_200_000

# Elastic's companion rule "Unusual Linux User Calling the Metadata Service" alerts at 75;
# every other detector follows the global threshold (50, the seed rule's).
DEFAULT_DETECTOR_THRESHOLDS = {"rare_user": 75.0}


@dataclass
class ScorerSettings:
    threshold: float = 50.0
    detector_thresholds: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_DETECTOR_THRESHOLDS)
    )
    # A day covers the daily cycle of cron jobs and agents before anything may alert;
    # weekly jobs still alert once, which a fleet owner can except in the config.
    learning_period: float = 1 * DAY
    # History fades with this half-life, so a fleet's old habits stop vouching for a name.
    half_life: float = 14 * DAY
    # One alert per (detector, entity) per window, fleet-wide: a collector rolled out to
    # every node raises one alert, not one per node. Later anomalous events of the entity
    # still show in the anomaly metrics with their host.
    suppression_window: float = 3600.0
    # Known legitimate callers (name and executable both match the catalog) have the scores
    # of the detectors that judge *what* runs multiplied by this; who runs it and how it was
    # started are still judged in full.
    known_caller_factor: float = 0.3
    # Hard cap on the model's (context, value) entries over all detectors: past it the
    # weakest (fewest active days, newest) are evicted, so a flood of throwaway names
    # cannot grow the model without bound nor push out the established history.
    max_entities: int = REPLAY_MAX_ENTITIES

    def threshold_for(self, detector: str) -> float:
        return max(self.threshold, self.detector_thresholds.get(detector, self.threshold))
