"""Fit-shaping parameters are frozen at fit; score-shaping ones once a threshold exists."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from patchcore.core.detector import PatchCore
from patchcore.core.params import FIT_PARAMS, SCORE_PARAMS, SETTINGS


@pytest.fixture(scope="module")
def fitted(toy_images) -> PatchCore:
    train, _, _ = toy_images
    return PatchCore(image_size=64, coreset_ratio=0.25, progress=False).fit(train[:3])


def test_every_parameter_has_a_rule() -> None:
    names = PatchCore._param_names()
    assert sorted(names) == sorted(FIT_PARAMS + SCORE_PARAMS + SETTINGS)


@pytest.mark.parametrize(
    ("name", "value"),
    [("image_size", 96), ("backbone", "resnet18"), ("coreset_ratio", 0.5), ("seed", 1),
     ("kernel_size", 5), ("feature_dtype", "float32"), ("layers", ("stage2", "stage3")),
     ("augment", "rot90")],
)  # fmt: skip
def test_fit_parameters_are_refused_on_a_fitted_model(fitted, name: str, value) -> None:
    det = copy.deepcopy(fitted)
    with pytest.raises(ValueError, match=rf"^{name} is fixed by fit: .*fit again"):
        det.set_params(**{name: value})
    assert det.get_params() == fitted.get_params()  # nothing changed
    det.set_params(**{name: getattr(fitted, name)})  # its own value: allowed
    PatchCore(**fitted.get_params()).set_params(**{name: value})  # unfitted: allowed


def test_score_parameters_are_free_until_a_threshold_exists(fitted, toy_images) -> None:
    _, good, bad = toy_images
    det = copy.deepcopy(fitted).set_params(top_k=1, num_neighbors=3, sigma=2.0)
    before = det.score_samples(good + bad)
    det.set_threshold(float(np.median(before)))
    for name, value in (("top_k", 5), ("num_neighbors", 1), ("sigma", 4.0)):
        with pytest.raises(ValueError, match=rf"^{name} changes what a score .*clear_threshold"):
            det.set_params(**{name: value})
    assert det.top_k == 1 and det.sigma == 2.0
    det.clear_threshold()
    assert det.threshold_ is None and det.normalization_ is None and det.display_range_ is None
    det.set_params(top_k=5).set_threshold(1.0)
    det.region_threshold_ = 0.5
    det.clear_threshold()
    assert det.region_threshold_ is None
    det.region_threshold_ = 0.5  # a region threshold alone freezes them too
    with pytest.raises(ValueError, match="^sigma changes"):
        det.set_params(sigma=1.0)


def test_scoring_settings_apply_to_a_fitted_model(fitted, toy_images) -> None:
    _, good, _ = toy_images
    det = copy.deepcopy(fitted).set_threshold(1.0)
    want = det.score_samples(good)
    det.set_params(batch_size=1, progress=False, device="cpu")
    np.testing.assert_array_equal(det.score_samples(good), want)
    det.set_params(search_precision="float32")
    assert det._index.precision == "float32"  # the index was rebuilt, not left as it was
    np.testing.assert_allclose(det.score_samples(good), want, rtol=1e-5)
