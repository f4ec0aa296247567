"""The input route: listing, decoding, batching and reporting unreadable inputs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.core.datasets import ImageDataset, Sample
from patchcore.core.images import ImageReadError
from patchcore.core.inputs import Skipped, as_list, check_on_error, iter_batches


def _batches(items, bs=2, on_error="skip"):  # noqa: ANN001, ANN202
    return list(
        iter_batches(items, batch_size=bs, target_size=lambda h, w: (h, w), on_error=on_error)
    )


def test_as_list_accepts_every_input_form(tmp_path: Path) -> None:
    a = np.zeros((16, 16, 3), np.uint8)
    assert len(as_list(a)) == 1 and len(as_list(torch.zeros(3, 16, 16))) == 1
    assert len(as_list(np.zeros((4, 16, 16, 3), np.uint8))) == 4  # a stacked batch
    assert as_list("x.png") == ["x.png"] and as_list([a, a])[1] is a
    ds = ImageDataset([Sample(tmp_path / "a.png"), Sample(a, name="b")])
    listed = as_list(ds)
    assert listed[0] == tmp_path / "a.png" and listed[1] is a

    class HasImages(list):  # an ``images`` attribute does not make a dataset
        images = "not this"

    assert as_list(HasImages([a])) == [a]


def test_batches_keep_input_order_and_place_skipped_inputs(tmp_path: Path) -> None:
    ok = np.full((16, 16), 100, np.uint8)
    wide = np.full((16, 32), 100, np.uint8)
    bad = np.zeros((3, 3), np.uint8)  # too small
    Image.fromarray(ok).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items = [bad, ok, tmp_path / "ok.png", wide, tmp_path / "broken.png", ok, ok, bad]
    batches = _batches(items)
    assert [b.indices for b in batches] == [[1, 2], [3], [5, 6]]
    assert [[s.index for s in b.skipped] for b in batches] == [[0], [4], [7]]
    only_bad = _batches([bad, bad])
    assert len(only_bad) == 1 and only_bad[0].pixels is None and only_bad[0].indices == []
    assert batches[1].pixels.shape == (1, 3, 16, 32) and batches[1].sizes == [(16, 32)]
    assert batches[0].names == ["image #1", str(tmp_path / "ok.png")]
    skipped = [s for b in batches for s in b.skipped]
    assert skipped[1] == Skipped(4, str(tmp_path / "broken.png"), skipped[1].reason)
    assert "too small" in skipped[0].reason and skipped[0].name == "image #0"
    with pytest.raises(ImageReadError, match="broken.png"):
        _batches(items[1:], on_error="raise")
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        check_on_error("ignore")


def test_stopping_early_does_not_hang_or_leak_decoder_threads(tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    before = threading.active_count()
    it = iter_batches(paths, batch_size=2, target_size=lambda h, w: (h, w))
    first = next(it)
    assert first.indices == [0, 1]
    it.close()  # a consumer that stops after the first batch
    assert threading.active_count() <= before
