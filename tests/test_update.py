"""Incremental updates: partial_fit continues the greedy from the bank and records itself."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import textured

from patchcore.core import sampling
from patchcore.core.detector import NotFittedError, PatchCore
from patchcore.core.update import BEFORE_UPDATE


def small(**kw) -> PatchCore:
    params = dict(image_size=96, coreset_ratio=0.25, progress=False, num_neighbors=3)
    params.update(kw)
    return PatchCore(**params)


def grid(det: PatchCore, image: np.ndarray) -> torch.Tensor:
    """(D, h, w) patch features of one uint8 image at the detector's 96 x 96."""
    return det._embed(torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255)[0].float()


def sorted_rows(t: torch.Tensor) -> list[list[float]]:
    return sorted(t.tolist())


def test_extend_coreset_is_the_greedy_continued_from_the_bank() -> None:
    """With every row in the union: the naive loop started from the bank's distances."""
    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(3000, 16, generator=g), torch.randn(50, 16, generator=g)
    sel = sampling.extend_coreset(x, 40, bank=bank, oversample=1000)
    u2 = torch.cdist(x.double(), bank.double()).amin(1).square()
    naive = []
    for _ in range(40):
        naive.append(int(u2.argmax()))
        u2 = torch.minimum(u2, (x.double() - x[naive[-1]].double()).square().sum(1))
    assert sel.indices.tolist() == naive
    assert sel.radius == pytest.approx(float(u2.max().sqrt()), rel=1e-5)
    # the chunked stages: the reported radius is the true one, close to the exact greedy's
    fast = sampling.extend_coreset(x, 40, bank=bank, oversample=3, chunk_rows=256)
    true = torch.cdist(x, torch.cat([bank, x[fast.indices]])).amin(1).max()
    assert fast.radius == pytest.approx(float(true), rel=1e-5)
    assert fast.radius <= 1.1 * sel.radius
    with pytest.raises(ValueError, match="same D"):
        sampling.extend_coreset(x, 4, bank=bank[:, :8])


def test_partial_fit_with_every_patch_kept_equals_fit_on_both(toy_images) -> None:
    """coreset_ratio=1, no cap: the bank of fit(A) + partial_fit(B) is fit(A+B)'s, row for
    row (same rows, same provenance), so every score is the same."""
    train, good, bad = toy_images
    a, b = train[:4], train[4:]
    kw = dict(coreset_ratio=1.0, max_bank_size=None, feature_dtype="float32")
    both = small(**kw).fit(train)
    upd = small(**kw).fit(a).partial_fit(b)
    assert sorted_rows(upd.memory_bank_) == sorted_rows(both.memory_bank_)
    assert torch.equal(upd.provenance_, both.provenance_)
    assert upd.n_train_images_ == 6 and upd.n_train_patches_ == both.n_train_patches_
    np.testing.assert_allclose(
        upd.score_samples(good + bad), both.score_samples(good + bad), rtol=1e-5
    )


def test_partial_fit_adds_the_ratio_of_new_patches_and_records_it(toy_images) -> None:
    train, _, _ = toy_images
    det = small(feature_dtype="float32").fit(train[:4])
    before = det.memory_bank_.clone()
    det.partial_fit(train[4:])
    new_patches = det.n_train_patches_ - 4 * 144
    assert new_patches == 2 * 144
    n_add = sampling.coreset_size(new_patches, 0.25)
    assert det.memory_bank_.shape[0] == before.shape[0] + n_add
    assert torch.equal(det.memory_bank_[: before.shape[0]], before)  # old rows kept, in order
    (rec,) = det.updates_
    assert rec["images"] == 2 and rec["patches"] == new_patches and rec["rows_added"] == n_add
    assert rec["rows_dropped"] == 0 and rec["bank_size"] == det.memory_bank_.shape[0]
    assert rec["first_image"] == 4 and rec["names"] == ["image #4", "image #5"]
    assert rec["time"].endswith("+00:00") and rec["seconds"] > 0
    assert set(det.provenance_[before.shape[0] :, 0].tolist()) <= {4, 5}
    assert det.train_names_ == [f"image #{i}" for i in range(6)]


def test_new_rows_are_the_farthest_from_the_old_bank(toy_images) -> None:
    """The first added row is the new patch farthest from the old bank (the greedy's next)."""
    train, _, _ = toy_images
    det = small(feature_dtype="float32").fit(train[:4])
    old = det.memory_bank_.clone()
    det.partial_fit(train[4:])
    feats = torch.cat([grid(det, im).flatten(1).T for im in train[4:]])
    d = torch.cdist(feats, old).amin(1)
    first = det.memory_bank_[old.shape[0]]
    torch.testing.assert_close(first, feats[int(d.argmax())], atol=1e-4, rtol=0)


def test_the_cap_is_kept_by_reselecting_old_and_new_rows(toy_images) -> None:
    train, _, _ = toy_images
    det = small(feature_dtype="float32", max_bank_size=150).fit(train[:4])
    assert det.memory_bank_.shape[0] == 144  # 0.25 of 576 patches, under the cap
    old = det.memory_bank_.clone()
    det.partial_fit(train[4:])  # + 72 rows -> 216 > 150: re-selected to 150
    rec = det.updates_[0]
    assert det.memory_bank_.shape[0] == 150 == rec["bank_size"]
    assert rec["rows_dropped"] == 144 + rec["rows_added"] - 150 > 0
    # provenance follows the re-selection: rows are still the patches they name
    feats = [grid(det, im) for im in train]
    for row, (t, r, c) in zip(det.memory_bank_, det.provenance_.tolist(), strict=True):
        torch.testing.assert_close(row, feats[t][:, r, c], atol=1e-4, rtol=0)
    kept_old = sum(any(torch.equal(row, o) for o in old) for row in det.memory_bank_)
    assert kept_old == 150 - rec["rows_added"]


def test_threshold_is_kept_with_a_warning_and_marked(toy_images) -> None:
    train, _, _ = toy_images
    det = small().fit(train[:4]).set_threshold(3.0, "max_f1")
    with pytest.warns(UserWarning, match=r"threshold 3 \(max_f1\) was calibrated before"):
        det.partial_fit(train[4:5])
    assert det.threshold_ == 3.0 and det.threshold_method_ == "max_f1" + BEFORE_UPDATE
    with pytest.warns(UserWarning, match="calibrated before"):
        det.partial_fit(train[5:])
    assert det.threshold_method_ == "max_f1" + BEFORE_UPDATE  # marked once
    assert [u["threshold_before"] for u in det.updates_] == [3.0, 3.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small().fit(train[:4]).partial_fit(train[4:])  # no threshold: nothing to warn about


def test_updates_round_trip_and_update_again_after_loading(toy_images, tmp_path: Path) -> None:
    train, good, bad = toy_images
    det = small().fit(train[:3]).partial_fit(train[3:5])
    loaded = PatchCore.load(det.save(tmp_path / "m.pt"))
    assert loaded.updates_ == det.updates_ and torch.equal(loaded.provenance_, det.provenance_)
    np.testing.assert_array_equal(loaded.score_samples(good + bad), det.score_samples(good + bad))
    loaded.partial_fit(train[5:])
    det.partial_fit(train[5:])
    assert torch.equal(loaded.memory_bank_, det.memory_bank_)
    assert [u["first_image"] for u in loaded.updates_] == [3, 5]


def test_partial_fit_errors_say_what_to_do(toy_images, tmp_path: Path) -> None:
    train, _, _ = toy_images
    with pytest.raises(NotFittedError, match="before partial_fit"):
        small().partial_fit(train)
    det = small().fit(train[:4])
    with pytest.raises(ValueError, match="at least one image"):
        det.partial_fit([])
    with pytest.raises(ValueError, match="no readable training images"):
        det.partial_fit([tmp_path / "missing.png"], on_error="skip")
    bank = det.memory_bank_.clone()
    with pytest.warns(UserWarning, match="partial_fit skipped 1"):
        det.partial_fit([train[4], tmp_path / "missing.png"], on_error="skip")
    assert det.updates_[0]["skipped"] == [str(tmp_path / "missing.png")]
    assert det.memory_bank_.shape[0] > bank.shape[0]


def test_marked_false_alarms_stop_being_flagged() -> None:
    """A new product variant (finer stripes) is flagged; added as normal, its other images
    pass while the defects stay above the threshold."""
    rng = np.random.default_rng(1)

    def variant(defect: bool = False) -> np.ndarray:
        img = textured(rng, defect=defect).astype(float)
        y, x = np.mgrid[0:96, 0:96]
        img[..., :] *= (0.8 + 0.2 * np.sin(x / 1.3))[..., None]
        return img.clip(0, 255).astype(np.uint8)

    base = [textured(rng) for _ in range(6)]
    new = [variant() for _ in range(6)]
    bad = [textured(rng, defect=True) for _ in range(4)]
    det = small().fit(base)
    t = float(np.max(det.score_samples([textured(rng) for _ in range(4)]))) * 1.05
    det.set_threshold(t)
    assert (det.score_samples(new[3:]) >= t).all()  # false alarms before
    with pytest.warns(UserWarning, match="calibrated before"):
        det.partial_fit(new[:3])
    assert (det.score_samples(new[3:]) < t).all()  # not the added ones: the other three
    assert (det.score_samples(bad) >= t).all()


def test_a_model_without_provenance_updates_and_stays_without(toy_images) -> None:
    """A model from a file written before provenance: the update works, the origins of its
    old rows stay unknown (no provenance is made up for them)."""
    train, _, _ = toy_images
    det = small().fit(train[:4])
    det.state_.provenance = det.state_.train_names = det.state_.train_grids = None
    det.partial_fit(train[4:])
    assert det.provenance_ is None and det.train_names_ is None
    assert det.updates_[0]["first_image"] == 4 and det.updates_[0]["names"][0] == "image #4"
    assert det.explain(train[:1])[0].note == "no provenance in this model file"
