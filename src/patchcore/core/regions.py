"""Defect regions: the connected regions of an anomaly map cut at a threshold.

:func:`label_regions` is a pure function of one map: the pixels with ``score >= threshold``,
grouped into 8-connected regions (``scipy.ndimage.label``, the connectivity the metrics use for
ground-truth regions), regions smaller than ``min_area`` pixels dropped, each described by a
:class:`Region` (bounding box, area, peak and mean score, peak location) in the map's pixels.
With maps at each image's own size (``maps="native"``) those are the image's native pixels.

:class:`RegionsMixin` gives the detector :meth:`~RegionsMixin.find_regions` (one scoring pass,
regions per image) and :meth:`~RegionsMixin.calibrate_regions` (a map threshold chosen on
images with ground-truth masks: max region F1 by default, or max pixel F1). Which threshold the
map is cut at: the calibrated region threshold when the model has one, the image threshold
otherwise. The image threshold finds the worst defect of an image but misses the others on
boards with many (deeppcb: recall 0.31 at the image threshold of the default top-10 score,
0.57 at the region cut; benchmarks/RESULTS.md, "Defect regions").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
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
    "RegionsMixin",
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


def _check_cut(threshold: Any, min_area: Any) -> tuple[float, int]:
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
    threshold, min_area = _check_cut(threshold, min_area)
    labels, kept = _labelled(a, threshold, min_area)
    if kept.size == 0:
        return []
    # per-region statistics from the region pixels only (few: the map is cut high)
    width = a.shape[1]
    where = np.flatnonzero(labels.ravel())
    lab = labels.ravel()[where]
    val = a.ravel()[where].astype(np.float64)
    ys, xs = np.divmod(where, width)
    size = int(lab.max()) + 1
    area = np.bincount(lab, minlength=size)
    total = np.bincount(lab, weights=val, minlength=size)
    box = np.empty((4, size), dtype=np.int64)
    box[:2], box[2:] = a.size, -1
    for row, coord, ufunc in ((0, xs, np.minimum), (1, ys, np.minimum), (2, xs, np.maximum)):
        ufunc.at(box[row], lab, coord)
    np.maximum.at(box[3], lab, ys)
    peak = np.full(size, -np.inf)
    np.maximum.at(peak, lab, val)
    tops = np.flatnonzero(val == peak[lab])  # pixels at their region's peak, row-major
    ids, first = np.unique(lab[tops], return_index=True)
    peak_at = np.zeros(size, dtype=np.int64)
    peak_at[ids] = where[tops[first]]
    out = [
        Region(
            x0=int(box[0, k]),
            y0=int(box[1, k]),
            x1=int(box[2, k]) + 1,
            y1=int(box[3, k]) + 1,
            area=int(area[k]),
            peak=float(peak[k]),
            mean=float(total[k] / area[k]),
            peak_x=int(peak_at[k] % width),
            peak_y=int(peak_at[k] // width),
        )
        for k in kept.tolist()
    ]
    out.sort(key=lambda r: (-r.peak, r.y0, r.x0))
    return out


def region_mask(
    anomaly_map: Any, threshold: float, *, min_area: int = DEFAULT_MIN_AREA
) -> np.ndarray:
    """bool ``(H, W)``: the pixels of the regions :func:`label_regions` returns."""
    a = _check_map(anomaly_map)
    threshold, min_area = _check_cut(threshold, min_area)
    labels, kept = _labelled(a, threshold, min_area)
    keep = np.zeros(int(labels.max()) + 1, dtype=bool)
    keep[kept] = True
    return keep[labels]


class RegionsMixin:
    """Defect regions for :class:`~patchcore.core.detector.PatchCore`: the regions of each image's
    native-size anomaly map cut at ``region_threshold_`` (set by :meth:`calibrate_regions`)
    or, without one, at the image threshold ``threshold_``."""

    def region_cut(self, threshold: float | None = None) -> float:
        """The map threshold regions are cut at: ``threshold``, else ``region_threshold_``,
        else ``threshold_``.

        Raises:
            NotFittedError: not fitted, or no threshold of either kind.
            ValueError: a non-finite threshold.
        """
        from patchcore.core.state import NotFittedError

        self._check_fitted("find_regions")  # type: ignore[attr-defined]
        state = self.state_  # type: ignore[attr-defined]
        for t in (threshold, state.region_threshold, state.threshold):
            if t is not None:
                if not math.isfinite(float(t)):
                    raise ValueError(f"region threshold is {t!r}: no region can be judged")
                return float(t)
        raise NotFittedError(
            "no threshold to cut the anomaly maps at; call calibrate(images, labels), "
            "calibrate_regions(images, masks) or set_threshold(value), or pass threshold="
        )

    def iter_regions(
        self,
        images: Any,
        *,
        threshold: float | None = None,
        min_area: int = DEFAULT_MIN_AREA,
        on_error: str = "raise",
        progress: bool | None = None,
    ) -> Iterator[ImageRegions]:
        """Stream each input's regions (:class:`ImageRegions`) in input order.

        One scoring pass with maps at each input's own size; each map is cut at
        :meth:`region_cut` (``threshold`` if given) and labelled with :func:`label_regions`,
        so boxes are in the image's native pixels. Regions are listed for every image, flagged
        or not (``anomalous`` says the verdict when the model has an image threshold).

        Raises:
            NotFittedError: no threshold to cut at (see :meth:`region_cut`).
            NonFiniteScoreError: a readable image scored NaN/inf (no verdict, no regions).
        """
        from patchcore.core.verdicts import NonFiniteScoreError

        cut = self.region_cut(threshold)
        _check_cut(cut, min_area)
        verdict = self.state_.threshold  # type: ignore[attr-defined]
        stream = self.iter_score(  # type: ignore[attr-defined]
            images, maps="native", on_error=on_error, progress=progress
        )
        for r in stream:
            if r.error is not None:
                yield ImageRegions(r.index, r.name, r.score, None, None, cut, r.error)
                continue
            if not math.isfinite(r.score) or not np.isfinite(r.map).all():
                raise NonFiniteScoreError(
                    f"{r.name}: scored {r.score!r} (or its map holds NaN/inf): no verdict and "
                    "no regions; check the model with check_finite()"
                )
            flagged = None if verdict is None else bool(r.score >= verdict)
            found = label_regions(r.map, cut, min_area=min_area)
            yield ImageRegions(r.index, r.name, r.score, flagged, found, cut, None)

    def find_regions(
        self,
        images: Any,
        *,
        threshold: float | None = None,
        min_area: int = DEFAULT_MIN_AREA,
        on_error: str = "raise",
        progress: bool | None = None,
    ) -> list[ImageRegions]:
        """The regions of every input, in input order: ``list(iter_regions(...))``."""
        return list(
            self.iter_regions(
                images,
                threshold=threshold,
                min_area=min_area,
                on_error=on_error,
                progress=progress,
            )
        )

    def calibrate_regions(
        self,
        images: Any,
        masks: Sequence[Any],
        *,
        method: str = "max_region_f1",
        min_area: int = DEFAULT_MIN_AREA,
        progress: bool | None = None,
    ) -> Any:
        """Choose ``region_threshold_`` on images with ground-truth masks.

        Args:
            images: calibration images (normal ones too: they can only hold false regions);
                each must be readable.
            masks: one ground-truth mask per image (bool/0-1 ``(H, W)``, True = defect; a
                mask of another size is resized with nearest neighbour; all False for a
                normal image), e.g. ``patchcore.core.datasets.load_mask(sample)``.
            method: ``"max_region_f1"`` (default: found regions against false regions,
                :func:`patchcore.core.metrics.region_threshold` with ``min_area``) or
                ``"max_pixel_f1"`` (pooled pixels, :func:`patchcore.core.metrics.pixel_threshold`).
            min_area: the minimum region area the threshold is chosen for.

        Returns:
            self.

        Raises:
            ValueError: an unknown method, counts differ, no mask has a defect, or a map is
                not finite.
        """
        from patchcore.core.metrics import pixel_threshold, region_threshold
        from patchcore.lean.util import resize_mask

        self._check_fitted("calibrate_regions")  # type: ignore[attr-defined]
        if method not in REGION_METHODS:
            raise ValueError(f"method must be one of {REGION_METHODS}, got {method!r}")
        if len(masks) != len(images):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks")
        _check_cut(0.0, min_area)
        result = self.score(  # type: ignore[attr-defined]
            images, maps="native", on_error="raise", progress=progress
        )
        sized = [
            resize_mask(np.asarray(m) != 0, a.shape)
            for m, a in zip(masks, result.maps, strict=True)
        ]
        if method == "max_pixel_f1":
            t = pixel_threshold(sized, result.maps, num_thresholds=2000)
        else:
            t = region_threshold(sized, result.maps, min_area=min_area)
        self.state_.region_threshold = float(t)  # type: ignore[attr-defined]
        self.state_.region_threshold_method = method  # type: ignore[attr-defined]
        return self
