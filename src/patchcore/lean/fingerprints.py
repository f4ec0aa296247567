"""Content digests of images: how a model recognises its own training images.

A model stores the digest of every image it was fitted on (``PatchCore.train_digests_``), so
that calibration and evaluation can leave out an image the model has seen, whatever it is
called or wherever it lies (the leakage guard of ``calibrate`` and ``evaluate``):

- a file (a path): ``"file:"`` + the SHA-256 of its bytes, so a copy under another name or in
  another folder has the same digest;
- an in-memory image (numpy array, PIL image, torch tensor): ``"pixels:"`` + the SHA-256 of its
  decoded pixels (dtype, shape and bytes of the array, C order).

A file and an in-memory copy of it have different digests (one is of the encoded bytes, the
other of the pixels). numpy only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["DIGEST_KINDS", "content_digest", "digests"]

#: The digest prefixes: of a file's bytes, of an in-memory image's pixels.
DIGEST_KINDS = ("file", "pixels")
_CHUNK = 1 << 20


def _file_digest(path: str | os.PathLike) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return None
    return "file:" + h.hexdigest()


def _pixel_digest(pixels: np.ndarray) -> str:
    a = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return "pixels:" + h.hexdigest()


def content_digest(image: Any) -> str | None:
    """The digest of one image (see the module docstring), or None when it cannot be taken
    (an unreadable file, an input of another kind).

    Args:
        image: a path, a numpy array, a PIL image or a torch tensor (anything with a
            ``numpy()`` method that gives its pixels on the CPU).
    """
    if isinstance(image, (str, os.PathLike)):
        return _file_digest(image)
    if isinstance(image, np.ndarray):
        return _pixel_digest(image)
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor (no import)
        return _pixel_digest(image.detach().cpu().numpy())
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return None
    if isinstance(image, Image.Image):
        return _pixel_digest(np.asarray(image))
    return None


def digests(images: Iterable[Any]) -> list[str | None]:
    """:func:`content_digest` of each image, in order."""
    return [content_digest(image) for image in images]
