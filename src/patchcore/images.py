"""Reading images and turning every accepted input into one tensor layout.

Accepted inputs: a file path (``str`` / ``os.PathLike``), a PIL image, a numpy array (HxW or HxWxC,
uint8, uint16, bool or float in [0, 1]) or a torch tensor (HxW or CxHxW, uint8 or float in [0, 1]).
Greyscale is repeated to three channels, an alpha channel is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image that cannot be read or understood; the message names the file and the problem."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file fully (truncated files are errors).

    Returns:
        uint8 array HxW (greyscale) or HxWx3 (colour).
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "no such file")
    if p.is_dir():
        raise ImageReadError(p, "is a folder, not an image file")
    try:
        with Image.open(p) as im:
            im.load()
            return pil_to_array(im)
    except UnidentifiedImageError:
        raise ImageReadError(p, "not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or damaged data
        raise ImageReadError(p, f"damaged or truncated image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(p, f"image too large ({exc})") from None


def pil_to_array(im: Image.Image) -> np.ndarray:
    """PIL image -> uint8 HxW or HxWx3 array (alpha dropped, 16-bit scaled to 8-bit)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        return np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode in ("L", "RGB"):
        return np.asarray(im).copy()
    if im.mode in ("1", "LA"):
        return np.asarray(im.convert("L")).copy()
    return np.asarray(im.convert("RGB")).copy()


def as_tensor(image: ImageInput) -> torch.Tensor:
    """Convert any accepted input to a float32 tensor 3xHxW with values in [0, 1]."""
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        image = read_image(image)
    if isinstance(image, Image.Image):
        image = pil_to_array(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            raise ImageReadError(name, f"array shape {arr.shape} looks channel-first; give HxWxC")
        t = torch.from_numpy(np.ascontiguousarray(_array_to_float(arr, name)))
        if t.ndim == 3:
            t = t.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif t.dtype == torch.bool:
            t = t.float()
        elif t.is_floating_point():
            t = t.float()
            if not bool(torch.isfinite(t).all()):
                raise ImageReadError(name, "tensor contains NaN or infinite values")
            _check_unit_range(float(t.min()), float(t.max()), name)
        else:
            raise ImageReadError(name, f"unsupported tensor dtype {t.dtype}")
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; give a path, PIL image, "
            "numpy array or torch tensor"
        )
    shape = tuple(image.shape)  # as given, for messages
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ImageReadError(name, f"expected HxW, HxWxC or CxHxW, got shape {tuple(t.shape)}")
    c = t.shape[0]
    if c == 1:
        t = t.expand(3, -1, -1)
    elif c == 4:
        t = t[:3]
    elif c == 2:  # grey + alpha
        t = t[:1].expand(3, -1, -1)
    elif c != 3:
        hint = (
            ""
            if min(t.shape) <= 4
            else f"; if this is a stack of {shape[0]} greyscale images, pass a list of them or "
            + (
                "an (N, 1, H, W) tensor"
                if isinstance(image, torch.Tensor)
                else "an (N, H, W, 1) array"
            )
        )
        raise ImageReadError(name, f"{c} channels; expected 1, 3 or 4{hint}")
    if t.shape[1] < 8 or t.shape[2] < 8:
        raise ImageReadError(name, f"image of {t.shape[1]}x{t.shape[2]} pixels is too small")
    return t.contiguous()


def _array_to_float(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise ImageReadError(name, "array contains NaN or infinite values")
        _check_unit_range(float(out.min()), float(out.max()), name)
        return out
    raise ImageReadError(name, f"unsupported array dtype {arr.dtype}; use uint8, uint16 or float")


def _check_unit_range(lo: float, hi: float, name: str) -> None:
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ImageReadError(
            name,
            f"float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
            "divide 0-255 data by 255 or pass uint8",
        )


def output_size(
    height: int, width: int, image_size: int | Sequence[int] | None, scale: float | None
) -> tuple[int, int]:
    """The (H, W) an input of the given size is resized to before feature extraction."""
    if image_size is not None:
        if isinstance(image_size, int):
            return (image_size, image_size)
        h, w = image_size
        return (int(h), int(w))
    if scale is not None:
        return (max(16, round(height * scale)), max(16, round(width * scale)))
    return (height, width)


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize CxHxW or BxCxHxW bilinearly with antialiasing (identity when the size matches)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    batched = t.ndim == 4
    x = t if batched else t.unsqueeze(0)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x if batched else x[0]


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in a folder (sorted by name); hidden files are ignored."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p
        for p in it
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
