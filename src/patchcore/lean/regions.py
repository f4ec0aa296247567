"""Defect regions: the connected regions of an anomaly map cut at a threshold.

:func:`label_regions` is a pure function of one map: the pixels with ``score >= threshold``,
grouped into 8-connected regions (``scipy.ndimage.label``, the connectivity the metrics use for
ground-truth regions), regions smaller than ``min_area`` pixels dropped, each described by a
:class:`Region` (bounding box, area, peak and mean score, peak location) in the map's pixels.
With maps at each image's own size (``maps="native"``) those are the image's native pixels.

The detector's side (a scoring pass, the cut a model uses, calibrating it on masks) is
:class:`patchcore.core.regions.RegionsMixin`. numpy and scipy only: the torch-free runtime uses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "DEFAULT_MIN_AREA",
    "REGION_FIELDS",
    "REGION_METHODS",
    "ImageRegions",
    "Region",
    "check_cut",
    "label_regions",
    "region_mask",
]

#: How :meth:`RegionsMixin.calibrate_regions` can choose the region threshold.
REGION_METHODS = ("max_region_f1", "max_pixel_f1")

#: Smallest region kept by default, in map pixels (native image pixels for native maps).
DEFAULT_MIN_AREA = 16

#: 8-connectivity, as the ground-truth regions of :mod:`patchcore.core.metrics`.
_STRUCTURE = np.ones((3, 3), dtype=bool)

#: Column order of a region written as a flat row (CSV): see :meth:`Region.as_dict`.
REGION_FIELDS = ("x0", "y0", "x1", "y1", "area", "peak", "mean", "peak_x", "peak_y")


@dataclass(frozen=True)
class Region:
    """One connected region of a thresholded anomaly map, in the map's pixel coordinates.

    Attributes:
        x0, y0: top-left corner of the bounding box (inclusive), pixels.
        x1, y1: bottom-right corner (exclusive, as a PIL crop box): the box is
            ``map[y0:y1, x0:x1]``, ``x1 - x0`` pixels wide.
        area: pixels in the region (not the box), >= 1.
        peak: highest map value in the region.
        mean: mean map value over the region's pixels.
        peak_x, peak_y: where the peak is (the first such pixel in row-major order).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak: float
    mean: float
    peak_x: int
    peak_y: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``."""
        return (self.x0, self.y0, self.x1, self.y1)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields, keys in :data:`REGION_FIELDS` order."""
        return asdict(self)


class ImageRegions(NamedTuple):
    """One input's regions, yielded by :meth:`RegionsMixin.iter_regions` in input order.

    index: position in the input. name: its path, or ``"image #<index>"``. score: the image
    score (NaN when skipped). anomalous: ``score >= threshold_`` (None without an image
    threshold or when skipped). regions: largest peak first, empty when none passes (None when
    skipped). threshold: the map threshold the regions were cut at. error: why it was skipped.
    """

    index: int
    name: str
    score: float
    anomalous: bool | None
    regions: list[Region] | None
    threshold: float
    error: str | None


def _check_map(anomaly_map: Any) -> np.ndarray:
    a = np.asarray(anomaly_map)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"anomaly_map must have shape (H, W), got {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"anomaly_map must be numeric, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError("anomaly_map holds NaN or infinite values: no regions can be judged")
    return a


def check_cut(threshold: Any, min_area: Any) -> tuple[float, int]:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if (
        isinstance(min_area, bool)
        or not isinstance(min_area, (int, np.integer))
        or int(min_area) < 1
    ):
        raise ValueError(f"min_area must be an integer >= 1 (pixels), got {min_area!r}")
    return float(threshold), int(min_area)


def _labelled(a: np.ndarray, threshold: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int32, kept label ids (K,)) of the regions of ``a >= threshold``."""
    labels, n = ndimage.label(a >= threshold, structure=_STRUCTURE)
    if n == 0:
        return labels, np.zeros(0, dtype=np.int64)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    kept = np.flatnonzero(area[1:] >= min_area) + 1
    return labels, kept


def label_regions(
    anomaly_map: Any, threshold: float, *, min_area: int = DEFAULT_MIN_AREA
) -> list[Region]:
    """The connected regions of ``anomaly_map >= threshold``, largest peak first.

    Args:
        anomaly_map: float ``(H, W)`` (or ``(1, H, W)``), higher = more anomalous; finite.
        threshold: pixels with a value ``>= threshold`` belong to a region (finite).
        min_area: regions of fewer pixels are dropped (>= 1).

    Returns:
        the regions (8-connected), sorted by peak (descending), then by position; coordinates
        in the map's pixels.

    Raises:
        ValueError: the map is not 2-D or holds NaN/inf; a non-finite threshold; ``min_area``
            not an integer >= 1.
    """
    a = _check_map(anomaly_map)
    threshold, min_area = check_cut(threshold, min_area)
    labels, kept = _labelled(a, threshold, min_area)
    if kept.size == 0:
        return []
    # per-region statistics inside each region's bounding box only: memory is bounded by the
    # largest box, not by every labelled pixel at once (a map above the cut everywhere)
    boxes = ndimage.find_objects(labels)
    out = []
    for k in kept.tolist():
        rows, cols = boxes[k - 1]
        inside = labels[rows, cols] == k
        values = np.where(inside, a[rows, cols], -np.inf)
        top = int(np.argmax(values))  # first pixel at the peak, row-major
        py, px = divmod(top, values.shape[1])
        area = int(np.count_nonzero(inside))
        out.append(
            Region(
                x0=int(cols.start),
                y0=int(rows.start),
                x1=int(cols.stop),
                y1=int(rows.stop),
                area=area,
                peak=float(values.flat[top]),
                mean=float(a[rows, cols][inside].sum(dtype=np.float64) / area),
                peak_x=int(cols.start) + px,
                peak_y=int(rows.start) + py,
            )
        )
    out.sort(key=lambda r: (-r.peak, r.y0, r.x0))
    return out


def region_mask(
    anomaly_map: Any, threshold: float, *, min_area: int = DEFAULT_MIN_AREA
) -> np.ndarray:
    """bool ``(H, W)``: the pixels of the regions :func:`label_regions` returns."""
    a = _check_map(anomaly_map)
    threshold, min_area = check_cut(threshold, min_area)
    labels, kept = _labelled(a, threshold, min_area)
    keep = np.zeros(int(labels.max()) + 1, dtype=bool)
    keep[kept] = True
    return keep[labels]
