"""Inspection records from the detector: :class:`InspectMixin` (``iter_inspect``, ``inspect``).

One scoring pass with maps at each input's own size; every result becomes the one record of
:mod:`patchcore.lean.record` (verdict by its rule, normalised score, map maximum, regions cut
at the model's region cut), the record every surface prints, serves or writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from patchcore.lean import record as rec
from patchcore.lean.regions import DEFAULT_MIN_AREA

__all__ = ["InspectMixin"]


class InspectMixin:
    """``iter_inspect`` / ``inspect`` for :class:`~patchcore.core.detector.PatchCore`."""

    def iter_inspect(
        self,
        images: Any,
        *,
        regions: bool = True,
        region_threshold: float | None = None,
        min_area: int = DEFAULT_MIN_AREA,
        on_error: str = "skip",
        progress: bool | None = None,
    ) -> Iterator[rec.Inspection]:
        """Stream one :class:`~patchcore.lean.record.Inspection` per input, in input order.

        Args:
            images: anything :meth:`iter_score` takes.
            regions: cut each map into defect regions (at :meth:`region_cut`); needs a
                threshold (or ``region_threshold``). An anomalous image always shows at least
                one region, a normal one none.
            region_threshold: cut the maps at this map value instead of :meth:`region_cut`
                (also without an image threshold: then every image's regions are listed).
            min_area: smallest region kept, in pixels.
            on_error: ``"skip"`` (default) gives an unreadable input an ``"error"`` record;
                ``"raise"`` stops at the first one.
            progress: show a progress bar; ``None`` = the ``progress`` parameter.

        Without a threshold the records carry scores and maps and no verdict (None).

        Raises:
            NonFiniteScoreError: the model's threshold is not finite.
        """
        for _, record in self._inspections(
            images, regions, region_threshold, min_area, on_error, progress
        ):
            yield record

    def inspect(self, images: Any, **kwargs: Any) -> list[rec.Inspection]:
        """``list(iter_inspect(images, **kwargs))``: one record per input, in input order."""
        return list(self.iter_inspect(images, **kwargs))

    def _inspections(
        self,
        images: Any,
        regions: bool,
        region_threshold: float | None,
        min_area: int,
        on_error: str,
        progress: bool | None,
    ) -> Iterator[tuple[Any, rec.Inspection]]:
        """(the scoring pass's :class:`~patchcore.core.results.ImageResult`, its record)."""
        self._check_fitted("inspect")  # type: ignore[attr-defined]
        state = self.state_  # type: ignore[attr-defined]
        threshold = rec.check_threshold(state.threshold)
        mapping = state.normalization if threshold is not None else None
        cut = None
        if regions and (threshold is not None or region_threshold is not None):
            cut = self.region_cut(region_threshold)  # type: ignore[attr-defined]
        stream = self.iter_score(  # type: ignore[attr-defined]
            images, maps="native", on_error=on_error, progress=progress
        )
        for r in stream:
            if r.error is not None:
                yield r, rec.error_record(r.name, r.index, r.error, threshold=threshold)
                continue
            record = rec.inspection(
                r.name,
                r.index,
                r.score,
                threshold=threshold,
                normalization_map=mapping,
                anomaly_map=r.map,
                region_cut=cut,
                min_area=min_area,
                profile=state.input_profile,
                pixel_stats=r.stats,
            )
            yield r, record
