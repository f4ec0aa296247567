"""The review's pictures: thumbnails, the image, its heatmap layer, its ground-truth outline,
and the worst patch beside the nearest normal training patch. Each is made once from the
cached map (or one :meth:`~patchcore.PatchCore.explain` pass) and kept in the cache folder.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchcore.apps import plots
from patchcore.apps.review.cache import write_atomic
from patchcore.apps.review.session import Item, ReviewSession
from patchcore.apps.workflow.explain import explanation_picture
from patchcore.apps.workflow.reporting import explanation_caption
from patchcore.core import datasets
from patchcore.core.images import ImageReadError, read_image
from patchcore.lean import record as rec

__all__ = ["THUMB_SIDE", "display", "explanation", "heat_layer", "mask_layer", "original", "thumb"]

#: Longest side of a gallery thumbnail, pixels.
THUMB_SIDE = 200
#: Image suffixes a browser shows as they are (others are decoded and sent as PNG).
BROWSER_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                    ".webp": "image/webp", ".bmp": "image/bmp", ".gif": "image/gif"}  # fmt: skip


def png(array: np.ndarray) -> bytes:
    """A uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def display(session: ReviewSession) -> tuple[float, float] | None:
    """The heatmap colour range: :func:`patchcore.lean.record.display_range` of the model."""
    det = session.det
    return rec.display_range(det.display_range_, det.threshold_)


def original(item: Item) -> tuple[bytes, str]:
    """The image file's bytes and media type; other formats (TIFF) decoded and sent as PNG.

    Raises:
        ImageReadError: the file cannot be read.
    """
    kind = BROWSER_SUFFIXES.get(item.path.suffix.lower())
    if kind is not None:
        try:
            return item.path.read_bytes(), kind
        except OSError as exc:
            raise ImageReadError(item.path, str(exc)) from None
    return png(read_image(item.path)), "image/png"


def _shrunk(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    f = min(1.0, side / max(h, w))
    if f >= 1.0:
        return image
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def thumb(session: ReviewSession, item: Item) -> bytes | None:
    """A gallery thumbnail (the image with its heatmap at half opacity), JPEG; None when the
    image has no cached map or cannot be read."""
    if item.digest is None:
        return None
    path = session.cache.path(session.model_digest, "thumbs", item.digest, "jpg")
    if path.is_file():
        return path.read_bytes()
    small = session.small_map(item)
    if small is None:
        return None
    try:
        image = _shrunk(read_image(item.path), THUMB_SIDE)
    except ImageReadError:
        return None
    tile = plots.anomaly_map_overlay(image, small, display(session), alpha=0.45)
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=85)
    write_atomic(path, buf.getvalue())
    return buf.getvalue()


def heat_layer(session: ReviewSession, item: Item) -> bytes | None:
    """The colour layer of the heatmap (model's display range, 'jet'), at the image's own
    size, PNG; the page lays it over the image with an opacity slider."""
    small = session.small_map(item)
    r = session.record(item)
    if small is None or not r.get("width"):
        return None
    h, w = int(r["height"]), int(r["width"])
    blank = np.zeros((h, w, 3), dtype=np.uint8)
    return png(plots.anomaly_map_overlay(blank, small, display(session), alpha=1.0))


def mask_layer(item: Item) -> bytes | None:
    """The ground-truth mask's outline (white on transparent), PNG; None without a mask."""
    if item.mask is None:
        return None
    mask = datasets.load_mask(item.sample)
    if mask is None:
        return None
    width = max(2, round(max(mask.shape) / 200))
    outline = plots.mask_outline(mask, width)
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[outline] = (255, 255, 255, 255)
    return png(rgba)


def explanation(session: ReviewSession, item: Item) -> dict[str, Any] | None:
    """The worst patch of an image and the nearest normal training patch (one
    :meth:`~patchcore.PatchCore.explain` pass, cached): the explanation's fields, a caption
    and whether its picture exists. None for an unreadable image."""
    if item.digest is None:
        return None
    path = session.cache.path(session.model_digest, "explain", item.digest, "json")
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    (e,) = session.det.explain([str(item.path)], on_error="skip", progress=False)
    if e.error is not None:
        return None
    out = {**e.as_dict(), "caption": explanation_caption(e), "picture": False}
    try:
        pic = explanation_picture(e, read_image(item.path), height=180)
        write_atomic(path.with_suffix(".png"), png(pic))
        out["picture"] = True
    except ImageReadError:
        pass
    out["name"] = item.name
    write_atomic(path, json.dumps(out).encode("utf-8"))
    return out


def explanation_png(session: ReviewSession, item: Item) -> Path | None:
    """The cached explanation picture of an item, or None."""
    if item.digest is None:
        return None
    path = session.cache.path(session.model_digest, "explain", item.digest, "png")
    return path if path.is_file() else None
