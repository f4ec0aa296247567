"""Reading images and turning every accepted input into one tensor layout.

Accepted inputs: a file path (``str`` / ``os.PathLike``), a PIL image, a numpy array (HxW or HxWxC,
uint8, uint16, bool or float in [0, 1]) or a torch tensor (HxW or CxHxW, uint8 or float in [0, 1]).
Greyscale is repeated to three channels, an alpha channel is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
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


class ImageTooLargeError(ImageReadError):
    """An image over a size limit (:class:`InputLimits`); refused before its pixels are decoded
    where the size can be read from the file's header."""


@dataclass(frozen=True)
class InputLimits:
    """Bounds on the work one input may cause; an input over one is an :class:`ImageTooLargeError`
    naming it (skipped with ``on_error="skip"``).

    Attributes:
        max_pixels: largest width x height read (files: checked from the header).
        max_aspect_ratio: largest long side / short side (a 8x3,000,000 strip is refused).
        max_processed_pixels: largest image the detector works at, after ``image_size`` /
            ``scale`` (a native-resolution model scores each image at its own size).
    """

    max_pixels: int | None = 150_000_000
    max_aspect_ratio: float | None = 100.0
    max_processed_pixels: int | None = 16_777_216  # 4096 x 4096

    def check(self, name: object, height: int, width: int) -> None:
        """Raise :class:`ImageTooLargeError` when an image of this size is over a limit."""
        if self.max_pixels is not None and height * width > self.max_pixels:
            raise ImageTooLargeError(
                name,
                f"{width}x{height} image has {width * height:,} pixels, over the limit of "
                f"{self.max_pixels:,} (max_pixels)",
            )
        ratio = max(height, width) / max(1, min(height, width))
        if self.max_aspect_ratio is not None and ratio > self.max_aspect_ratio:
            raise ImageTooLargeError(
                name,
                f"{width}x{height} image has an aspect ratio of {ratio:,.0f}:1, over the limit "
                f"of {self.max_aspect_ratio:g}:1 (max_aspect_ratio); crop it into tiles",
            )

    def check_processed(self, name: object, height: int, width: int) -> None:
        """Raise :class:`ImageTooLargeError` when the processed size is over the limit."""
        if self.max_processed_pixels is not None and height * width > self.max_processed_pixels:
            raise ImageTooLargeError(
                name,
                f"would be processed at {width}x{height} = {width * height:,} pixels, over the "
                f"limit of {self.max_processed_pixels:,} (max_processed_pixels); fit with "
                "image_size= or scale=, or downscale the image",
            )


_limits = InputLimits()


def input_limits() -> InputLimits:
    """The :class:`InputLimits` every read, conversion and batch uses now."""
    return _limits


def set_input_limits(**changes: float | int | None) -> InputLimits:
    """Change the process-wide input limits (``None`` = no limit); returns the previous ones.

    Example: ``set_input_limits(max_aspect_ratio=400, max_processed_pixels=None)``.
    """
    global _limits
    previous = _limits
    _limits = replace(_limits, **changes)  # type: ignore[arg-type]
    return previous


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
            input_limits().check(p, im.size[1], im.size[0])  # from the header, before decoding
            im.load()
            return pil_to_array(im)
    except ImageReadError:
        raise
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
    input_limits().check(name, int(t.shape[1]), int(t.shape[2]))
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
    """Resize CxHxW or BxCxHxW bilinearly with antialiasing (identity when the size matches).

    The antialiased resize runs the width pass first, through an (H_in, W_out) intermediate: for
    a tall strip (8 x 3,000,000 to 128 x 128: 384 M values, 42 s) the height pass is run first
    instead, as its own call (the same separable filter; values within ~3e-6).
    """
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    batched = t.ndim == 4
    x = t if batched else t.unsqueeze(0)
    (h, w), (oh, ow) = x.shape[-2:], size
    if h * ow > 8 * max(h * w, oh * ow):  # width-first intermediate far larger than both ends
        x = F.interpolate(x, size=(oh, w), mode="bilinear", align_corners=False, antialias=True)
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
