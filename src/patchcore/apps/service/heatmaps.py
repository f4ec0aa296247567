"""Heatmap overlays without matplotlib: a bounded in-memory store and the 'jet' blend.

The overlay is the one of :func:`patchcore.apps.plots.anomaly_map_overlay` (the same 'jet'
colours, built here from matplotlib's segment table so the torch-free distribution can draw
it), coloured over the fixed range :func:`patchcore.lean.record.display_range` gives, so that
red means the same map value on every image.
"""

from __future__ import annotations

import io
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["JET_LUT", "HeatmapStore", "Stored", "overlay_png"]

#: matplotlib's 'jet' as (x, value) breakpoints per channel (its ``_segmentdata``).
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _segment(points: tuple[tuple[float, float], ...], n: int = 256) -> np.ndarray:
    """One channel sampled at ``n`` levels, as matplotlib's ``_create_lookup_table`` does it
    (the same float operations, so the rounded colours are the same bytes)."""
    x = np.array([p[0] for p in points]) * (n - 1)
    y = np.array([p[1] for p in points])
    xind = (n - 1) * np.linspace(0, 1, n)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    return np.concatenate([[y[0]], distance * (y[ind] - y[ind - 1]) + y[ind - 1], [y[-1]]])


def _jet_lut() -> np.ndarray:
    channels = [_segment(_JET[c]) for c in ("red", "green", "blue")]
    lut = np.round(np.clip(np.stack(channels, axis=1), 0.0, 1.0) * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


#: (256, 3) uint8: the colour of each map level, 0 = coldest.
JET_LUT = _jet_lut()


@dataclass
class Stored:
    """An image and its map (same size), with the colour range to draw it in."""

    image: np.ndarray
    amap: np.ndarray
    display_range: tuple[float, float] | None

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.amap.nbytes)


def overlay_png(item: Stored, alpha: float) -> bytes:
    """The colour map blended over the image (``alpha`` 1: colours only, 0: image only), PNG."""
    rgb = item.image if item.image.ndim == 3 else np.repeat(item.image[..., None], 3, axis=2)
    amap = item.amap.astype(np.float32, copy=False)
    if item.display_range is None:
        lo, hi = float(amap.min()), float(amap.max())
    else:
        lo, hi = item.display_range
    span = hi - lo
    level = (amap >= hi) if span <= 0 else np.clip((amap - lo) / span, 0.0, 1.0)
    colours = JET_LUT[np.round(level * 255.0).astype(np.uint8)]
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
    out = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


class HeatmapStore:
    """Bounded in-memory store of :class:`Stored` overlays, oldest evicted first."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, item: Stored) -> str | None:
        """Store ``item``; returns its id, or None when it alone exceeds the budget."""
        if item.nbytes > self.max_bytes:
            return None
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = item
            self._bytes += item.nbytes
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return key

    def get(self, key: str) -> Stored | None:
        with self._lock:
            return self._items.get(key)

    def __len__(self) -> int:
        return len(self._items)
