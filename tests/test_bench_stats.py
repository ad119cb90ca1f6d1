"""The evaluation's statistics: recall intervals are exact binomial (Clopper-Pearson)."""

import pytest

from bench.evaluate import Result


def result(detected: int, total: int) -> Result:
    r = Result(system="x", actors_total=total)
    r.detected = {f"a{i}": 0.0 for i in range(detected)}
    return r


def test_all_detected_interval_matches_the_closed_form():
    lo, hi = result(20, 20).recall_interval()
    # With k = n the lower bound is (alpha/2) ** (1/n).
    assert lo == pytest.approx(0.025 ** (1 / 20), rel=1e-9)
    assert hi == 1.0


def test_none_detected_interval_matches_the_closed_form():
    lo, hi = result(0, 20).recall_interval()
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.025 ** (1 / 20), rel=1e-9)


def test_interval_contains_the_estimate_and_narrows_with_more_actors():
    small = result(10, 20).recall_interval()
    large = result(100, 200).recall_interval()
    for lo, hi in (small, large):
        assert lo < 0.5 < hi
    assert large[1] - large[0] < small[1] - small[0]
