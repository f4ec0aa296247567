"""Reading image files into numpy arrays, numpy only (no torch): shared by the torch path
(:mod:`patchcore.core.images`, which re-exports these names) and the torch-free runtime
(:mod:`patchcore.lean.runtime`), so both decode and resize an image the same way.

Besides the readers: :func:`resize_operator` / :func:`resize_array`, the antialiased bilinear
resize of :func:`patchcore.core.images.resize` (``F.interpolate(..., antialias=True)``) as two small
matrix products, and :func:`bilinear_operator`, plain bilinear interpolation
(``align_corners=False``) used to bring maps to another size.
"""

from __future__ import annotations

import errno
import functools
import io
import numbers
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchcore.lean.util import one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Formats PIL may decode, for files and for bytes alike; anything else (DDS, EPS, PDF, ...)
#: is refused unread, whatever the file is named.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")


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
    naming it (an error record, or skipped, with ``on_error="skip"``).

    Every bound is checked from the image's header, before its pixels are decoded (files and
    uploaded bytes alike), and again on arrays given directly. ``None`` = no limit. The defaults
    of each surface are the one table :data:`SURFACE_LIMITS`.

    Attributes:
        max_pixels: largest width x height read.
        max_aspect_ratio: largest long side / short side (a 8x3,000,000 strip is refused).
        max_processed_pixels: largest image the detector works at, after ``image_size`` /
            ``scale`` (a native-resolution model scores each image at its own size).
    """

    max_pixels: int | None = 150_000_000
    max_aspect_ratio: float | None = 100.0
    max_processed_pixels: int | None = 16_777_216  # 4096 x 4096

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_aspect_ratio", "max_processed_pixels"):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v >= 1)
            if v is not None and (bad or (name != "max_aspect_ratio" and v != int(v))):
                raise ValueError(f"{name} must be None or a number >= 1, got {v!r}")

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


#: The default limits of each surface, in one place. ``library``: the library, ``patchcore
#: predict`` / ``batch`` and ``patchcore-run`` (local files the caller chose; what
#: :func:`input_limits` starts as). ``service``: both HTTP services (bytes from the network:
#: a smaller pixel and aspect budget, as one request must not hold a worker for long).
SURFACE_LIMITS: dict[str, InputLimits] = {
    "library": InputLimits(),
    "service": InputLimits(
        max_pixels=25_000_000, max_aspect_ratio=20, max_processed_pixels=4_194_304
    ),
}

_limits = SURFACE_LIMITS["library"]


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


SizeCheck = Callable[[int, int], object]


def read_image(
    path: str | os.PathLike,
    *,
    limits: InputLimits | None = None,
    check_size: SizeCheck | None = None,
) -> np.ndarray:
    """Read an image file fully (truncated files are errors).

    Args:
        path: the file; only :data:`IMAGE_FORMATS` are decoded, whatever its suffix.
        limits: checked from the header before decoding (default: :func:`input_limits`).
        check_size: called with the header's (height, width) before decoding; raises
            :class:`ImageReadError` to refuse (e.g. the processed size a model cannot take).

    Returns:
        uint8 array HxW (greyscale) or HxWx3 (colour).

    Raises:
        ImageReadError: missing, a folder, a symbolic link loop, unreadable, not an image,
            damaged, truncated, NaN pixels; :class:`ImageTooLargeError` over a limit. Every
            failure of the decoder is one of these, naming the file.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise ImageReadError(p, _stat_problem(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(p, "is a folder, not an image file")
    return _decode(_open(p, p, IMAGE_FORMATS), p, limits, check_size)


def _open(source: object, name: object, formats: tuple[str, ...]) -> Image.Image:
    """``Image.open`` (the header only); every failure an :class:`ImageReadError`."""
    try:
        return Image.open(source, formats=formats)  # type: ignore[arg-type]
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"image too large ({one_line(exc, 200)})") from None
    except UnidentifiedImageError:
        what = "an image file" if isinstance(source, Path) else "an image"
        raise ImageReadError(
            name, f"not {what} (format not recognised; accepted: {', '.join(formats)})"
        ) from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the data's
            raise ImageReadError(name, _stat_problem(exc)) from None
        raise ImageReadError(name, f"damaged or truncated image ({one_line(exc, 200)})") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(name, f"damaged or truncated image ({one_line(exc, 200)})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a header parser raises on damage
        raise ImageReadError(
            name, f"damaged image header ({type(exc).__name__}: {one_line(exc, 200)})"
        ) from None


def _stat_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (the link leads back to itself): not a file"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def decode_bytes(
    data: bytes,
    *,
    name: str = "image",
    limits: InputLimits | None = None,
    formats: tuple[str, ...] = IMAGE_FORMATS,
    check_size: SizeCheck | None = None,
    max_pixels: int | None = None,
    max_aspect_ratio: float | None = None,
) -> np.ndarray:
    """Decode the bytes of one image fully, as :func:`read_image` decodes a file.

    Args:
        data: the encoded image.
        name: how the image is named in errors.
        limits: checked from the header before decoding (default: :func:`input_limits`).
        formats: the PIL formats tried.
        check_size: as in :func:`read_image`.
        max_pixels, max_aspect_ratio: for callers that do not pass ``limits`` yet: the limits
            ``InputLimits(max_pixels, max_aspect_ratio, None)``.

    Returns:
        uint8 array HxW (greyscale) or HxWx3 (colour).

    Raises:
        ImageTooLargeError: over a limit, or a decompression bomb.
        ImageReadError: empty, not an image of ``formats``, damaged or truncated; every other
            failure of the decoder too.
    """
    if not data:
        raise ImageReadError(name, "empty data")
    if limits is None and (max_pixels is not None or max_aspect_ratio is not None):
        limits = InputLimits(max_pixels, max_aspect_ratio, None)
    return _decode(_open(io.BytesIO(data), name, formats), name, limits, check_size)


def _decode(
    opened: Image.Image, name: object, limits: InputLimits | None, check_size: SizeCheck | None
) -> np.ndarray:
    """Check an opened image's header size, then decode it; any decoder failure becomes an
    :class:`ImageReadError` naming the input (a damaged file must never stop a run)."""
    try:
        with opened as im:
            width, height = im.size
            (limits or input_limits()).check(name, height, width)
            if check_size is not None:
                check_size(height, width)
            im.load()
            return pil_to_array(im, str(name))
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"image too large ({one_line(exc, 200)})") from None
    except MemoryError:
        raise ImageTooLargeError(name, "not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or damaged data
        raise ImageReadError(name, f"damaged or truncated image ({one_line(exc, 200)})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. NotImplementedError of a damaged image
        raise ImageReadError(
            name, f"cannot be decoded ({type(exc).__name__}: {one_line(exc, 200)})"
        ) from None


def pil_to_array(im: Image.Image, name: str = "image") -> np.ndarray:
    """PIL image -> uint8 HxW or HxWx3 array (alpha dropped, 16-bit scaled to 8-bit; float
    images must hold finite values in [0, 1])."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        return np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageReadError(name, "float image holds NaN or infinite pixels")
        _check_unit_range(float(a.min(initial=0)), float(a.max(initial=0)), name)
        return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode in ("L", "RGB"):
        return np.asarray(im).copy()
    if im.mode in ("1", "LA"):
        return np.asarray(im.convert("L")).copy()
    return np.asarray(im.convert("RGB")).copy()


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


def to_chw(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An HxW or HxWxC array (uint8, uint16, bool or float in [0, 1]) -> float32 3xHxW in [0, 1].

    The array route of :func:`patchcore.core.images.as_tensor`: greyscale repeated to three
    channels,
    alpha dropped, channel-first arrays and images under 8 pixels refused.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        raise ImageReadError(name, f"array shape {arr.shape} looks channel-first; give HxWxC")
    t = _array_to_float(arr, name)
    if t.ndim == 2:
        t = t[:, :, None]
    if t.ndim != 3:
        raise ImageReadError(name, f"expected HxW or HxWxC, got shape {tuple(arr.shape)}")
    c = t.shape[2]
    if c in (1, 2):
        t = np.repeat(t[:, :, :1], 3, axis=2)
    elif c == 4:
        t = t[:, :, :3]
    elif c != 3:
        raise ImageReadError(name, f"{c} channels; expected 1, 3 or 4")
    if t.shape[0] < 8 or t.shape[1] < 8:
        raise ImageReadError(name, f"image of {t.shape[0]}x{t.shape[1]} pixels is too small")
    input_limits().check(name, int(t.shape[0]), int(t.shape[1]))
    return np.ascontiguousarray(t.transpose(2, 0, 1))


@functools.lru_cache(maxsize=64)
def resize_operator(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: torch's antialiased bilinear resize along one axis.

    The weights of ATen's ``_upsample_bilinear2d_aa`` (``align_corners=False``): scale
    ``n_in / n_out``, a triangle filter stretched by the scale when shrinking, each row
    normalised to sum 1.
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)  # ATen computes coordinates in float32: so do we
    support = scale if scale >= 1.0 else f32(1.0)  # interp_size / 2 = 1 for bilinear
    inv = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    op = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * f32(i + 0.5)
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), n_in)
        j = np.arange(lo, hi, dtype=np.float32)
        w = np.clip(f32(1.0) - np.abs((j - center + f32(0.5)) * inv), f32(0.0), None)
        total = w.sum(dtype=np.float32)
        if total > 0:
            op[i, lo:hi] = w / total
    return op


def resize_array(chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float32 CxHxW array like :func:`patchcore.core.images.resize` (identity when the
    size
    matches): :func:`resize_operator` along each axis, applied as a banded filter in float32."""
    (h, w), (oh, ow) = chw.shape[-2:], size
    if (h, w) == (oh, ow):
        return chw
    x = np.ascontiguousarray(chw, dtype=np.float32)
    x = _apply_banded(x, _banded(resize_operator, w, int(ow)), axis=2)
    return _apply_banded(x, _banded(resize_operator, h, int(oh)), axis=1)


@functools.lru_cache(maxsize=64)
def _banded(make, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """An (n_out, n_in) operator with few non-zeros per row as (start (n_out,), weights
    (n_out, taps) float32): row i reads inputs ``start[i] .. start[i] + taps - 1``."""
    op = make(n_in, n_out)
    nz = op != 0
    first = np.where(nz.any(1), nz.argmax(1), 0)
    last = np.where(nz.any(1), n_in - 1 - nz[:, ::-1].argmax(1), 0)
    taps = int((last - first).max()) + 1
    start = np.minimum(first, n_in - taps)
    cols = start[:, None] + np.arange(taps)
    return start, np.take_along_axis(op, cols, 1).astype(np.float32)


def _apply_banded(x: np.ndarray, band: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """``op @ x`` along ``axis`` for a banded operator (a sum over its few taps)."""
    start, weights = band
    shape = [1] * x.ndim
    shape[axis] = len(start)
    out = np.take(x, start, axis=axis) * weights[:, 0].reshape(shape)
    for t in range(1, weights.shape[1]):
        out += np.take(x, start + t, axis=axis) * weights[:, t].reshape(shape)
    return out


@functools.lru_cache(maxsize=64)
def bilinear_operator(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: plain bilinear interpolation along one axis, as
    ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing)."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)  # in float32, as ATen
    op = np.zeros((n_out, n_in), dtype=np.float64)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + f32(0.5)) * scale - f32(0.5), f32(0))
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float64)
    rows = np.arange(n_out)
    np.add.at(op, (rows, lo), 1.0 - frac)
    np.add.at(op, (rows, hi), frac)
    return op


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) float maps -> (..., *size) float32 by :func:`bilinear_operator` (the
    torch path's ``F.interpolate`` of a map to another size)."""
    h, w = maps.shape[-2:]
    if (h, w) == tuple(size):
        return maps.astype(np.float32, copy=False)
    x = np.ascontiguousarray(maps, dtype=np.float32)
    x = _apply_banded(x, _banded(bilinear_operator, w, int(size[1])), axis=x.ndim - 1)
    return _apply_banded(x, _banded(bilinear_operator, h, int(size[0])), axis=x.ndim - 2)
