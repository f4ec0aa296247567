"""Split-conformal thresholds from normal scores: rank, images needed, the guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest

from patchcore.core.conformal import (
    TooFewNormalImagesError,
    conformal_rank,
    conformal_threshold,
    normal_images_needed,
)


@pytest.mark.parametrize(("alpha", "needed"), [(0.01, 99), (0.05, 19), (0.1, 9), (0.2, 4)])
def test_images_needed_matches_one_over_alpha_minus_one(alpha: float, needed: int) -> None:
    assert normal_images_needed(alpha) == needed
    assert conformal_rank(needed, alpha) == needed  # the top score is the threshold score
    assert conformal_rank(needed - 1, alpha) > needed - 1


@pytest.mark.parametrize("alpha", [0.003, 0.01, 0.025, 0.07, 0.3, 0.5, 0.9])
def test_images_needed_is_the_smallest_count_with_a_rank(alpha: float) -> None:
    ranks = [conformal_rank(n, alpha) for n in range(0, 2000)]
    first = next(n for n, k in enumerate(ranks) if k <= n)
    assert normal_images_needed(alpha) == first
    # and against exact rational arithmetic on the decimal rate
    from fractions import Fraction

    a = Fraction(str(alpha))
    for n in (first, first + 1, 3 * first + 7):
        assert conformal_rank(n, alpha) == math.ceil((n + 1) * (1 - a))


def test_threshold_sits_just_above_the_kth_smallest_score() -> None:
    s = np.random.default_rng(0).normal(size=250)
    c = conformal_threshold(s, 0.05)
    k = math.ceil(251 * 0.95)
    kth = np.sort(s)[k - 1]
    assert (c.rank, c.n) == (k, 250)
    assert kth < c.threshold == np.nextafter(kth, np.inf)
    assert c.calibration_fpr == pytest.approx((250 - k) / 250)
    assert ((s >= c.threshold).sum(), (s > kth).sum()) == (250 - k, 250 - k)
    lo, hi = c.fpr_bounds
    assert lo == pytest.approx(0.05 - 1 / 251) and hi == pytest.approx((251 - k) / 251)
    assert hi <= 0.05
    assert c.as_dict()["fpr_bounds"] == [lo, hi]


def test_guarantee_holds_on_average_over_calibration_draws() -> None:
    """Uniform normal scores: a new normal's false-alarm probability given the calibration set
    is exactly 1 - s_(k); its mean over draws must land in [alpha - 1/(n+1), alpha]. An
    off-by-one rank moves the mean by 1/(n+1) = 0.0099, 10 standard errors."""
    rng = np.random.default_rng(1)
    n, alpha, draws = 100, 0.05, 20000
    cond = np.array(
        [1.0 - conformal_threshold(rng.random(n), alpha).threshold for _ in range(draws)]
    )
    se = cond.std() / math.sqrt(draws)
    assert alpha - 1 / (n + 1) - 3 * se <= cond.mean() <= alpha + 3 * se
    # a naive empirical quantile (rank ceil(n (1 - alpha))) misses the bound
    naive = 1.0 - np.sort(rng.random((draws, n)), axis=1)[:, math.ceil(n * (1 - alpha)) - 1]
    assert naive.mean() > cond.mean() + 5 * se


def test_too_few_images_names_the_count_needed() -> None:
    with pytest.raises(
        TooFewNormalImagesError, match=r"0\.01 needs at least 99 held-out normal"
    ) as e:
        conformal_threshold(np.arange(98.0), 0.01)
    assert (e.value.needed, e.value.given) == (99, 98)
    assert conformal_threshold(np.arange(99.0), 0.01).rank == 99


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, float("nan"), 2])
def test_rate_outside_zero_one_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        conformal_threshold(np.arange(500.0), alpha)


def test_non_finite_scores_fail_closed() -> None:
    s = np.arange(200.0)
    s[3] = np.nan
    with pytest.raises(ValueError, match="1 of 200 calibration scores are NaN"):
        conformal_threshold(s, 0.05)
    with pytest.raises(ValueError, match="1-D"):
        conformal_threshold(np.zeros((10, 10)), 0.5)
