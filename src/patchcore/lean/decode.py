"""Decoding image bytes (uploads) the way :func:`patchcore.core.images.read_image` decodes a file.

Kept apart from :mod:`patchcore.core.images` (owned by the core) until it takes a bytes decoder:
this module only adds what bytes from the network need on top of it: a pixel budget checked
from the header before any pixel is decoded, and an allow-list of formats.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchcore.lean.pixels import ImageReadError, ImageTooLargeError, InputLimits, pil_to_array
from patchcore.lean.util import one_line

#: Formats PIL may decode here; everything else (EPS, PDF, ...) is refused unread.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")


__all__ = ["IMAGE_FORMATS", "ImageTooLargeError", "decode_bytes"]


def decode_bytes(
    data: bytes,
    *,
    name: str = "image",
    max_pixels: int | None = None,
    max_aspect_ratio: float | None = None,
    formats: tuple[str, ...] = IMAGE_FORMATS,
    check_size: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Decode the bytes of one image fully (truncated data is an error).

    Args:
        data: the encoded image.
        name: how the image is named in errors.
        max_pixels: largest width x height accepted, checked from the header.
        max_aspect_ratio: largest long side / short side accepted, checked from the header.
        formats: the PIL formats tried.
        check_size: called with the header's (height, width) before decoding; raises
            :class:`ImageTooLargeError` to refuse (e.g. a processed-size limit).

    Returns:
        uint8 array HxW (greyscale) or HxWx3 (colour), as :func:`~patchcore.core.images.read_image`.

    Raises:
        ImageTooLargeError: over ``max_pixels`` or ``max_aspect_ratio``, or a decompression
            bomb.
        ImageReadError: empty, not an image of ``formats``, damaged or truncated.
    """
    if not data:
        raise ImageReadError(name, "empty data")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            width, height = im.size
            InputLimits(max_pixels, max_aspect_ratio, None).check(name, height, width)
            if check_size is not None:
                check_size(height, width)
            im.load()
            return pil_to_array(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(
            name, f"not an image (accepted formats: {', '.join(formats)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(name, f"damaged or truncated image ({one_line(exc, 200)})") from None
