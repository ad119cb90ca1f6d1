"""Decayed frequency statistics of values within contexts, and how rare a value is.

A `RarityTable` counts, for each context (e.g. a process name), how often each value
(e.g. a user) has been seen, with exponential forgetting, and on how many hosts. From
those counts `assess` estimates the probability of seeing a value at most this common:

    p_event  = (m + 1 + n_k) / (n + m + 1)      # Chinese-restaurant predictive mass of
                                                # "something new" plus the value's own mass
    p_spread = min(h_k - 1, n_k) / (H - 1)      # share of the context's other hosts
    p        = max(p_event, p_spread)           #   showing it (0 with one host)

`m` is the number of distinct values seen in the context, so a context that has always
been diverse (python3 run by dozens of users) finds a new value unsurprising, while one
that never varied (amazon-ssm-agent always from /usr/bin) finds it very surprising. The
spread term makes the judgement population-aware: a value seen on most of the hosts that
run the context is not rare, however few calls it makes (a boot-time caller on each new
node, a collector rolled out to every node at once). Capping hosts by the decayed count
lets spread fade with the history that supports it. The first host to show a value is
not counted: spread is evidence that the value recurs across the fleet, and one host is
no evidence of that (the same tool on a second host after an alert on the first is
lateral movement until more hosts show it).

Counts are stored pre-multiplied by a growing weight 2^((t - ref)/half_life) instead of
being decayed in place, so learning is O(1); `Decay.rescale` keeps the numbers finite.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Hashable, Iterator

# Reasons name a context's most frequent values; past this many values there are none worth
# naming, and scanning them on every anomaly would make a flood of new values quadratic.
TOP_VALUES_SCAN_LIMIT = 5000


class Decay:
    """The shared clock of forgetting: weight(t) = 2^((t - ref) / half_life)."""

    RESCALE_AT = 2.0**40

    def __init__(self, half_life: float, ref: float | None = None) -> None:
        self.half_life = half_life
        self.ref = ref

    def weight(self, ts: float) -> float:
        if self.ref is None:
            self.ref = ts
        return 2.0 ** ((ts - self.ref) / self.half_life)


class RarityTable:
    """Counts of (context, value) pairs, their contexts, and the hosts that showed them."""

    __slots__ = (
        "slot", "keys", "weight", "hosts", "first_seen",
        "ctx_slot", "ctx_keys", "ctx_weight", "ctx_hosts", "ctx_members",
    )

    def __init__(self) -> None:
        self.slot: dict[tuple[Hashable, Hashable], int] = {}
        self.keys: list[tuple[Hashable, Hashable]] = []
        self.weight = array("d")
        self.hosts: list[int] = []  # bitmap of host ids
        self.first_seen = array("d")
        self.ctx_slot: dict[Hashable, int] = {}
        self.ctx_keys: list[Hashable] = []
        self.ctx_weight = array("d")
        self.ctx_hosts: list[int] = []
        self.ctx_members: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.keys)

    def _context(self, ctx: Hashable) -> int:
        c = self.ctx_slot.get(ctx)
        if c is None:
            c = self.ctx_slot[ctx] = len(self.ctx_keys)
            self.ctx_keys.append(ctx)
            self.ctx_weight.append(0.0)
            self.ctx_hosts.append(0)
            self.ctx_members.append([])
        return c

    def learn(self, ctx: Hashable, value: Hashable, host_bit: int, w: float, ts: float) -> None:
        key = (ctx, value)
        s = self.slot.get(key)
        if s is None:
            c = self._context(ctx)
            s = self.slot[key] = len(self.keys)
            self.keys.append(key)
            self.weight.append(w)
            self.hosts.append(host_bit)
            self.first_seen.append(ts)
            self.ctx_members[c].append(s)
        else:
            self.weight[s] += w
            h = self.hosts[s]
            if not h & host_bit:
                self.hosts[s] = h | host_bit
            c = self.ctx_slot[ctx]
        self.ctx_weight[c] += w
        h = self.ctx_hosts[c]
        if not h & host_bit:
            self.ctx_hosts[c] = h | host_bit

    def probability(self, ctx: Hashable, value: Hashable, w: float) -> float:
        """`assess(...).p` without building the evidence: the per-event fast path."""
        c = self.ctx_slot.get(ctx)
        if c is None:
            return 1.0
        n_c = self.ctx_weight[c] / w
        m_c = len(self.ctx_members[c])
        s = self.slot.get((ctx, value))
        if s is None:
            return (m_c + 1) / (n_c + m_c + 1)
        n_k = self.weight[s] / w
        p = (m_c + 1 + n_k) / (n_c + m_c + 1)
        if p >= 1.0:
            return 1.0
        others = self.ctx_hosts[c].bit_count() - 1
        if others <= 0:
            return p
        spread = min(self.hosts[s].bit_count() - 1, n_k) / others
        return p if p > spread else min(1.0, spread)

    def assess(self, ctx: Hashable, value: Hashable, w: float) -> Rarity:
        """How rare `value` is in `ctx` now; `w` is the decay weight of now."""
        c = self.ctx_slot.get(ctx)
        if c is None:
            return Rarity(1.0, 0.0, 0.0, 0, 0, 0, None)
        n_c = self.ctx_weight[c] / w
        m_c = len(self.ctx_members[c])
        s = self.slot.get((ctx, value))
        hosts_c = self.ctx_hosts[c].bit_count()
        if s is None:
            return Rarity((m_c + 1) / (n_c + m_c + 1), 0.0, n_c, m_c, 0, hosts_c, None)
        n_k = self.weight[s] / w
        h_k = self.hosts[s].bit_count()
        p = (m_c + 1 + n_k) / (n_c + m_c + 1)
        spread = min(h_k - 1, n_k) / (hosts_c - 1) if hosts_c > 1 else 0.0
        return Rarity(
            min(1.0, p if p > spread else spread), n_k, n_c, m_c, h_k, hosts_c,
            self.first_seen[s],
        )

    def top_values(self, ctx: Hashable, w: float, k: int = 3) -> list[tuple[Hashable, float]]:
        """The context's most frequent values now (for reasons), most frequent first."""
        c = self.ctx_slot.get(ctx)
        if c is None:
            return []
        members = self.ctx_members[c]
        if len(members) > TOP_VALUES_SCAN_LIMIT:
            return []  # a context this diverse has no "usual" values worth naming
        ranked = heapq.nlargest(k, members, key=self.weight.__getitem__)
        return [(self.keys[s][1], self.weight[s] / w) for s in ranked]

    def rescale(self, factor: float) -> None:
        """Multiply every stored weight by `factor` in place (vectorised over the arrays)."""
        import numpy as np  # here, not at import: rescaling is rare, and replay starts faster

        for arr in (self.weight, self.ctx_weight):
            if len(arr):
                view = np.frombuffer(arr, dtype=np.float64)
                view *= factor

    def items(self) -> Iterator[tuple[Hashable, Hashable, float, int, float]]:
        for s, (ctx, value) in enumerate(self.keys):
            yield ctx, value, self.weight[s], self.hosts[s], self.first_seen[s]


class Rarity:
    """What `assess` found: probability of a value at most this common, and the evidence."""

    __slots__ = ("p", "n_value", "n_context", "distinct", "hosts_value", "hosts_context",
                 "first_seen")

    def __init__(
        self, p: float, n_value: float, n_context: float, distinct: int,
        hosts_value: int, hosts_context: int, first_seen: float | None,
    ) -> None:
        self.p = p
        self.n_value = n_value
        self.n_context = n_context
        self.distinct = distinct
        self.hosts_value = hosts_value
        self.hosts_context = hosts_context
        self.first_seen = first_seen

    @property
    def surprise(self) -> float:
        """-log10 p: 2 means one chance in a hundred."""
        return -math.log10(self.p) if self.p > 0 else 12.0
