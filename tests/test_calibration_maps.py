"""What calibration chooses on the maps: the map scale of the region cut (regions agree with
verdicts) and the heatmap display range, stored in the fitted state and in model files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import data_set

from patchcore.core.calibration import DISPLAY_TOP
from patchcore.core.detector import PatchCore
from patchcore.lean import record
from patchcore.lean.regions import DEFAULT_MIN_AREA, label_regions


@pytest.fixture(scope="module")
def fitted(toy_images) -> PatchCore:
    train, _, _ = toy_images
    return PatchCore(image_size=64, coreset_ratio=0.25, progress=False).fit(train[:3])


def test_calibration_stores_the_map_scale_and_display_range(fitted, toy_images, tmp_path):
    _, good, bad = toy_images
    det = copy.deepcopy(fitted)
    r = det.score(good + bad, maps="native")  # an independent pass: the same numbers
    ratio = [float(m.max()) / s for m, s in zip(r.maps, r.scores, strict=True)]
    lo, hi = min(float(m.min()) for m in r.maps), max(float(m.max()) for m in r.maps)
    det.calibrate(good + bad, [0] * len(good) + [1] * len(bad))
    assert det.map_scale_ == pytest.approx(float(np.median(ratio)), rel=1e-12)
    assert det.display_range_ == pytest.approx((lo, DISPLAY_TOP * hi), rel=1e-12)
    assert det.region_cut() == pytest.approx(det.threshold_ * det.map_scale_, rel=1e-12)
    # a hand-set threshold keeps the calibrated map scale: the cut follows the threshold
    det.set_threshold(2.0)
    assert det.region_cut() == pytest.approx(2.0 * det.map_scale_)
    back = PatchCore.load(det.save(tmp_path / "m.pt"))
    assert back.map_scale_ == det.map_scale_ and back.display_range_ == det.display_range_
    assert back.card()["map_scale"] == det.map_scale_
    # calibrate_normal and set_threshold(images=...) choose them from their own pass
    det.clear_threshold().set_threshold(1.0, images=good)
    assert det.map_scale_ == pytest.approx(float(np.median(ratio[: len(good)])), rel=1e-12)
    normal = copy.deepcopy(fitted).calibrate_normal(good + good, max_fpr=0.2)
    assert normal.map_scale_ == pytest.approx(det.map_scale_) and normal.display_range_


def test_reused_scores_take_map_extremes_or_keep_the_map_facts(fitted, toy_images) -> None:
    _, good, bad = toy_images
    images, labels = good + bad, [0] * len(good) + [1] * len(bad)
    r = fitted.score(images, maps="native")
    extremes = np.array([(m.min(), m.max()) for m in r.maps])
    a = copy.deepcopy(fitted).calibrate(images, labels)
    b = copy.deepcopy(fitted).calibrate(images, labels, scores=r.scores, map_extremes=extremes)
    assert a.map_scale_ == b.map_scale_ and a.display_range_ == b.display_range_
    assert a.threshold_ == b.threshold_
    # scores alone: the images are not read (names will do) and the map facts are kept
    names = [f"not a file {i}" for i in range(len(images))]
    c = copy.deepcopy(fitted).calibrate(names, labels, scores=r.scores)
    assert c.threshold_ == a.threshold_ and c.map_scale_ is None and c.display_range_ is None
    a.calibrate_normal(None, max_fpr=0.2, scores=r.scores[: len(good)] + 0.0)
    assert a.map_scale_ == b.map_scale_ and a.threshold_method_ == "conformal"
    with pytest.raises(ValueError, match=r"map_extremes must have shape \(8, 2\)"):
        copy.deepcopy(fitted).calibrate(images, labels, scores=r.scores, map_extremes=extremes[:3])


def test_display_range_rule_and_older_files(fitted, tmp_path) -> None:
    det = copy.deepcopy(fitted)
    assert det.display_range_ is None  # no threshold, no calibration: each map its own
    det.set_threshold(2.0)  # none chosen on maps: the rule's threshold fallback
    assert det.display_range_ is None
    assert record.display_range(det.display_range_, det.threshold_) == (1.0, 2.5)
    # a file from before the state had it: the workflow's metadata range is read
    det.metadata_ = {"display_range": [0.25, 3.0]}
    raw = torch.load(det.save(tmp_path / "m.pt"), weights_only=True)
    assert "display_range" not in raw["state"] and "map_scale" not in raw["state"]
    old = PatchCore.load(tmp_path / "m.pt")
    assert old.display_range_ == (0.25, 3.0) and old.map_scale_ is None
    assert old.region_cut() == 2.0  # an older file cuts at its threshold, as it did


@pytest.mark.slow
def test_regions_agree_with_verdicts_on_real_casting_images() -> None:
    """Casting at 224 px: fit on 10 normal images, calibrate on 12 normal + 12 defective,
    inspect 20 + 20 others. Every anomalous record shows a region and every normal one none;
    with the map-scale cut, fewer flagged images need the peak-region fallback than at the image
    threshold (measured on this subset with the default efficientnet-lite2: 7 of 28 at the
    image threshold, 4 of 28 with the cut; efficientnet-lite0 gave 7 and 2 of 19)."""
    from patchcore.core.datasets import load_folder

    root = data_set("casting")
    train = load_folder(root, "train")[:10]
    test = load_folder(root, "test")
    good = [s.image for s in test if not s.is_anomalous]
    bad = [s.image for s in test if s.is_anomalous]
    det = PatchCore(image_size=224, progress=False).fit(train)
    det.calibrate(good[:12] + bad[:12], [0] * 12 + [1] * 12)
    records = det.inspect(good[12:32] + bad[12:32])
    flagged = [r for r in records if r.verdict == record.ANOMALOUS]
    assert flagged and len(flagged) < len(records)
    assert all(r.regions for r in flagged)
    assert all(r.regions == () for r in records if r.verdict == record.NORMAL)
    assert {r.region_threshold for r in records} == {det.region_cut()}
    assert det.region_cut() < det.threshold_  # the map's own scale is below the score's

    def fallbacks(cut: float) -> int:
        return sum(
            not label_regions(r.anomaly_map, cut, min_area=DEFAULT_MIN_AREA) for r in flagged
        )

    assert 3 * fallbacks(det.region_cut()) <= 2 * fallbacks(det.threshold_), (
        fallbacks(det.region_cut()),
        fallbacks(det.threshold_),
        len(flagged),
    )
