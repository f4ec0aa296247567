"""Size buckets: scoring groups same-size images that lie within a window of inputs into one
batch (sets of mixed sizes still run batched), and results still come in input order, with the
scores an image gets alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.core.detector import PatchCore
from patchcore.core.inference import BUCKET_WINDOW
from patchcore.lean.inputs import Reorder, iter_batches
from patchcore.lean.pixels import ImageReadError

SIZES = [(16, 16), (16, 24), (24, 16)]


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*SIZES[i % 3], 3), dtype=np.uint8) for i in range(n)]


def _batches(items, bs, window, on_error="skip"):  # noqa: ANN001, ANN202
    return list(
        iter_batches(
            items, batch_size=bs, target_size=lambda h, w: (h, w), on_error=on_error, window=window
        )
    )


def test_without_a_window_interleaved_sizes_run_one_by_one() -> None:
    batches = _batches(_images(12), bs=4, window=0)
    assert [b.indices for b in batches] == [[i] for i in range(12)]


def test_buckets_group_sizes_within_the_window_and_cover_every_input_once() -> None:
    items: list = _images(30)
    items[7] = "does-not-exist.png"
    window = 9
    batches = _batches(items, bs=4, window=window)
    seen = sorted(i for b in batches for i in [*b.indices, *(s.index for s in b.skipped)])
    assert seen == list(range(30))
    assert [s.index for b in batches for s in b.skipped] == [7]
    grouped = [b for b in batches if b.pixels is not None]
    assert max(len(b.indices) for b in grouped) == 4  # batched, not one by one
    for b in grouped:
        assert b.indices == sorted(b.indices) and len(b.indices) <= 4
        assert b.pixels.shape[0] == len(b.indices)
        assert {tuple(items[i].shape[:2]) for i in b.indices} == {tuple(b.pixels.shape[2:])}
        assert b.indices[-1] - b.indices[0] <= window  # no input waits past the window
        for j, i in enumerate(b.indices):  # each image's own pixels, in its slot
            np.testing.assert_array_equal(
                b.pixels[j], np.moveaxis(items[i], -1, 0).astype(np.float32) / 255
            )
    assert len(grouped) < 29


def test_raise_mode_emits_what_came_before_then_names_the_input(tmp_path: Path) -> None:
    items: list = _images(5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    items.insert(3, bad)
    done: list[int] = []
    with pytest.raises(ImageReadError, match="bad.png"):
        for b in iter_batches(
            items, batch_size=4, target_size=lambda h, w: (h, w), on_error="raise", window=8
        ):
            done += b.indices
    assert sorted(done) == [0, 1, 2]


def test_reorder_releases_results_in_input_order() -> None:
    order = Reorder()
    out: list[str] = []
    for i in (2, 0, 3, 1, 5, 4):
        order.add(i, f"r{i}")
        out += order.ready()
        if i == 2:
            assert out == [] and len(order) == 1
    assert out == [f"r{i}" for i in range(6)] and len(order) == 0


@pytest.fixture(scope="module")
def detector() -> PatchCore:
    rng = np.random.default_rng(1)
    train = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    return PatchCore(
        weights=None, coreset_ratio=0.5, batch_size=4, device="cpu", progress=False
    ).fit(train)


def test_mixed_sizes_score_in_order_batched_as_when_alone(
    detector: PatchCore, tmp_path: Path
) -> None:
    rng = np.random.default_rng(2)
    sizes = [(40, 48), (48, 40), (40, 48), (56, 40), (48, 40), (40, 48), (56, 40), (40, 48)]
    images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in sizes]
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    paths.insert(4, tmp_path / "missing.png")
    calls: list[list[int]] = []
    real = detector._score_batches

    def counted(batches, maps):  # noqa: ANN001, ANN202
        calls.append([len(b.indices) for b in batches])
        return real(batches, maps)

    detector._score_batches = counted  # type: ignore[method-assign]
    try:
        results = list(
            detector.iter_score(paths, maps="native", on_error="skip", size_buckets=True)
        )
        bucketed, calls[:] = calls[:], []
        default = list(detector.iter_score(paths, maps="native", on_error="skip"))
    finally:
        del detector._score_batches
    assert [r.index for r in results] == list(range(9))
    assert results[4].error is not None and np.isnan(results[4].score)
    batches = [n for call in bucketed for n in call]
    assert max(batches) > 1 and len(batches) < len(images)  # grouped by size
    # the default: consecutive sizes only (none repeat), each batch_size of them searched
    # together
    assert calls == [[1] * 4, [1] * 4]
    assert [r.index for r in default] == list(range(9))
    assert BUCKET_WINDOW * detector.batch_size >= len(paths)
    for r, d in zip(results, default, strict=True):
        if r.error is None:
            alone = detector.score([paths[r.index]], maps="native")
            assert r.map.shape == alone.maps[0].shape
            np.testing.assert_allclose(r.score, alone.scores[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(r.map, alone.maps[0], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(d.score, alone.scores[0], rtol=1e-6, atol=0)
            np.testing.assert_allclose(d.map, alone.maps[0], rtol=1e-4, atol=1e-5)


def test_one_size_throughout_gives_the_batches_of_the_default() -> None:
    rng = np.random.default_rng(3)
    items: list = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(21)]
    items[5] = "missing.png"
    plain = _batches(items, bs=4, window=0)
    bucketed = _batches(items, bs=4, window=16)
    assert [b.indices for b in bucketed] == [b.indices for b in plain]
    for a, b in zip(bucketed, plain, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
