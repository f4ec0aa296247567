"""Normal-only calibration and normalised scores on the detector: choice, storage, loading."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import textured

from patchcore.core.conformal import TooFewNormalImagesError
from patchcore.core.detector import ModelFileError, NotFittedError, PatchCore
from patchcore.lean.normalization import fit_normalization


@pytest.fixture(scope="module")
def fitted(toy_images) -> PatchCore:
    train, _, _ = toy_images
    return PatchCore(image_size=96, coreset_ratio=0.25, progress=False, num_neighbors=3).fit(train)


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    """19 held-out normal images: the fewest a 5 % rate needs."""
    rng = np.random.default_rng(7)
    return [textured(rng) for _ in range(19)]


@pytest.fixture(scope="module")
def normal_scores(fitted: PatchCore, normals) -> np.ndarray:
    return fitted.score(normals).scores


@pytest.fixture
def det(fitted: PatchCore) -> PatchCore:
    return copy.deepcopy(fitted)


def test_calibrate_normal_picks_the_conformal_rank_and_records_it(
    det, normals, normal_scores, toy_images
):
    _, good, bad = toy_images
    s = normal_scores
    assert det.calibrate_normal(normals, max_fpr=0.05) is det
    assert det.threshold_method_ == "conformal"
    assert det.threshold_ == np.nextafter(s.max(), np.inf)  # rank ceil(20 * 0.95) = 19 of 19
    c = det.calibration_
    assert (c["n"], c["rank"], c["max_fpr"], c["calibration_fpr"]) == (19, 19, 0.05, 0.0)
    assert c["fpr_bounds"] == pytest.approx([0.0, 0.05])
    assert det.predict(bad).all()  # the toy defects stay far above the normals
    # the normalised scores keep every verdict: >= 0.5 exactly when raw >= threshold
    raw = np.r_[det.score(good + bad).scores, s]
    z = det.normalize(raw)
    assert ((z >= 0.5) == (raw >= det.threshold_)).all() and (z >= 0).all() and (z <= 1).all()
    assert det.normalization_ == fit_normalization(s, det.threshold_)


def test_reusing_scores_gives_the_same_threshold(det, normal_scores):
    s = normal_scores
    det.calibrate_normal(None, max_fpr=0.1, scores=s)
    assert det.threshold_ == np.nextafter(np.sort(s)[math.ceil(20 * 0.9) - 1], np.inf)
    assert det.calibration_["rank"] == 18


def test_too_few_normals_say_how_many_the_rate_needs(det, normal_scores):
    with pytest.raises(TooFewNormalImagesError, match="0.01 needs at least 99 held-out normal"):
        det.calibrate_normal(None, max_fpr=0.01, scores=normal_scores)
    assert det.threshold_ is None  # nothing half-set


def test_non_finite_scores_fail_closed(det):
    s = np.r_[np.arange(30.0), np.nan]
    with pytest.raises(ValueError, match="NaN or infinite; no threshold"):
        det.calibrate_normal(None, max_fpr=0.1, scores=s)
    assert det.threshold_ is None


def test_every_threshold_comes_with_its_normalisation(det, toy_images):
    _, good, bad = toy_images
    with pytest.raises(NotFittedError, match="no threshold set"):
        det.normalize([1.0])
    det.set_threshold(2.0)
    assert det.normalization_ == fit_normalization(None, 2.0) and det.calibration_ is None
    np.testing.assert_allclose(det.normalize([0.0, 1.0, 2.0, 3.0, 9.0]), [0, 0.25, 0.5, 0.75, 1])
    det.calibrate(good + bad, [0] * 4 + [1] * 4)
    assert det.calibration_ == {"n_normal": 4, "n_anomalous": 4, "max_fpr": None, "max_fnr": None}
    raw = det.score(good + bad).scores
    assert det.normalization_ == fit_normalization(raw, det.threshold_)
    assert det.normalize(raw).min() == 0.0 and det.normalize(raw).max() == 1.0
    det.threshold_ = 123.0  # assigned past set_threshold: the mapping is stale, refuse it
    with pytest.raises(ValueError, match="does not belong to threshold_ = 123.0"):
        det.normalize(raw)


def test_round_trip_keeps_method_facts_and_mapping(det, normal_scores, tmp_path: Path):
    det.calibrate_normal(None, max_fpr=0.05, scores=normal_scores)
    back = PatchCore.load(det.save(tmp_path / "m.pt"))
    assert back.threshold_ == det.threshold_ and back.threshold_method_ == "conformal"
    assert back.calibration_ == det.calibration_ and back.normalization_ == det.normalization_
    assert back.card()["calibration"]["n"] == 19


def _resave(path: Path, edit) -> Path:
    """Edit a saved payload's state and write it back without a digest (an older file)."""
    p = torch.load(path, weights_only=True)
    edit(p["state"])
    p.pop("digest")
    torch.save(p, path)
    return path


def test_files_without_the_fields_load_with_the_hand_set_mapping(det, fitted, tmp_path):
    assert (
        "normalization"
        not in torch.load(fitted.save(tmp_path / "u.pt"), weights_only=True)["state"]
    )  # left out when None
    assert PatchCore.load(tmp_path / "u.pt").normalization_ is None
    det.set_threshold(3.0, method="max_f1")
    path = det.save(tmp_path / "old.pt")

    def drop(s):
        s.pop("normalization")
        s.pop("calibration", None)

    with pytest.warns(UserWarning, match="before model files carried a digest"):
        old = PatchCore.load(_resave(path, drop))
    assert old.threshold_ == 3.0 and old.calibration_ is None
    assert old.normalization_ == fit_normalization(None, 3.0)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(normalization={"kind": "sigmoid"}), "normalization kind must be"),
        (
            lambda s: s.update(normalization=dict(s["normalization"], threshold=3.0)),
            "maps threshold 3.0 to 0.5, but the threshold is 2.0",
        ),
        (lambda s: s.update(threshold=None), "stored without a threshold"),
        (lambda s: s.update(calibration=[1, 2]), "'calibration' is a list, not a mapping"),
    ],
)
def test_bad_stored_fields_are_refused_naming_the_file(det, tmp_path, edit, match):
    det.set_threshold(2.0)
    path = _resave(det.save(tmp_path / "bad.pt"), edit)
    with pytest.raises(ModelFileError, match=match) as e:
        PatchCore.load(path)
    assert str(path) in str(e.value)
