"""The ``top_k`` image score: the mean of each image's k largest patch distances."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore.core.detector import PatchCore
from patchcore.core.embedding import flatten_patches


@pytest.fixture(scope="module")
def fitted(toy_images) -> PatchCore:
    train, _, _ = toy_images
    return PatchCore(image_size=96, coreset_ratio=0.25, progress=False).fit(train)


def naive_top_k(det: PatchCore, images: list[np.ndarray], k: int) -> np.ndarray:
    """Brute force: every patch's float64 distance to every bank row, mean of the k largest."""
    out = []
    bank = det.memory_bank_.double()
    for img in images:
        assert img.shape[:2] == (96, 96)  # the processed size: no resize
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        patches = flatten_patches(det._embed(x)).double()
        nearest = torch.cdist(patches, bank).min(dim=1).values
        out.append(float(nearest.topk(k).values.mean()))
    return np.asarray(out)


def test_top_k_mean_matches_brute_force_and_defects_rank_highest(fitted, toy_images):
    _, good, bad = toy_images
    det = copy.deepcopy(fitted).set_params(top_k=10)
    got = det.score(good + bad, progress=False).scores
    assert det._index.precision in ("int8", "bfloat16", "float32")  # by the CPU's dot products
    np.testing.assert_allclose(got, naive_top_k(det, good + bad, 10), rtol=1e-5)  # exact
    assert got[len(good) :].min() > got[: len(good)].max()
    # top_k=1 without reweighting is the plain maximum, below the 10-patch mean nowhere
    plain = copy.deepcopy(fitted).set_params(top_k=1, num_neighbors=1)
    assert (plain.score(good + bad, progress=False).scores >= got - 1e-6).all()


def test_top_k_round_trips_and_files_without_it_load_as_one(fitted, toy_images, tmp_path: Path):
    _, good, _ = toy_images
    det = copy.deepcopy(fitted).set_params(top_k=5)
    det.save(tmp_path / "k5.pt")
    back = PatchCore.load(tmp_path / "k5.pt")
    assert back.top_k == 5
    np.testing.assert_array_equal(
        back.score(good, progress=False).scores, det.score(good, progress=False).scores
    )
    assert fitted.top_k == 10  # the default: saved, since files without the key mean 1
    fitted.save(tmp_path / "k10.pt")
    assert torch.load(tmp_path / "k10.pt", weights_only=True)["config"]["top_k"] == 10
    assert PatchCore.load(tmp_path / "k10.pt").top_k == 10
    paper = copy.deepcopy(fitted).set_params(top_k=1)
    paper.save(tmp_path / "k1.pt")  # the paper's score is left out of the file (older readers)
    raw = torch.load(tmp_path / "k1.pt", weights_only=True)
    assert "top_k" not in raw["config"]
    back = PatchCore.load(tmp_path / "k1.pt")
    assert back.top_k == 1
    np.testing.assert_array_equal(
        back.score(good, progress=False).scores, paper.score(good, progress=False).scores
    )


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
def test_bad_top_k_fails_with_its_value(toy_images, bad):
    train, _, _ = toy_images
    with pytest.raises((ValueError, TypeError), match="top_k"):
        PatchCore(image_size=96, top_k=bad, progress=False).fit(train[:1])


def test_the_model_card_names_the_image_score(fitted):
    from patchcore.apps.workflow.model import image_score_text, model_card

    assert fitted.card()["top_k"] == 10
    assert model_card(fitted, None)["image score"] == "mean of the 10 largest patch distances"
    assert image_score_text(1, 9) == "largest patch distance, reweighted by eq. 7 (9 neighbours)"
    assert image_score_text(1, 1) == "largest patch distance"
