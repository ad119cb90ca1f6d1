"""The host-spread sketch (scoring.rarity.Sketch): its running estimate, kept up to date
by every add, always equals a recount of its registers (so a saved and loaded state, or a
restarted fleet scorer, estimates exactly as the running one did), and it stays within
HyperLogLog's error of the true count."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.rarity import Sketch, hll_slot, host_hash

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 5000), st.integers(0, 3)),
    st.tuples(st.just("merge"), st.lists(st.integers(0, 5000), max_size=40),
              st.integers(0, 3)),
), max_size=120)


def _recounted(s: Sketch) -> Sketch:
    return Sketch(s.epoch, bytearray(s.cur), None if s.prev is None else bytearray(s.prev))


@settings(max_examples=150, deadline=None)
@given(ops)
def test_running_estimate_equals_a_recount(steps):
    s = Sketch(0)
    for op, arg, epoch in steps:
        epoch = max(epoch, s.epoch)  # event time moves forward
        if op == "add":
            s.add(hll_slot(host_hash(f"node-{arg}")), epoch)
        else:
            other = Sketch(epoch)
            for h in arg:
                other.add(hll_slot(host_hash(f"node-{h}")), epoch)
            s.merge(other)
        assert len(s) == len(_recounted(s))


def test_estimate_within_hyperloglog_error():
    s = Sketch(0)
    for n in range(1, 100_001):
        s.add(hll_slot(host_hash(f"host-{n}")), 0)
        if n in (100, 1_000, 10_000, 100_000):
            # 1024 registers: standard error 1.04/sqrt(1024) = 3.3 %; allow 4 of them.
            assert abs(len(s) - n) <= 0.13 * n, (n, len(s))
