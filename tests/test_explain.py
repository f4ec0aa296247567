"""Bank-row provenance and explanations: every row traced to the training patch it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_set, textured
from PIL import Image

from patchcore.core import persistence
from patchcore.core.detector import ModelFileError, PatchCore
from patchcore.core.explain import NO_PROVENANCE, bank_provenance, cell_box
from patchcore.core.images import as_tensor, output_size, resize


def small(**kw) -> PatchCore:
    params = dict(image_size=96, coreset_ratio=0.25, progress=False, num_neighbors=3)
    params.update(kw)
    return PatchCore(**params)


def recomputed(det: PatchCore, image, size=None) -> torch.Tensor:
    """(h, w, D) patch features of one image, recomputed alone (float32)."""
    t = as_tensor(image)
    size = size or output_size(t.shape[1], t.shape[2], det.image_size, det.scale)
    emb = det._embed(resize(t, size)[None])[0]
    return emb.permute(1, 2, 0).float()


def assert_rows_are_their_patches(det: PatchCore, images: list, atol: float) -> None:
    feats = [recomputed(det, im) for im in images]
    for row, (t, r, c) in zip(det.memory_bank_, det.provenance_.tolist(), strict=True):
        torch.testing.assert_close(row, feats[t][r, c], atol=atol, rtol=0)


def test_bank_provenance_maps_indices_through_varying_grids() -> None:
    grids = [(10, 20, 2, 3), (9, 9, 4, 1), (5, 5, 1, 2)]  # 6, 4 and 2 patches
    idx = torch.tensor([0, 5, 6, 9, 10, 11, 4])
    got = bank_provenance(idx, grids, first_image=7)
    assert got.dtype == torch.int32
    assert got.tolist() == [[7, 0, 0], [7, 1, 2], [8, 0, 0], [8, 3, 0], [9, 0, 0], [9, 0, 1],
                            [7, 1, 1]]  # fmt: skip
    with pytest.raises(ValueError, match=r"indices must be in \[0, 12\)"):
        bank_provenance(torch.tensor([12]), grids)


def test_cell_box_covers_the_averaged_cells_in_own_pixels() -> None:
    assert cell_box(0, 0, (4, 4), (40, 80), 1) == (0, 0, 20, 40)
    assert cell_box(2, 1, (4, 4), (40, 80), 0) == (20, 20, 30, 40)
    assert cell_box(3, 3, (4, 4), (41, 80), 1) == (20, 40, 41, 80)  # clipped, ceil at the end


@pytest.mark.parametrize("sampling", ["greedy", "random"])
def test_every_bank_row_is_the_feature_of_its_training_patch(toy_images, sampling) -> None:
    train, _, _ = toy_images
    det = small(feature_dtype="float32", sampling=sampling).fit(train)
    assert det.provenance_.shape == (det.memory_bank_.shape[0], 3)
    assert det.train_names_ == [f"image #{i}" for i in range(len(train))]
    assert_rows_are_their_patches(det, train, atol=1e-4)


def test_provenance_with_native_sizes_that_differ(toy_images) -> None:
    """Mixed sizes: each image has its own grid; rows still land on their own patch."""
    rng = np.random.default_rng(3)
    train = [textured(rng, 96), textured(rng, 64), textured(rng, 80), textured(rng, 96)]
    det = small(image_size=None, feature_dtype="float32", coreset_ratio=0.5).fit(train)
    grids = det.state_.train_grids
    assert [g[:2] for g in grids] == [(96, 96), (64, 64), (80, 80), (96, 96)]
    assert len({g[2:] for g in grids}) == 3
    assert set(det.provenance_[:, 0].tolist()) == {0, 1, 2, 3}
    assert_rows_are_their_patches(det, train, atol=1e-4)


def test_explanation_names_the_nearest_training_patch(toy_images) -> None:
    train, good, bad = toy_images
    det = small(feature_dtype="float32").fit(train)
    ex = det.explain(good + bad)
    np.testing.assert_allclose([e.score for e in ex], det.score(good + bad).scores, rtol=1e-6)
    feats = [recomputed(det, im) for im in train]
    for e, image in zip(ex, good + bad, strict=True):
        q = recomputed(det, image)[e.patch]
        worst = torch.linalg.vector_norm(q - det.memory_bank_, dim=1)
        assert e.bank_row == int(worst.argmin())
        assert e.distance == pytest.approx(float(worst.min()), rel=1e-4)
        # the named training patch is the bank row, and the nearest one
        named = feats[e.train_index][e.train_patch]
        torch.testing.assert_close(named, det.memory_bank_[e.bank_row], atol=1e-4, rtol=0)
        top, left, bottom, right = e.train_box
        assert 0 <= top < bottom <= 96 and 0 <= left < right <= 96
        assert e.train_name == f"image #{e.train_index}" and e.note is None
    # a defect's worst patch sits on the bright blob
    for e, image in zip(ex[len(good) :], bad, strict=True):
        top, left, bottom, right = e.box
        assert image[top:bottom, left:right].max() == 255
    # the paper's score without reweighting (top_k=1, num_neighbors=1) is the distance itself
    one = small(num_neighbors=1, top_k=1).fit(train).explain(bad[:1])[0]
    assert one.score == pytest.approx(one.distance, rel=1e-6)


def test_explain_skips_unreadable_and_names_training_files(tmp_path: Path, toy_images) -> None:
    train, _, bad = toy_images
    paths = []
    for i, im in enumerate(train):
        paths.append(tmp_path / f"t{i}.png")
        Image.fromarray(im).save(paths[-1])
    det = small().fit(paths)
    assert det.train_names_ == [str(p) for p in paths]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    ex = det.explain([bad[0], broken], on_error="skip")
    assert ex[0].train_name in det.train_names_ and ex[0].error is None
    assert ex[1].error and ex[1].name == str(broken) and np.isnan(ex[1].score)
    assert ex[1].as_dict()["train_box"] is None and isinstance(ex[0].as_dict()["box"], list)


def test_provenance_round_trips_and_files_without_it_say_so(toy_images, tmp_path: Path) -> None:
    train, _, bad = toy_images
    det = small().fit(train)
    loaded = PatchCore.load(det.save(tmp_path / "m.pt"))
    assert torch.equal(loaded.provenance_, det.provenance_)
    assert loaded.train_names_ == det.train_names_
    assert loaded.state_.train_grids == det.state_.train_grids
    assert loaded.explain(bad[:1]) == det.explain(bad[:1])
    # a file written before provenance existed: no entry, no state fields
    det.state_.provenance = None
    det.state_.train_names = det.state_.train_grids = None
    payload = torch.load(det.save(tmp_path / "old.pt"), weights_only=True)
    assert "provenance" not in payload and "train_names" not in payload["state"]
    old = PatchCore.load(tmp_path / "old.pt")
    e = old.explain(bad[:1])[0]
    assert old.provenance_ is None and e.note == NO_PROVENANCE and e.train_index is None
    assert e.bank_row is not None and np.isfinite(e.distance)


def test_damaged_provenance_is_refused_with_the_file_named(toy_images, tmp_path: Path) -> None:
    train, _, _ = toy_images
    path = small().fit(train).save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    for bad, match in (
        (payload["provenance"][:-1], r"provenance is not an \(\d+, 3\) int32 tensor"),
        (payload["provenance"].long(), "int32"),
        (payload["provenance"] + torch.tensor([0, 50, 0], dtype=torch.int32), "outside"),
        (payload["provenance"] + torch.tensor([9, 0, 0], dtype=torch.int32), "training image"),
    ):
        p = dict(payload, provenance=bad)
        p["digest"] = {"algorithm": "sha256", "value": persistence.digest(p)}
        torch.save(p, tmp_path / "bad.pt")
        with pytest.raises(ModelFileError, match=f"bad.pt: invalid model file: .*{match}"):
            PatchCore.load(tmp_path / "bad.pt")
    # the digest covers the provenance: a changed row without a new digest is damage
    p = dict(payload, provenance=payload["provenance"].flip(0))
    torch.save(p, tmp_path / "flipped.pt")
    with pytest.raises(ModelFileError, match="do not match the SHA-256 digest"):
        PatchCore.load(tmp_path / "flipped.pt")


def test_real_casting_rows_trace_to_their_patches() -> None:
    """Real images at their native 300 x 300 (float16 store: rows match to float16 rounding)."""
    root = data_set("casting")
    train = sorted((root / "train" / "good").iterdir())[:4]
    det = PatchCore(coreset_ratio=0.02, progress=False).fit(train)
    assert det.train_names_ == [str(p) for p in train]
    feats = [recomputed(det, p) for p in train]
    for row, (t, r, c) in zip(det.memory_bank_, det.provenance_.tolist(), strict=True):
        torch.testing.assert_close(row, feats[t][r, c], atol=2e-2, rtol=2e-3)
    defect = sorted((root / "test" / "defective").iterdir())[0]
    e = det.explain(defect)[0]
    assert e.train_name in det.train_names_ and e.train_box[2] <= 300 and e.train_box[3] <= 300
