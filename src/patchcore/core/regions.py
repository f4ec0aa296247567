"""Defect regions for the detector: :class:`RegionsMixin` (``region_cut``, ``find_regions``,
``iter_regions``, ``calibrate_regions``). The regions an image shows are those of its
inspection record (:meth:`~patchcore.core.inspection.InspectMixin.iter_inspect`, the rule of
:func:`patchcore.lean.record.verdict_regions`); ``iter_regions`` is a view of that stream. The
pure labelling of one map is :mod:`patchcore.lean.regions`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from patchcore.core.pixel_metrics import pixel_threshold, region_threshold
from patchcore.core.state import NotFittedError
from patchcore.lean.record import ANOMALOUS, ERROR, NonFiniteScoreError
from patchcore.lean.regions import DEFAULT_MIN_AREA, REGION_METHODS, ImageRegions, check_cut
from patchcore.lean.util import resize_mask

__all__ = ["RegionsMixin"]


class RegionsMixin:
    """Defect regions for :class:`~patchcore.core.detector.PatchCore`: the regions of each image's
    native-size anomaly map cut at :meth:`region_cut`, as its inspection record shows them (at
    least one for an anomalous verdict, none for a normal one)."""

    def region_cut(self, threshold: float | None = None) -> float:
        """The map value regions are cut at: ``threshold``; else ``region_threshold_`` (chosen
        on masks by :meth:`calibrate_regions`); else the image threshold carried onto the map's
        scale, ``threshold_ x map_scale_`` (the map scale chosen at calibration,
        :mod:`patchcore.core.calibration`); else (never calibrated on images: a model file
        from before, or ``set_threshold`` alone) ``threshold_`` itself.

        Raises:
            NotFittedError: not fitted, or no threshold of either kind.
            ValueError: a non-finite threshold.
        """
        self._check_fitted("find_regions")  # type: ignore[attr-defined]
        state = self.state_  # type: ignore[attr-defined]
        image_cut = state.threshold
        if image_cut is not None and state.map_scale is not None:
            image_cut = float(image_cut) * float(state.map_scale)
        for t in (threshold, state.region_threshold, image_cut):
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
        """Stream each input's regions (:class:`ImageRegions`) in input order: a view of
        :meth:`iter_inspect`'s records (one scoring pass, maps at each input's own size, boxes in
        its native pixels).

        Each map is cut at :meth:`region_cut` (``threshold`` if given). With an image threshold
        the regions follow the verdict: an anomalous image shows at least its peak region, a
        normal one none; without one, every image's regions are listed (``anomalous`` None).

        Raises:
            NotFittedError: no threshold to cut at (see :meth:`region_cut`).
            NonFiniteScoreError: a readable image scored NaN/inf (no verdict, no regions).
        """
        cut = self.region_cut(threshold)
        check_cut(cut, min_area)
        stream = self._inspections(  # type: ignore[attr-defined]
            images, True, cut, min_area, on_error, progress
        )
        for r, record in stream:
            if r.error is not None:
                yield ImageRegions(r.index, r.name, r.score, None, None, cut, r.error)
                continue
            if record.verdict == ERROR:
                raise NonFiniteScoreError(
                    f"{r.name}: scored {r.score!r} (or its map holds NaN/inf): no verdict and "
                    "no regions; check the model with check_finite()"
                )
            flagged = None if record.verdict is None else record.verdict == ANOMALOUS
            found = list(record.regions or ())
            yield ImageRegions(r.index, r.name, r.score, flagged, found, cut, None)

    def find_regions(self, images: Any, **kwargs: Any) -> list[ImageRegions]:
        """The regions of every input, in input order: ``list(iter_regions(images, ...))``."""
        return list(self.iter_regions(images, **kwargs))

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
                :func:`patchcore.core.pixel_metrics.region_threshold` with ``min_area``) or
                ``"max_pixel_f1"`` (pooled pixels,
                :func:`patchcore.core.pixel_metrics.pixel_threshold`).
            min_area: the minimum region area the threshold is chosen for.

        Returns:
            self.

        Raises:
            ValueError: an unknown method, counts differ, no mask has a defect, or a map is
                not finite.
        """
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
