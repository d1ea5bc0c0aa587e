"""The benchmarks' statistics: percentiles as numpy computes them, always ordered."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks._timing import percentile, summarize


def test_equal_samples_give_that_value_for_every_percentile() -> None:
    # 3 equal samples: `a * 0.8 + a * 0.2` put p10 one ulp above the median (seen in a run)
    value = 3.647611111111111e-06
    stats = summarize([value] * 3, loops=1)
    assert stats.p10_s == stats.median_s == stats.p90_s == value


@pytest.mark.parametrize("seed", range(20))
def test_percentiles_match_numpy_and_stay_ordered(seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = list(rng.lognormal(-12, 0.5, size=int(rng.integers(1, 40))))
    ordered = sorted(samples)
    for q in (10, 50, 90):
        assert percentile(ordered, q) == pytest.approx(float(np.percentile(samples, q)),
                                                       rel=1e-12)
    stats = summarize(samples, loops=1)
    assert stats.p10_s <= stats.median_s <= stats.p90_s
