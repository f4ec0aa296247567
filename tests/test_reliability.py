"""Fail closed, bound the work, trust no file (issue #11): on the toy detector, no real data."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx2
    from fastapi.testclient import TestClient

from patchcore import NonFiniteScoreError, PatchCore
from patchcore.images import ImageReadError, as_tensor
from patchcore.service import create_app


@pytest.fixture(scope="module")
def fitted(toy_images) -> PatchCore:
    train, _, _ = toy_images
    det = PatchCore(image_size=64, coreset_ratio=0.25, progress=False, num_neighbors=3)
    det.fit(train)
    return det.set_threshold(1.0)


@pytest.fixture
def det(fitted: PatchCore) -> PatchCore:
    return copy.deepcopy(fitted)


def poison_bank(det: PatchCore, one: bool = False) -> PatchCore:
    """NaN in the bank: a whole column scores NaN; one element gives wrong finite scores."""
    if one:
        det.state_.memory_bank[0, 0] = float("nan")
    else:
        det.state_.memory_bank[:, 0] = float("nan")
    det._set_fitted(det.state_, det.extractor_)
    return det


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- 1. NaN fails closed


def test_a_nan_in_the_bank_is_never_a_pass(det: PatchCore, toy_images) -> None:
    _, good, _ = toy_images
    poison_bank(det)
    with pytest.raises(NonFiniteScoreError, match="scored nan"):
        det.predict(good[:2])
    with pytest.raises(NonFiniteScoreError, match="scored nan"):
        det.classify(good[:1])
    with pytest.raises(NonFiniteScoreError, match="memory_bank"):
        det.check_finite()


def test_one_nan_in_the_bank_is_caught_by_check_finite(det: PatchCore) -> None:
    with pytest.raises(NonFiniteScoreError, match="memory_bank"):
        poison_bank(det, one=True).check_finite()


def test_a_nan_threshold_or_backbone_is_refused(det: PatchCore, toy_images) -> None:
    _, good, _ = toy_images
    det.state_.threshold = float("nan")
    with pytest.raises(NonFiniteScoreError, match="threshold_ is nan"):
        det.predict(good[:1])
    with pytest.raises(NonFiniteScoreError, match="threshold"):
        det.check_finite()
    det.set_threshold(1.0)
    name, tensor = next(
        (k, v) for k, v in det.extractor_.state_dict().items() if v.is_floating_point()
    )
    tensor.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteScoreError, match=f"backbone tensor '{name}'"):
        det.check_finite()


def test_skipped_inputs_still_read_false_with_a_warning(fitted: PatchCore, toy_images) -> None:
    _, good, _ = toy_images
    with pytest.warns(UserWarning, match="unreadable"):
        out = fitted.predict([good[0], "missing.png"], on_error="skip")
    assert out.tolist()[1] is False


def test_non_finite_tensors_are_refused_like_arrays() -> None:
    t = torch.full((3, 16, 16), 0.5)
    t[0, 1, 1] = float("nan")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        as_tensor(t)
    t[0, 1, 1] = float("inf")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        as_tensor(t)
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        as_tensor(t.permute(1, 2, 0).numpy())


def test_service_is_not_ready_with_a_nan_model(det: PatchCore) -> None:
    poison_bank(det, one=True)  # scores stay finite (and wrong): caught at start-up
    with TestClient(create_app(det)) as c:
        for _ in range(200):
            body = c.get("/readyz").json()
            if "reason" in body and body["reason"] != "loading":
                break
            __import__("time").sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and "non-finite" in r.json()["reason"]


def test_service_answers_a_nan_score_with_an_error_verdict(
    det: PatchCore, toy_images, monkeypatch
) -> None:
    _, good, _ = toy_images
    with TestClient(create_app(det)) as c:
        for _ in range(400):
            if c.get("/readyz").status_code == 200:
                break
            __import__("time").sleep(0.05)
        poison_bank(det)  # goes bad after start-up (e.g. an overflow): still no pass
        r = c.post("/v1/inspect", files={"file": ("a.png", png(good[0]), "image/png")})
        assert r.status_code == 500, r.text
        assert r.json()["verdict"] == "error" and "scored nan" in r.json()["detail"]
        files = [("files", ("a.png", png(good[0]), "image/png"))]
        b = c.post("/v1/inspect/batch", files=files).json()
        assert b["errors"] == 1 and b["results"][0]["verdict"] == "error"
        assert b["results"][0]["status"] == 500 and b["results"][0]["result"] is None
