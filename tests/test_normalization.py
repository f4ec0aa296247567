import numpy as np
import pytest

from patchcore.lean.normalization import check_mapping, fit_normalization, normalize


def test_threshold_maps_to_half_and_order_is_kept():
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, 1.5, size=200)
    t = float(np.quantile(scores, 0.8))
    m = fit_normalization(scores, t)
    n = normalize(scores, m)
    assert normalize(t, m) == 0.5
    assert n.min() == 0.0 and n.max() == 1.0
    assert np.array_equal(n >= 0.5, scores >= t)  # same verdicts
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(n[order]) >= 0)  # monotone


def test_piecewise_linear_against_hand_values():
    m = {"kind": "piecewise_linear", "low": 1.0, "threshold": 3.0, "high": 7.0}
    np.testing.assert_allclose(
        normalize([0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0], m), [0, 0, 0.25, 0.5, 0.75, 1, 1]
    )


def test_one_sided_and_manual_thresholds_stay_valid():
    below = fit_normalization([1.0, 2.0], 4.0)  # no score above: mirrored
    assert below["high"] - 4.0 == pytest.approx(4.0 - 1.0)
    assert check_mapping(fit_normalization([5.0, 5.0], 5.0))["low"] < 5.0
    manual = fit_normalization(None, 2.0)
    assert (manual["low"], manual["high"]) == (0.0, 4.0)
    assert np.isnan(normalize(np.nan, manual))
    assert fit_normalization([np.nan, 1.0, 3.0], 2.0)["low"] == 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "must be a mapping"),
        ({"kind": "minmax"}, "kind must be"),
        ({"kind": "piecewise_linear", "low": 1}, "needs numeric"),
        ({"kind": "piecewise_linear", "low": 3, "threshold": 2, "high": 4}, "low < threshold"),
        ({"kind": "piecewise_linear", "low": 1, "threshold": 2, "high": float("inf")}, "finite"),
    ],
)
def test_bad_mappings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        check_mapping(bad)
    with pytest.raises(ValueError, match="finite"):
        fit_normalization([1.0], float("nan"))
