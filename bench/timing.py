"""When things happen: periodic pollers with jitter, Poisson arrivals, short bursts.

All draws come from one seeded `random.Random`, so a scenario is a pure function of
its seed and scale.
"""

from __future__ import annotations

import random


def periodic(
    rng: random.Random, start: float, end: float, period: float, jitter: float = 0.1
) -> list[float]:
    """A poller's connection times: first tick at a random phase, then every `period`
    seconds ± `jitter` (a fraction), as agents with a timer loop behave."""
    out: list[float] = []
    t = start + rng.uniform(0, period)
    while t < end:
        out.append(t)
        t += period * (1.0 + rng.uniform(-jitter, jitter))
    return out


def poisson(rng: random.Random, start: float, end: float, per_day: float) -> list[float]:
    """Arrivals at a constant rate (per day): image pulls, DNS lookups."""
    out: list[float] = []
    if per_day <= 0:
        return out
    rate = per_day / 86400.0
    t = start + rng.expovariate(rate)
    while t < end:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def burst(rng: random.Random, start: float, count: int, spread: float) -> list[float]:
    """`count` connections within `spread` seconds from `start`, in order."""
    return sorted(start + rng.uniform(0, spread) for _ in range(count))


def pair(times: list[float], gap: float = 0.004) -> list[float]:
    """IMDSv2 clients connect twice per poll: PUT /latest/api/token, then the GET."""
    out: list[float] = []
    for t in times:
        out.append(t)
        out.append(t + gap)
    return out
