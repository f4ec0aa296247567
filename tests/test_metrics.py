"""Tests for patchcore.core.metrics: against scikit-learn, hand-computed cases and naive
references."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn import metrics as skm

from patchcore.core import metrics

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def random_binary_problem(seed: int, n: int, tied: bool):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    if tied:
        scores = rng.integers(0, 5, n).astype(np.float64) + 0.5 * labels
    else:
        scores = rng.normal(size=n) + labels
    return labels, scores


@st.composite
def binary_problems(draw, min_size=2, max_size=40):
    """(labels, scores) with both classes, scores drawn from a small set so ties are common."""
    n = draw(st.integers(min_size, max_size))
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    labels[0], labels[-1] = 0, 1
    pool = draw(st.sampled_from(["ties", "floats"]))
    if pool == "ties":
        scores = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        scores = np.array(scores, dtype=np.float64) / 2
    else:
        scores = draw(
            st.lists(
                st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
                min_size=n,
                max_size=n,
            )
        )
        scores = np.array(scores, dtype=np.float64)
    return labels, scores


def brute_force_best(labels, scores, method, max_fpr=None, max_fnr=None):
    """Best criterion over every possible verdict ``scores >= t`` (t in scores or above all)."""
    labels = np.asarray(labels, bool)
    pos, neg = labels.sum(), (~labels).sum()
    best = -np.inf
    for t in np.r_[np.unique(scores), np.inf]:
        flagged = scores >= t
        tp, fp = (flagged & labels).sum(), (flagged & ~labels).sum()
        fpr, fnr = fp / neg, 1 - tp / pos
        if (max_fpr is not None and fpr > max_fpr) or (max_fnr is not None and fnr > max_fnr):
            continue
        best = max(best, criterion(method, tp, fp, pos, neg))
    return best


def criterion(method, tp, fp, pos, neg):
    if method == "max_f1":
        return 2 * tp / (tp + fp + pos)
    if method == "youden":
        return tp / pos - fp / neg
    return -((fp / neg) ** 2 + (1 - tp / pos) ** 2)


def criterion_at(labels, scores, threshold, method):
    labels = np.asarray(labels, bool)
    flagged = scores >= threshold
    tp, fp = (flagged & labels).sum(), (flagged & ~labels).sum()
    return criterion(method, tp, fp, labels.sum(), (~labels).sum())


# --------------------------------------------------------------------------------------------
# curves against scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curves_match_sklearn(seed, tied):
    labels, scores = random_binary_problem(seed, 200, tied)

    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(thr, sk_thr)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))

    p, r, t = metrics.precision_recall_curve(labels, scores)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(labels, scores)
    np.testing.assert_array_equal(t, sk_t)
    np.testing.assert_allclose(p, sk_p)
    np.testing.assert_allclose(r, sk_r)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores)
    )

    f1, f1_thr = metrics.f1_curve(labels, scores)
    np.testing.assert_array_equal(f1_thr, sk_t)
    expected = [skm.f1_score(labels, scores >= th, zero_division=0.0) for th in f1_thr]
    np.testing.assert_allclose(f1, expected)


@settings(max_examples=60, deadline=None)
@given(binary_problems())
def test_auroc_matches_sklearn_property(problem):
    labels, scores = problem
    assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    sk = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk[0])
    np.testing.assert_allclose(tpr, sk[1])
    np.testing.assert_array_equal(thr, sk[2])


def test_auroc_hand_computed_with_tie():
    # pairs (pos, neg): (0.8,0.1) win, (0.8,0.4) win, (0.4,0.1) win, (0.4,0.4) tie -> 3.5 / 4
    assert metrics.auroc([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.4]) == pytest.approx(0.875)
    assert metrics.auroc([True, False], [2.0, 1.0]) == 1.0
    assert metrics.auroc([True, False], [1.0, 2.0]) == 0.0


def test_auroc_accepts_float32_and_int_scores():
    labels = [0, 0, 1, 1]
    assert metrics.auroc(labels, np.array([1, 2, 3, 4], dtype=np.int64)) == 1.0
    assert metrics.auroc(labels, np.array([1, 2, 3, 4], dtype=np.float32)) == 1.0


@pytest.mark.parametrize("func", [metrics.roc_curve, metrics.auroc])
def test_single_class_is_an_error(func):
    with pytest.raises(ValueError, match="needs both normal .* all 3 labels are normal"):
        func([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="all 2 labels are anomalous"):
        func([1, 1], [0.1, 0.2])


def test_precision_recall_without_anomalies_is_an_error():
    with pytest.raises(ValueError, match="at least one anomalous"):
        metrics.precision_recall_curve([0, 0], [0.1, 0.2])


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0/1 .* found 2"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "1 non-finite"),
        ([0, 1, 1], [0.1, np.inf, 0.3], "non-finite"),
        ([0, 1], [0.1, 0.2, 0.3], "same length, got 2 and 3"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "must be 1-D"),
        (["a", "b"], [0.1, 0.2], "dtype"),
        ([0, 1], ["x", "y"], "real numbers"),
    ],
)
def test_bad_inputs_are_errors(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        metrics.auroc(labels, scores)


# --------------------------------------------------------------------------------------------
# anomaly_threshold
# --------------------------------------------------------------------------------------------

# Seven samples, scores 1..7, labels in score order 0 1 0 1 0 1 1 (4 anomalous, 3 normal).
# Flagging score >= t, t = 7 .. 1:
#   t  tp fp   F1            Youden tpr-fpr     distance^2 to (0, 1)
#   7  1  0    2/5  = .400   1/4        = .250  9/16         = .563
#   6  2  0    4/6  = .667   1/2        = .500  1/4          = .250
#   5  2  1    4/7  = .571   1/2 - 1/3  = .167  1/9 + 1/4    = .361
#   4  3  1    6/8  = .750   3/4 - 1/3  = .417  1/9 + 1/16   = .174
#   3  3  2    6/9  = .667   3/4 - 2/3  = .083  4/9 + 1/16   = .507
#   2  4  2    8/10 = .800   1 - 2/3    = .333  4/9          = .444
#   1  4  3    8/11 = .727   0                  1
# The threshold is the midpoint between the lowest flagged score and the next lower one.
HAND_LABELS = np.array([0, 1, 0, 1, 0, 1, 1])
HAND_SCORES = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])


@pytest.mark.parametrize(
    ("method", "kwargs", "expected"),
    [
        ("max_f1", {}, 1.5),  # t = 2
        ("youden", {}, 5.5),  # t = 6
        ("nearest_zero_one", {}, 3.5),  # t = 4
        ("max_f1", {"max_fpr": 1 / 3}, 3.5),  # fp <= 1 leaves t >= 4: best F1 at t = 4
        ("max_f1", {"max_fpr": 0.0}, 5.5),  # fp = 0 leaves t >= 6
        ("youden", {"max_fnr": 0.25}, 3.5),  # tp >= 3 leaves t <= 4: best J at t = 4
        ("nearest_zero_one", {"max_fnr": 0.0}, 1.5),  # tp = 4: t = 2 (d^2 .444) beats t = 1
        ("max_f1", {"max_fpr": 0.5, "max_fnr": 0.5}, 3.5),
    ],
)
def test_threshold_hand_computed(method, kwargs, expected):
    thr = metrics.anomaly_threshold(HAND_LABELS, HAND_SCORES, method, **kwargs)
    assert thr == expected
    assert isinstance(thr, float)


def test_threshold_order_of_samples_does_not_matter():
    perm = np.random.default_rng(0).permutation(7)
    assert metrics.anomaly_threshold(HAND_LABELS[perm], HAND_SCORES[perm], "youden") == 5.5


def test_threshold_can_flag_everything_or_nothing():
    # F1: t=3 -> 2/3, t=2 -> 1/2, t=1 -> 4/5: flag all, threshold = lowest score
    assert metrics.anomaly_threshold([1, 1, 0], [1.0, 3.0, 2.0]) == 1.0
    # with FPR = 0 only "flag nothing" is allowed: threshold just above the highest score
    thr = metrics.anomaly_threshold([1, 0], [1.0, 2.0], max_fpr=0.0)
    assert thr == np.nextafter(2.0, np.inf)
    assert not (np.array([1.0, 2.0]) >= thr).any()


def test_threshold_ties_go_to_higher_threshold():
    # scores 4 3 2 1 with labels 1 0 1 0: Youden is 1/2 at t = 4 and at t = 2
    assert metrics.anomaly_threshold([0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0], "youden") == 3.5


def test_threshold_float32_midpoint_is_float32_exact():
    a = np.float32(1.0)
    b = np.nextafter(a, np.float32(2.0))  # adjacent float32 values: no float32 in between
    scores = np.array([a, b], dtype=np.float32)
    thr = metrics.anomaly_threshold([0, 1], scores)
    assert np.float32(thr) == thr
    np.testing.assert_array_equal(scores >= thr, [False, True])
    np.testing.assert_array_equal(scores >= np.float32(thr), [False, True])


@settings(max_examples=80, deadline=None)
@given(
    binary_problems(),
    st.sampled_from(metrics.THRESHOLD_METHODS),
    st.sampled_from([None, 0.0, 0.2, 0.5]),
    st.sampled_from([None, 0.3, 1.0]),
)
def test_threshold_reproduces_best_operating_point(problem, method, max_fpr, max_fnr):
    labels, scores = problem
    try:
        thr = metrics.anomaly_threshold(labels, scores, method, max_fpr=max_fpr, max_fnr=max_fnr)
    except ValueError as err:
        assert "no threshold meets both" in str(err)
        assert brute_force_best(labels, scores, method, max_fpr, max_fnr) == -np.inf
        return
    flagged = scores >= thr
    lab = labels.astype(bool)
    fpr = (flagged & ~lab).sum() / (~lab).sum()
    fnr = 1 - (flagged & lab).sum() / lab.sum()
    assert max_fpr is None or fpr <= max_fpr
    assert max_fnr is None or fnr <= max_fnr
    assert criterion_at(labels, scores, thr, method) == pytest.approx(
        brute_force_best(labels, scores, method, max_fpr, max_fnr), abs=1e-12
    )
    # the threshold lies strictly above every unflagged score (it generalises)
    if (~flagged).any():
        assert thr > scores[~flagged].max()


def test_threshold_errors():
    with pytest.raises(ValueError, match="unknown threshold method 'otsu'.*'max_f1', 'youden'"):
        metrics.anomaly_threshold(HAND_LABELS, HAND_SCORES, "otsu")
    with pytest.raises(ValueError, match="no threshold meets both max_fpr=0.0 and max_fnr=0.25"):
        metrics.anomaly_threshold(HAND_LABELS, HAND_SCORES, max_fpr=0.0, max_fnr=0.25)
    with pytest.raises(ValueError, match=r"max_fpr must be in \[0, 1\], got 1.5"):
        metrics.anomaly_threshold(HAND_LABELS, HAND_SCORES, max_fpr=1.5)
    with pytest.raises(ValueError, match=r"max_fnr must be in \[0, 1\], got -0.1"):
        metrics.anomaly_threshold(HAND_LABELS, HAND_SCORES, max_fnr=-0.1)
    with pytest.raises(ValueError, match="needs both"):
        metrics.anomaly_threshold([0, 0], [1.0, 2.0])


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def test_evaluate_hand_computed():
    predicted = [1, 1, 1, 0, 0, 0, 0]
    truth = [1, 1, 0, 1, 0, 0, 0]  # TP 2, FP 1, FN 1, TN 3
    types = ["scratch", "scratch", "good", "crack", "good", "good", "good"]
    result = metrics.evaluate(predicted, truth, defect_types=types)
    expected = {
        "NumSamples": 7,
        "NumAnomalous": 3,
        "NumNormal": 4,
        "TruePositives": 2,
        "FalsePositives": 1,
        "TrueNegatives": 3,
        "FalseNegatives": 1,
        "GlobalAccuracy": 5 / 7,
        "MeanAccuracy": (2 / 3 + 3 / 4) / 2,
        "Precision": 2 / 3,
        "Recall": 2 / 3,
        "Specificity": 3 / 4,
        "F1Score": 2 / 3,
        "FalsePositiveRate": 1 / 4,
        "FalseNegativeRate": 1 / 3,
        "ConfusionMatrix": [[3, 1], [1, 2]],
        "DefectTypeCounts": {"crack": 1, "good": 4, "scratch": 2},
        "DefectTypeRecall": {"crack": 0.0, "good": 0.75, "scratch": 1.0},
    }
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert result[key] == pytest.approx(value), key
        else:
            assert result[key] == value, key
    assert json.loads(json.dumps(result)) == result
    assert all(type(v) in (int, float, list, dict) for v in result.values())


@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 100).astype(bool)
    predicted = np.where(rng.random(100) < 0.8, truth, ~truth)
    r = metrics.evaluate(predicted, truth)
    assert r["ConfusionMatrix"] == skm.confusion_matrix(truth, predicted).tolist()
    assert r["GlobalAccuracy"] == pytest.approx(skm.accuracy_score(truth, predicted))
    assert r["MeanAccuracy"] == pytest.approx(skm.balanced_accuracy_score(truth, predicted))
    assert r["Precision"] == pytest.approx(skm.precision_score(truth, predicted))
    assert r["Recall"] == pytest.approx(skm.recall_score(truth, predicted))
    assert r["Specificity"] == pytest.approx(skm.recall_score(truth, predicted, pos_label=0))
    assert r["F1Score"] == pytest.approx(skm.f1_score(truth, predicted))
    assert r["FalsePositiveRate"] == pytest.approx(1 - r["Specificity"])
    assert r["FalseNegativeRate"] == pytest.approx(1 - r["Recall"])


def test_evaluate_zero_division_is_zero_without_warning(recwarn):
    nothing_flagged = metrics.evaluate([0, 0, 0], [0, 0, 0])
    assert nothing_flagged["Precision"] == 0.0
    assert nothing_flagged["Recall"] == 0.0
    assert nothing_flagged["F1Score"] == 0.0
    assert nothing_flagged["FalseNegativeRate"] == 0.0
    assert nothing_flagged["Specificity"] == 1.0
    assert nothing_flagged["MeanAccuracy"] == 1.0  # only the normal class is present
    all_defects = metrics.evaluate([1, 0], [1, 1])
    assert all_defects["Specificity"] == 0.0
    assert all_defects["FalsePositiveRate"] == 0.0
    assert all_defects["MeanAccuracy"] == 0.5
    assert len(recwarn) == 0


def test_evaluate_errors():
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        metrics.evaluate([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="predicted must contain only 0/1"):
        metrics.evaluate([0, 5], [0, 1])
    with pytest.raises(ValueError, match="one entry per sample"):
        metrics.evaluate([0, 1], [0, 1], defect_types=["good"])
    with pytest.raises(ValueError, match="empty"):
        metrics.evaluate([], [])


# --------------------------------------------------------------------------------------------
# pixel level
# --------------------------------------------------------------------------------------------


def naive_pro_curve(masks, maps):
    """PRO curve straight from the definition, one threshold at a time."""
    fprs, pros = [0.0], [0.0]
    neg = sum((~m).sum() for m in masks)
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fp = sum(((a >= t) & ~m).sum() for m, a in zip(masks, maps, strict=True))
        fprs.append(fp / neg)
        overlaps = []
        for mask_index, mask in enumerate(masks):
            labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
            for k in range(1, n + 1):
                region = labeled == k
                overlaps.append((maps[mask_index][region] >= t).mean())
        pros.append(np.mean(overlaps))
    return np.array(fprs), np.array(pros)


def naive_area(x, y, x_max):
    """Area under the polyline up to ``x_max``, segment by segment."""
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:], strict=True):
        if x0 >= x_max:
            break
        if x1 > x_max:  # cut the segment at x_max
            y1 = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            x1 = x_max
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def square_masks():
    """Two images 6x8 and 5x5: a 2x2 region, a 1-pixel region, and one defect-free image."""
    m1 = np.zeros((6, 8), bool)
    m1[1:3, 1:3] = True  # region A, 4 pixels
    m1[4, 6] = True  # region B, 1 pixel (not 8-connected to A)
    m2 = np.zeros((5, 5), bool)  # empty mask: only contributes to the FPR
    return [m1, m2]


def test_aupro_perfect_map_is_one():
    masks = square_masks()
    maps = [m.astype(float) for m in masks]
    assert metrics.aupro(masks, maps) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(1.0)


def test_aupro_inverted_map_is_zero():
    masks = square_masks()
    maps = [1.0 - m for m in masks]
    assert metrics.aupro(masks, maps) == pytest.approx(0.0)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.0)


def test_aupro_partial_overlap_hand_computed():
    masks = square_masks()
    maps = [np.zeros((6, 8)), np.zeros((5, 5))]
    maps[0][4, 6] = 1.0  # region B fully found, region A (4 px) not at all
    # curve: (0, 0) -> (0, 0.5) at t = 1 [B overlap 1, A overlap 0] -> (1, 1) at t = 0.
    # PRO at FPR 0.3 = 0.5 + 0.5 * 0.3 = 0.65; area = 0.3 * (0.5 + 0.65) / 2 = 0.1725
    assert metrics.aupro(masks, maps) == pytest.approx(0.1725 / 0.3)
    # a pixel-weighted overlap would be 1/5, not 1/2: regions count equally
    fpr, pro, thr = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1])
    np.testing.assert_array_equal(thr, [np.inf, 1.0, 0.0])


def test_aupro_graded_map_hand_computed():
    masks = square_masks()
    maps = [np.zeros((6, 8)), np.zeros((5, 5))]
    maps[0][1, 1:3] = 3.0  # half of region A
    maps[0][0, 0:4] = 2.0  # 4 normal pixels; there are 48 - 5 + 25 = 68 normal pixels
    maps[0][2, 1:3] = 1.0  # the other half of A
    # t=3: fpr 0, pro (0.5 + 0) / 2 = .25 ; t=2: fpr 4/68, pro .25 ; t=1: fpr 4/68, pro .5
    # t=0: (1, 1). Area to 0.3: rectangle .25 * 4/68, then trapezoid from (4/68, .5) to
    # (0.3, .5 + .5 * (0.3 - 4/68) / (1 - 4/68)).
    x1 = 4 / 68
    y_end = 0.5 + 0.5 * (0.3 - x1) / (1 - x1)
    expected = 0.25 * x1 + (0.3 - x1) * (0.5 + y_end) / 2
    assert metrics.aupro(masks, maps) == pytest.approx(expected / 0.3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_naive_definition(seed):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for shape in [(7, 9), (6, 6), (8, 5)]:
        mask = ndimage.binary_dilation(rng.random(shape) < 0.06)
        if seed == 0 and shape == (6, 6):
            mask[:] = False
        masks.append(mask)
        # integer-ish scores create ties between normal and defect pixels
        maps.append(np.round(mask * 1.5 + rng.normal(size=shape), 1))
    fpr, pro, _ = metrics.pro_curve(masks, maps)
    naive_fpr, naive_pro = naive_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, naive_fpr)
    np.testing.assert_allclose(pro, naive_pro)
    for limit in (0.3, 1.0):
        assert metrics.aupro(masks, maps, limit) == pytest.approx(
            naive_area(naive_fpr, naive_pro, limit) / limit
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn_with_mixed_sizes(seed):
    rng = np.random.default_rng(seed)
    shapes = [(10, 12), (7, 7), (16, 4)]
    masks = [rng.random(s) < 0.2 for s in shapes]
    maps = [(m + rng.normal(size=m.shape)).astype(np.float32) for m in masks]
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([a.ravel() for a in maps])
    expected = skm.roc_auc_score(flat_masks, flat_maps)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected)
    # the histogram path approaches the exact value
    assert metrics.pixel_auroc(masks, maps, num_thresholds=2000) == pytest.approx(
        expected, abs=2e-3
    )


def test_binned_path_is_exact_on_its_own_thresholds():
    rng = np.random.default_rng(3)
    masks = [rng.random((9, 9)) < 0.3, np.zeros((4, 6), bool)]
    # scores already on the grid 0, 0.25, ..., 1: binning loses nothing
    maps = [rng.integers(0, 5, m.shape) / 4 for m in masks]
    maps[0][masks[0]] += 0.25
    maps[0] = np.minimum(maps[0], 1.0)
    maps[1][0, 0] = 0.0
    maps[1][0, 1] = 1.0
    assert metrics.aupro(masks, maps, num_thresholds=5) == pytest.approx(metrics.aupro(masks, maps))
    assert metrics.pixel_auroc(masks, maps, num_thresholds=5) == pytest.approx(
        metrics.pixel_auroc(masks, maps)
    )


def test_pixel_metrics_accept_0_255_masks():
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 255
    assert metrics.aupro([mask], [mask / 255.0]) == pytest.approx(1.0)


def test_pixel_errors():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    amap = np.zeros((4, 4))
    with pytest.raises(ValueError, match="got 1 masks but 2 maps"):
        metrics.aupro([mask], [amap, amap])
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(4, 4\) but maps\[0\]"):
        metrics.pixel_auroc([mask], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="no mask contains a defect"):
        metrics.aupro([np.zeros((4, 4), bool)], [amap])
    with pytest.raises(ValueError, match="every pixel .* is a defect"):
        metrics.pixel_auroc([np.ones((4, 4), bool)], [amap])
    with pytest.raises(ValueError, match=r"maps\[0\] contains 1 non-finite"):
        metrics.aupro([mask], [np.where(mask, np.nan, 0.0)])
    with pytest.raises(ValueError, match=r"max_fpr must be in \(0, 1\], got 0"):
        metrics.aupro([mask], [amap], max_fpr=0)
    with pytest.raises(ValueError, match="num_thresholds must be an integer >= 2, got 1"):
        metrics.aupro([mask], [amap], num_thresholds=1)
    with pytest.raises(ValueError, match="empty"):
        metrics.pixel_auroc([], [])


def test_aupro_regions_are_8_connected():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = True  # touches the block below only diagonally: same region
    mask[1:3, 1:3] = True
    amap = np.zeros((5, 5))
    amap[0, 0] = 1.0
    fpr, pro, _ = metrics.pro_curve([mask], [amap])
    np.testing.assert_allclose(pro, [0, 0.2, 1])  # one region of 5 pixels, 1 found
    np.testing.assert_allclose(fpr, [0, 0, 1])


def test_metrics_object_has_one_key_per_metric():
    d = metrics.evaluate([1, 0, 1, 0], [1, 0, 0, 0], ["crack", "good", "good", "good"])
    m = metrics.Metrics.from_dict(d)
    assert m.f1_score == d["F1Score"] and m.false_positive_rate == d["FalsePositiveRate"]
    assert metrics.Metrics.key("pixel_auroc") == "PixelAUROC"
    assert metrics.Metrics.key("global_accuracy") == "GlobalAccuracy"
    out = m.as_dict()
    assert {k: out[k] for k in d} == d  # evaluate's keys are the Metrics keys
    assert out["AUROC"] is None and "PixelAUROC" not in out  # optional ones left out
    assert set(metrics.MATLAB_METRICS) <= set(out)
    assert metrics.Metrics.from_dict(out) == m
    with pytest.raises(ValueError, match="unknown metric.*Pixel AUROC"):
        metrics.Metrics.from_dict({**d, "Pixel AUROC": 0.9})


def test_degenerate_thresholds_are_warned_with_what_to_try() -> None:
    from patchcore.apps.workflow.calibrate import threshold_warnings

    labels = np.array([0] * 50 + [1] * 50)
    rng = np.random.default_rng(0)
    good = np.concatenate([rng.normal(0, 1, 50), rng.normal(3, 1, 50)])
    assert threshold_warnings(good, labels, 1.5) == []
    chance = rng.normal(0, 1, 100)
    warned = threshold_warnings(chance, labels, float(np.quantile(chance, 0.1)))
    assert len(warned) == 2
    assert "flags" in warned[0] and "normal calibration images" in warned[0]
    assert "AUROC is" in warned[1] and "--train-fraction 1" in warned[1]
