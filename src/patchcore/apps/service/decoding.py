"""Uploaded bytes to pixels, under the service's limits, every size checked from the header.

:func:`decode_image` decodes one upload with :func:`patchcore.lean.decode.decode_bytes` (format
allow-list, pixel budget, aspect ratio and the backend's processed size all read from the
header before any pixel is decoded); :func:`header_pixels` reads only the header, so a batch's
total pixels are checked before any of its images is decoded. numpy and Pillow only.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from patchcore.apps.service.errors import InputError
from patchcore.lean.decode import IMAGE_FORMATS, decode_bytes
from patchcore.lean.pixels import ImageReadError, ImageTooLargeError, InputLimits

__all__ = ["MIN_SIDE", "decode_image", "header_pixels"]

#: Smallest side the service scores, in pixels.
MIN_SIDE = 8


def decode_image(
    data: bytes,
    max_pixels: int,
    name: str = "image",
    *,
    max_aspect_ratio: float | None = None,
    processed: Callable[[int, int], tuple[int, int]] | None = None,
    max_processed_pixels: int | None = None,
) -> np.ndarray:
    """Decode one upload as :func:`patchcore.lean.pixels.read_image` decodes a file, safely.

    Args:
        data: the encoded image.
        max_pixels: largest width x height, checked from the header.
        name: how the image is named in errors.
        max_aspect_ratio: largest long side / short side, from the header.
        processed: (height, width) -> the size the backend works at (its ``image_size`` /
            ``scale``), checked against ``max_processed_pixels`` from the header.
        max_processed_pixels: see ``processed``.

    Returns:
        uint8 array HxW (greyscale) or HxWx3 (colour).

    Raises:
        InputError: 400 (empty, not an image, damaged, truncated or under 8x8) or 413 (over a
            size limit, or a decompression bomb).
    """
    if not data:
        raise InputError(400, f"{name}: empty body; send the bytes of one image")

    def check_size(height: int, width: int) -> None:
        if processed is not None:
            limits = InputLimits(None, None, max_processed_pixels)
            limits.check_processed(name, *processed(height, width))

    try:
        array = decode_bytes(
            data,
            name=name,
            max_pixels=max_pixels,
            max_aspect_ratio=max_aspect_ratio,
            check_size=check_size,
        )
    except ImageTooLargeError as exc:
        raise InputError(413, str(exc)) from None
    except ImageReadError as exc:
        raise InputError(400, str(exc)) from None
    height, width = array.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InputError(
            400, f"{name}: {width}x{height} image is too small (at least {MIN_SIDE}x{MIN_SIDE})"
        )
    return array


def header_pixels(data: bytes) -> int:
    """Width x height as the image's header declares it; 0 when there is no readable header
    (such an upload is refused when it is decoded). Reads no pixel."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - any unreadable header: refused later, one by one
        return 0
    return int(width) * int(height)
