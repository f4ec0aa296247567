"""Defect regions for the detector: :class:`RegionsMixin` (``find_regions``, ``region_cut``,
``calibrate_regions``). The pure labelling of one map is :mod:`patchcore.lean.regions`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from patchcore.lean.regions import (
    DEFAULT_MIN_AREA,
    REGION_METHODS,
    ImageRegions,
    check_cut,
    label_regions,
)

__all__ = ["RegionsMixin"]


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
        check_cut(cut, min_area)
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
        check_cut(0.0, min_area)
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
