from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.core.images import (
    ImageReadError,
    as_tensor,
    list_images,
    output_size,
    read_image,
    resize,
)


def test_inputs_of_every_kind_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for x in (
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        Image.fromarray(rgb),
        rgb,
        rgb.astype(np.float32) / 255,
        torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
    ):
        t = as_tensor(x)
        assert t.shape == (3, 20, 30) and t.dtype == torch.float32
        torch.testing.assert_close(t, want)


def test_grey_rgba_and_16bit_become_three_channels() -> None:
    grey = np.full((10, 12), 128, np.uint8)
    assert torch.allclose(as_tensor(grey), torch.full((3, 10, 12), 128 / 255))
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 255
    t = as_tensor(rgba)
    assert t.shape == (3, 10, 12) and float(t[0].min()) == 1.0 and float(t[1:].max()) == 0.0
    assert float(as_tensor(np.full((9, 9), 65535, np.uint16)).min()) == 1.0


def test_bad_values_name_the_problem() -> None:
    with pytest.raises(ImageReadError, match=r"float values must lie in \[0, 1\].*255"):
        as_tensor(np.full((10, 10), 200.0))
    with pytest.raises(ImageReadError, match="NaN"):
        as_tensor(np.full((10, 10), np.nan))
    with pytest.raises(ImageReadError, match="too small"):
        as_tensor(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        as_tensor(42)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageReadError, match="text.png: not an image"):
        read_image(tmp_path / "text.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg: damaged or truncated"):
        read_image(tmp_path / "cut.jpg")


def test_resize_and_output_size() -> None:
    assert output_size(640, 480, None, 0.4) == (256, 192)
    assert output_size(640, 480, 224, None) == (224, 224)
    assert output_size(640, 480, (100, 200), None) == (100, 200)
    assert output_size(640, 480, None, None) == (640, 480)
    t = torch.rand(3, 40, 60)
    assert resize(t, (40, 60)) is t
    assert resize(t, (20, 30)).shape == (3, 20, 30)


def test_list_images_sorted_and_filtered(tmp_path: Path) -> None:
    for n in ("b.png", "a.JPG", ".hidden.png", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize(
    ("stack", "fix"),
    [
        (np.zeros((10, 64, 64), np.uint8), "(N, H, W, 1) array"),
        (torch.zeros(10, 64, 64), "(N, 1, H, W) tensor"),
    ],
)
def test_a_stack_of_greyscale_images_is_named_in_the_error(stack, fix: str) -> None:
    with pytest.raises(ImageReadError, match="stack of 10 greyscale images") as err:
        as_tensor(stack)
    assert fix in str(err.value)


def test_greyscale_stacks_in_the_suggested_layouts_score(toy_images) -> None:
    from patchcore import PatchCore

    train, _, _ = toy_images
    det = PatchCore(image_size=64, coreset_ratio=0.5, progress=False).fit(train[:2])
    grey = np.stack([np.asarray(as_tensor(t)[0] * 255, dtype=np.uint8) for t in train[:3]])
    s_arr = det.score_samples(grey[..., None])  # (N, H, W, 1)
    s_ten = det.score_samples(torch.from_numpy(grey)[:, None].float() / 255)  # (N, 1, H, W)
    assert s_arr.shape == s_ten.shape == (3,)
    np.testing.assert_allclose(s_arr, s_ten, rtol=1e-4)
