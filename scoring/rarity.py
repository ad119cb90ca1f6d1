"""Decayed statistics of values within contexts, and how rare a value is now.

A `RarityTable` keeps, for each context (e.g. a process name) and each value seen in it
(e.g. a user), decayed evidence of how common the value is. Three kinds of evidence make
a value common, and the strongest one counts:

    p_volume = (nu + 1 + n_k) / (n + nu + 1)   # its share of the context's calls, with the
                                               # Chinese-restaurant mass of "something new"
    p_recur  = (days_k - 1) / days             # its share of the days the context was active
    p_spread = min(h_k - 1, n_k) / (H - 1)     # share of the context's other hosts showing it

A value never seen is judged by how often the context has produced new values, per call
and per unit of time, and the more surprising of the two counts:

    p_new = min((nu + 1) / (n + nu + 1),  (nu + 1) * NOVELTY_RESOLUTION / exposure)

`nu` measures the context's diversity: the number of its values, each counted by how much
it recurs: a value's first day counts 1/2 times the time since the context's previous new
value (in hours, up to 1), its second active day makes it a full value. A burst of 50
throwaway names adds about one name's first day, 1/2. It decays like every count, so
diversity fades, and a burst neither lowers later scores nor blinds the model.
`exposure` is the decayed time the context has been watched. Judging novelty against time
means call volume cannot be chosen to hide a newcomer: after days of a stable caller set,
the first new caller is rare whether the context made 800 calls or 800,000.

`p_recur` lets a steady newcomer settle: a value that recurs day after day becomes part of
the context, however small its share of a chatty fleet's volume. Its first day is not
counted, as the first host is not for spread: recurrence within a day is no evidence.
The spread term makes the judgement population-aware: a value seen on most of the hosts
that run the context is not rare, however few calls it makes. Capping hosts by the
decayed count lets spread fade with the history that supports it; the first host to show
a value is not counted.

Counts are stored pre-multiplied by a growing weight 2^((t - ref)/half_life) instead of
being decayed in place, so learning is O(1); `Clock` moves `ref` forward before the
weight can overflow, whatever the spread of event times.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Any

HOUR = 3600.0
DAY = 24 * HOUR
# A new value is judged by the chance that the context produces one within this long.
NOVELTY_RESOLUTION = 120.0
# A value counts in full in its context's diversity once active on this many days; its
# first day counts by the time since the context's previous new value, in episodes.
NOVELTY_RECUR = 2.0
NOVELTY_EPISODE = HOUR
# Reasons name a context's most frequent values; past this many values there are none worth
# naming, and scanning them on every anomaly would make a flood of new values quadratic.
TOP_VALUES_SCAN_LIMIT = 512


# -- the clock -------------------------------------------------------------------------------

class Clock:
    """The shared clock of forgetting: weight(t) = 2^((t - ref) / half_life).

    The exponent is bounded on both sides, so no spread of event times can overflow or
    underflow to a zero weight: past RESCALE_EXP the reference moves to `t` and every stored
    count is multiplied by 2^-x (which may underflow to 0: history that old is forgotten);
    an event more than FLOOR_EXP half-lives before the reference is weighted as if it were
    that old (its weight is negligible either way, but never 0)."""

    RESCALE_EXP = 40.0
    FLOOR_EXP = -60.0

    __slots__ = ("half_life", "ref", "rescale", "now")

    def __init__(self, half_life: float, ref: float | None = None,
                 rescale: Callable[[float], None] | None = None) -> None:
        if not (half_life > 0 and math.isfinite(half_life)):
            raise ValueError("half_life must be a finite duration longer than zero")
        self.half_life = half_life
        self.ref = ref
        self.rescale = rescale
        self.now = ref  # the time of the last weight asked for: the event being judged

    def weight(self, ts: float) -> float:
        self.now = ts
        ref = self.ref
        if ref is None:
            self.ref = ts
            return 1.0
        x = (ts - ref) / self.half_life
        if x > self.RESCALE_EXP:
            # Move the reference to now: stored counts shrink by 2^-x, weights restart at 1.
            if self.rescale is not None:
                self.rescale(2.0 ** -x if x < 2000 else 0.0)
            self.ref = ts
            return 1.0
        if x < self.FLOOR_EXP:
            x = self.FLOOR_EXP
        return 2.0 ** x

    def exposure(self, since: float, ts: float) -> float:
        """Decayed seconds watched from `since` to `ts`: the integral of 2^((s - ts)/hl)."""
        span = ts - since
        if not span > 0:
            return 0.0
        hl = self.half_life
        x = span / hl
        return hl / math.log(2) * (1.0 - 2.0 ** -x) if x < 2000 else hl / math.log(2)


# -- host sets: exact up to a cap, then a HyperLogLog ------------------------------------------

EXACT_HOSTS = 32  # an entry seen on more hosts than this keeps a sketch instead of the ids
HLL_BITS = 10
HLL_M = 1 << HLL_BITS
_HLL_ALPHA = 0.7213 / (1 + 1.079 / HLL_M)


def host_hash(name: str) -> int:
    """A stable 64-bit hash of a host name: sketches from different processes and states
    agree on it, so they merge (Python's own hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def hll_slot(h: int) -> tuple[int, int]:
    """(register, rank) of a 64-bit hash in a sketch of HLL_M registers."""
    idx = h & (HLL_M - 1)
    rest = h >> HLL_BITS
    rank = (64 - HLL_BITS) - rest.bit_length() + 1
    return idx, rank


class Host:
    """A host of the fleet (a member of exact host sets): its sketch slot, when last seen."""

    __slots__ = ("name", "slot", "last_seen")

    def __init__(self, name: str, last_seen: float) -> None:
        self.name = name
        self.slot = hll_slot(host_hash(name))
        self.last_seen = last_seen


class Sketch:
    """Hosts past EXACT_HOSTS as a HyperLogLog, in two generations (epochs), so hosts
    silent for more than an epoch drop out: `add` in a new epoch retires the older one.

    The estimate is read on every scored event (host spread), and a context's sketch
    changes with nearly every event of a large fleet, so the harmonic sum and the zero
    count of the union of both generations are kept up to date by `add` (O(1)) instead
    of being recomputed over all registers (O(HLL_M)); `roll` and `merge`, which happen
    once per epoch or state merge, recompute them."""

    __slots__ = ("cur", "prev", "epoch", "_sum", "_zeros")

    def __init__(self, epoch: int, cur: bytearray | None = None,
                 prev: bytearray | None = None) -> None:
        self.epoch = epoch
        self.cur = cur if cur is not None else bytearray(HLL_M)
        self.prev = prev
        self._recount()

    def _recount(self) -> None:
        regs = self.registers()
        self._zeros = regs.count(0)
        self._sum = sum(_POW2[r] for r in regs)

    def roll(self, epoch: int) -> None:
        if epoch > self.epoch:
            self.prev = self.cur if epoch == self.epoch + 1 else None
            self.cur = bytearray(HLL_M)
            self.epoch = epoch
            self._recount()

    def add(self, slot: tuple[int, int], epoch: int) -> None:
        if epoch != self.epoch:
            self.roll(epoch)
        idx, rank = slot
        cur = self.cur
        old = cur[idx]
        if old < rank:
            cur[idx] = rank
            prev = self.prev
            if prev is not None and prev[idx] > old:
                old = prev[idx]
            if old < rank:  # the union's register grew
                self._sum += _POW2[rank] - _POW2[old]
                if old == 0:
                    self._zeros -= 1

    def registers(self) -> bytes:
        """The union of both generations."""
        if self.prev is None:
            return bytes(self.cur)
        return bytes(map(max, self.cur, self.prev))

    def __len__(self) -> int:
        est = _HLL_ALPHA * HLL_M * HLL_M * _POW2_ONE / self._sum
        if est <= 2.5 * HLL_M and self._zeros:
            est = HLL_M * math.log(HLL_M / self._zeros)
        return max(1, round(est))

    def merge(self, other: Sketch) -> None:
        """Union with `other` (generations aligned by epoch)."""
        if other.epoch > self.epoch:
            self.roll(other.epoch)
        for mine, theirs in _aligned(self, other):
            if theirs is None:
                continue
            # Indexed, not enumerate(): mypyc (1.14-2.4) cannot compile a loop over a bytearray.
            for i in range(len(theirs)):
                r = theirs[i]
                if mine[i] < r:
                    mine[i] = r
        self._recount()


# 2^-rank for every rank a 64-bit hash can give (the harmonic sum's terms), as integers
# scaled by 2^65: the kept sum is exact, so it never drifts from a recount (a state saved
# and loaded, or a restarted fleet scorer, estimates exactly as the running one did).
_POW2_ONE = 1 << 65
_POW2 = tuple(1 << (65 - r) for r in range(66))


def _aligned(a: Sketch, b: Sketch) -> Iterator[tuple[bytearray, bytearray | None]]:
    """Pairs (a's generation, b's registers for the same epoch)."""
    if b.epoch == a.epoch:
        yield a.cur, b.cur
        if b.prev is not None:
            if a.prev is None:
                a.prev = bytearray(HLL_M)
            yield a.prev, b.prev
    elif b.epoch == a.epoch - 1:
        if a.prev is None:
            a.prev = bytearray(HLL_M)
        yield a.prev, b.cur


# The hosts of an entry: None, one `Host` (most entries: no set to pay for), a set of
# `Host`s up to EXACT_HOSTS, then a `Sketch`. Told apart by `__class__` on the hot path, which
# a type checker cannot follow: to it (and to the compiled module) the union is `Any`.
HostSet = Any


def hosts_len(hs: HostSet) -> int:
    if hs is None:
        return 0
    if hs.__class__ is Host:
        return 1
    return len(hs)


def exact_hosts(hs: HostSet) -> tuple | set:
    """The hosts of an exact host set (empty for a sketch)."""
    if hs is None or hs.__class__ is Sketch:
        return ()
    if hs.__class__ is Host:
        return (hs,)
    return hs


def drop_hosts(hs: HostSet, retired: set) -> HostSet:
    """`hs` without the `retired` hosts (sketches retire theirs by generation)."""
    if hs is None or hs.__class__ is Sketch:
        return hs
    if hs.__class__ is Host:
        return None if hs in retired else hs
    kept = hs - retired
    if len(kept) > 1:
        return kept
    return next(iter(kept)) if kept else None


# -- the table -----------------------------------------------------------------------------

class Entry:
    """One value within a context: decayed calls and active days (with the last day it
    was active in), its hosts, when first seen."""

    __slots__ = ("n", "days", "day", "hosts", "first_seen", "credit")

    def __init__(self, first_seen: float, hosts: HostSet = None) -> None:
        self.credit = 0.0  # the share of one value it adds to its context's diversity
        self.n = 0.0
        self.days = 0.0
        self.day = -1
        self.hosts = hosts
        self.first_seen = first_seen


class Context(Entry):
    """A context: its values, and the same evidence summed over them, plus diversity."""

    __slots__ = ("values", "novelty", "last_novelty")

    def __init__(self, first_seen: float, hosts: HostSet = None) -> None:
        super().__init__(first_seen, hosts)
        self.values: dict[Hashable, Entry] = {}
        self.novelty = 0.0
        self.last_novelty = -math.inf


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

    @property
    def new(self) -> bool:
        return self.n_value <= 0


def add_host(hs: HostSet, host: Host, epoch: int) -> HostSet:
    """`hs` with `host` in it (the same object, or the next form when it outgrows its own)."""
    if hs is None:
        return host
    cls = hs.__class__
    if cls is Sketch:
        hs.add(host.slot, epoch)
        return hs
    if cls is Host:
        return hs if hs is host else {hs, host}
    if host in hs:
        return hs
    if len(hs) < EXACT_HOSTS:
        hs.add(host)
        return hs
    sketch = Sketch(epoch)
    for h in hs:
        sketch.add(h.slot, epoch)
    sketch.add(host.slot, epoch)
    return sketch


class RarityTable:
    """Contexts of one detector, each with its values, on the scorer's clock.

    Detectors with their own probability (scoring.detectors) read it through
    `probability`, `count` and `distinct`, which take the weight of now, `w`."""

    __slots__ = ("contexts", "entries", "clock")

    def __init__(self, clock: Clock | None = None) -> None:
        self.contexts: dict[Hashable, Context] = {}
        self.entries = 0
        self.clock = clock

    def __len__(self) -> int:
        return self.entries

    def probability(self, ctx: Hashable, value: Hashable, w: float) -> float:
        """How likely a value at most as common as `value` is in `ctx` now."""
        c, e = self.lookup(ctx, value)
        clock = self.clock
        assert clock is not None, "a table is read on its scorer's clock"
        return probability(clock, c, e, w, clock.now if clock.now is not None else 0.0)

    def count(self, ctx: Hashable, value: Hashable, w: float) -> float:
        """The decayed number of times `value` was seen in `ctx` (0 when never)."""
        _, e = self.lookup(ctx, value)
        return e.n / w if e is not None else 0.0

    def distinct(self, ctx: Hashable) -> int:
        """How many values `ctx` has."""
        c = self.contexts.get(ctx)
        return len(c.values) if c is not None else 0

    def lookup(self, ctx: Hashable, value: Hashable) -> tuple[Context | None, Entry | None]:
        c = self.contexts.get(ctx)
        if c is None:
            return None, None
        return c, c.values.get(value)

    def ensure(self, ctx: Hashable, value: Hashable, ts: float) -> tuple[Context, Entry]:
        """The context and entry of (ctx, value), created empty when missing."""
        c = self.contexts.get(ctx)
        if c is None:
            c = self.contexts[ctx] = Context(ts)
        e = c.values.get(value)
        if e is None:
            e = c.values[value] = Entry(ts)
            self.entries += 1
        return c, e

    def top_values(self, ctx: Hashable, w: float, k: int = 3) -> list[tuple[Hashable, float]]:
        """The context's most frequent values now (for reasons), most frequent first."""
        c = self.contexts.get(ctx)
        if c is None or len(c.values) > TOP_VALUES_SCAN_LIMIT:
            return []  # a context this diverse has no "usual" values worth naming
        ranked = heapq.nlargest(k, c.values.items(), key=lambda kv: kv[1].n)
        return [(v, e.n / w) for v, e in ranked]

    def rescale(self, factor: float) -> None:
        """Multiply every stored weight by `factor` (moving the clock's reference)."""
        for c in self.contexts.values():
            c.n *= factor
            c.days *= factor
            c.novelty *= factor
            for e in c.values.values():
                e.n *= factor
                e.days *= factor

    def items(self) -> Iterator[tuple[Hashable, Context]]:
        return iter(self.contexts.items())


def probability(clock: Clock, c: Context | None, e: Entry | None, w: float, ts: float
                ) -> float:
    """How likely a value at most this common is in context `c` now (weight `w`)."""
    if c is None or not c.n > 0:
        return 1.0
    n_c = c.n / w
    nu = c.novelty / w
    if e is None or not e.n > 0:
        p = (nu + 1.0) / (n_c + nu + 1.0)
        exposure = clock.exposure(c.first_seen, ts)
        if exposure > 0:
            p_time = (nu + 1.0) * NOVELTY_RESOLUTION / exposure
            if p_time < p:
                return p_time
        return p
    n_k = e.n / w
    p = (nu + 1.0 + n_k) / (n_c + nu + 1.0)
    if p >= 1.0:
        return 1.0
    if c.days > 0:
        recur = (e.days - w) / c.days
        if recur > p:
            p = recur
    others = hosts_len(c.hosts) - 1
    if others > 0:
        spread = min(hosts_len(e.hosts) - 1, n_k) / others
        if spread > p:
            p = spread
    return p if p < 1.0 else 1.0


def assess(clock: Clock, c: Context | None, e: Entry | None, w: float, ts: float
           ) -> Rarity:
    """`probability` with the evidence behind it, for reasons."""
    p = probability(clock, c, e, w, ts)
    if c is None:
        return Rarity(p, 0.0, 0.0, 0, 0, 0, None)
    n_k = e.n / w if e is not None else 0.0
    return Rarity(p, n_k, c.n / w, len(c.values), hosts_len(e.hosts) if e is not None else 0,
                  hosts_len(c.hosts), e.first_seen if e is not None else None)
