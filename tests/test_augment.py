"""Bank augmentation (``PatchCore(augment=...)``): views, provenance, and what the bank holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import data_set
from PIL import Image

from patchcore import PatchCore
from patchcore.core import augment
from patchcore.core.embedding import flatten_patches


@pytest.mark.parametrize("name", [None, *augment.AUGMENTS])
def test_provenance_locates_every_view_row_in_the_images_own_grid(name):
    """Naive reference: a (B, D, h, w) 'embedding' seen in each view, flattened piece by
    piece as the fit stores it; every row must equal the image's own entry at its origin."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 7, generator=g)
    rows, pieces = [], []
    for view in augment.views(name):
        rows.append(flatten_patches(augment.apply(x, view)))
        pieces += [(i, view, 5, 7) for i in range(3)]
    rows = torch.cat(rows)
    idx = torch.randperm(rows.shape[0], generator=g)[:60]
    at = augment.provenance(idx, pieces, first_image=10).long()
    assert at.dtype == torch.long and (at[:, 0] >= 10).all()
    assert torch.equal(rows[idx], x[at[:, 0] - 10, :, at[:, 1], at[:, 2]])


def test_views_are_the_dihedral_elements_named():
    x = torch.arange(12.0).view(1, 3, 4)
    flips = [augment.apply(x, v) for v in augment.views("flips")]
    assert torch.equal(flips[1], x.flip(-1)) and torch.equal(flips[2], x.flip(-2))
    turns = [augment.apply(x, v) for v in augment.views("rot90")]
    assert [t.shape[-2:] for t in turns] == [(3, 4), (4, 3), (3, 4), (4, 3)]
    assert torch.equal(turns[2], x.flip(-1).flip(-2))
    assert augment.views(None) == ((False, 0),)


def test_unknown_augment_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match=r"augment must be None or one of 'flips', 'rot90'"):
        PatchCore(augment="rot45").fit([np.zeros((64, 64, 3), np.uint8)])


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    """Four real magnetic tile training images (grey), cropped to non-square 160 x 224 tops."""
    folder = data_set("magnetic_tile") / "train" / "good"
    files = sorted(folder.iterdir())[:4]
    return [np.asarray(Image.open(f).convert("RGB"))[:160, :224].copy() for f in files]


def _fit(images, **params) -> PatchCore:
    return PatchCore(progress=False, coreset_ratio=1.0, max_bank_size=None, **params).fit(images)


def test_a_turned_training_image_is_normal_only_with_rot90(tiles):
    """With rot90 the bank holds the turned copies' patches: a training image turned a
    quarter turn scores (nearly) zero; without augmentation it does not."""
    train = tiles[:3]
    turned = np.ascontiguousarray(np.rot90(train[0]))
    mirrored = np.ascontiguousarray(train[1][::-1])  # up-down
    plain, rot, flips = _fit(train), _fit(train, augment="rot90"), _fit(train, augment="flips")
    assert rot.n_train_patches_ == 4 * plain.n_train_patches_
    assert flips.n_train_patches_ == 3 * plain.n_train_patches_
    s_plain = plain.score_samples([turned, mirrored])
    s_rot = rot.score_samples([turned, mirrored])
    s_flips = flips.score_samples([turned, mirrored])
    assert s_rot[0] < 0.01 * s_plain[0] and s_flips[1] < 0.01 * s_plain[1]
    assert s_rot[1] > 0.1 * s_plain[1]  # an up-down mirror is no turn
    # the identity view's rows are the plain fit's rows, bit for bit
    exact = "donot_use_mm_for_euclid_dist"
    d = torch.cdist(plain.memory_bank_, rot.memory_bank_, compute_mode=exact)
    assert float(d.min(dim=1).values.max()) == 0.0


def test_bank_rows_of_every_view_trace_back_to_their_training_image(tiles):
    det = _fit(tiles[:2], augment="rot90")
    prov = det.provenance_.long()
    grids = det.state_.train_grids
    assert prov.shape == (det.memory_bank_.shape[0], 3)
    assert set(prov[:, 0].tolist()) == {0, 1}
    for img, (_, _, h, w) in enumerate(grids):
        mine = prov[prov[:, 0] == img]
        assert (mine[:, 1] < h).all() and (mine[:, 2] < w).all()
    # each image location is the origin of one row per view (coreset ratio 1 keeps them all)
    counts = torch.unique(prov, dim=0, return_counts=True)[1]
    assert (counts == 4).all()


def test_augment_survives_save_load_and_update(tiles, tmp_path):
    det = _fit(tiles[:2], augment="flips")
    path = det.save(tmp_path / "m.pt")
    back = PatchCore.load(path)
    assert back.augment == "flips"
    np.testing.assert_array_equal(back.score_samples(tiles[3:]), det.score_samples(tiles[3:]))
    back.partial_fit(tiles[2:3], progress=False)
    prov = back.provenance_.long()
    assert prov.shape[0] == back.memory_bank_.shape[0] and int(prov[:, 0].max()) == 2
    plain = _fit(tiles[:1]).save(tmp_path / "plain.pt")
    assert PatchCore.load(plain).augment is None


def test_the_ray_fit_refuses_augmentation_instead_of_ignoring_it():
    from patchcore.scale.fit import fit_distributed

    with pytest.raises(ValueError, match="augment='flips' is not supported on Ray"):
        fit_distributed([np.zeros((64, 64, 3), np.uint8)], augment="flips")
