"""The one input pipeline (patchcore.lean.inputs) on its own: torch-free, pluggable decode and
resize, limits, on_error, and the same batches as the torch adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.lean import inputs
from patchcore.lean.pixels import ImageReadError, ImageTooLargeError, InputLimits


def _files(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i, size in enumerate([(20, 30), (20, 30), (24, 24)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        out.append(p)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    return [*out, tmp_path / "bad.png"]


def test_the_pipeline_runs_without_torch(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from patchcore.lean.inputs import iter_batches
from PIL import Image
import numpy as np
items = {[str(p) for p in paths]!r}
items = items + [Image.open(items[0]), np.asarray(Image.open(items[1]))]
got = list(iter_batches(items, batch_size=8, target_size=lambda h, w: (16, 16),
                        on_error="skip"))
assert [b.indices for b in got] == [[0, 1, 2, 4, 5]], [b.indices for b in got]
assert [s.index for b in got for s in b.skipped] == [3]
assert got[0].pixels.shape == (5, 3, 16, 16) and got[0].pixels.dtype == np.float32
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_batches_skips_and_names(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    items = [paths[3], paths[0], paths[1], np.zeros((3, 3), np.uint8), paths[2]]
    got = list(
        inputs.iter_batches(items, batch_size=2, target_size=lambda h, w: (h, w), on_error="skip")
    )
    assert [b.indices for b in got] == [[1, 2], [4]]
    assert [[s.index for s in b.skipped] for b in got] == [[0, 3], []]
    assert got[0].skipped[1] == inputs.Skipped(3, "image #3", got[0].skipped[1].reason)
    assert "too small" in got[0].skipped[1].reason
    assert got[0].names == [str(paths[0]), str(paths[1])] and got[1].sizes == [(24, 24)]
    assert got[0].pixels.flags["C_CONTIGUOUS"]
    with pytest.raises(ImageReadError, match=r"bad\.png: not an image"):
        list(inputs.iter_batches(items, batch_size=2, target_size=lambda h, w: (h, w)))


def test_decode_resize_and_limits_are_pluggable(tmp_path: Path) -> None:
    paths = _files(tmp_path)[:3]
    seen: list[tuple[int, int]] = []

    def resize(chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        seen.append(size)
        return np.zeros((3, *size), np.float32)

    got = list(
        inputs.iter_batches(
            paths,
            batch_size=4,
            target_size=lambda h, w: (h // 2, w // 2),
            decode=lambda p: np.ones((3, 40, 40), np.float32),
            resize=resize,
        )
    )
    assert seen == [(20, 20)] * 3 and got[0].sizes == [(40, 40)] * 3
    assert float(got[0].pixels.max()) == 0.0
    small = InputLimits(max_pixels=None, max_aspect_ratio=None, max_processed_pixels=100)
    steps: list[int] = []
    got = list(
        inputs.iter_batches(
            paths,
            batch_size=4,
            target_size=lambda h, w: (h, w),
            on_error="skip",
            limits=small,
            progress=steps.append,
        )
    )
    assert len(steps) == 3 and all(b.pixels is None for b in got)
    assert "max_processed_pixels" in got[0].skipped[0].reason
    with pytest.raises(ImageTooLargeError, match=r"0\.png: would be processed at 30x20"):
        list(inputs.iter_batches(paths, batch_size=4, target_size=lambda h, w: (h, w),
                                 limits=small))  # fmt: skip


def test_a_refusing_target_size_names_the_input(tmp_path: Path) -> None:
    def target(h: int, w: int) -> tuple[int, int]:
        raise ImageReadError("?", f"processed size {(h, w)} differs from the export's")

    arr = np.zeros((16, 16), np.uint8)
    with pytest.raises(ImageReadError, match=r"^image #0: processed size \(16, 16\) differs"):
        list(inputs.iter_batches([arr], batch_size=1, target_size=target))


def test_as_list_by_duck_typing() -> None:
    a = np.zeros((16, 16, 3), np.uint8)
    im = Image.fromarray(a)

    class Data:  # an ImageDataset-like object: its images attribute is a list
        images = [a, a]

    assert inputs.as_list(im) == [im] and inputs.as_list(Data()) == [a, a]
    assert len(inputs.as_list(np.zeros((5, 16, 16, 3), np.uint8))) == 5
    assert len(inputs.as_list(x for x in (a, a, a))) == 3
    assert inputs.input_name(Path("x/y.png"), 3) == str(Path("x/y.png"))
    assert inputs.input_name(a, 3) == "image #3"


def test_torch_adapter_gives_the_same_batches_as_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from patchcore.core import inputs as torch_inputs

    paths = _files(tmp_path)[:3]
    lean = list(inputs.iter_batches(paths, batch_size=4, target_size=lambda h, w: (h, w)))
    tens = list(torch_inputs.iter_batches(paths, batch_size=4, target_size=lambda h, w: (h, w)))
    assert [b.indices for b in lean] == [b.indices for b in tens]
    for a, b in zip(lean, tens, strict=True):
        assert isinstance(b.pixels, torch.Tensor)
        assert np.array_equal(a.pixels, b.pixels.numpy())
    # resized: the numpy resize follows torch's antialiased F.interpolate to float rounding
    half = dict(batch_size=4, target_size=lambda h, w: (h // 2 + 1, w // 2 + 1))
    lean = [b.pixels for b in inputs.iter_batches(paths, **half)]
    tens = [b.pixels.numpy() for b in torch_inputs.iter_batches(paths, **half)]
    assert [a.shape for a in lean] == [(2, 3, 11, 16), (1, 3, 13, 13)]
    for a, b in zip(lean, tens, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
