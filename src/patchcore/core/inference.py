"""Scoring methods of the detector: :class:`ScoreMixin` (``iter_score``, ``score``,
``score_samples``, ``score_with_maps``, ``anomaly_map``, ``anomaly_maps``).

Mixed into :class:`patchcore.PatchCore` (as :mod:`patchcore.core.verdicts`): every method reads
its images through the estimator's ``_batches`` (the one input pipeline) and scores each batch
with ``_score_batch`` (the one scoring rule, :mod:`patchcore.core.scoring`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from patchcore.core.images import ImageInput
from patchcore.core.inputs import Reorder, as_list, check_on_error, group_batches, warn_skipped
from patchcore.core.results import ImageResult, MapSize, ScoreResult, check_maps
from patchcore.lean import ood

__all__ = ["BUCKET_WINDOW", "ScoreMixin"]

#: With ``size_buckets=True``, scoring groups images of one processed size that lie within this
#: many inputs of each other (in ``batch_size`` units) into one batch, so inputs of mixed sizes
#: still run batched; results still stream in input order
#: (:func:`patchcore.lean.inputs.iter_batches`, ``window``).
BUCKET_WINDOW = 4


class ScoreMixin:
    """Scores and anomaly maps of images, streamed or collected; higher = more anomalous."""

    def iter_score(
        self,
        images: Any,
        *,
        maps: MapSize = None,
        on_error: str = "raise",
        progress: bool | None = None,
        size_buckets: bool = False,
    ) -> Iterator[ImageResult]:
        """Score images one by one as they are processed, in input order (a stream).

        Images are still decoded and run in batches of ``batch_size``; each batch's results are
        yielded as soon as it is done, so a caller can show progress or write rows as they come.

        Args:
            images: paths, PIL images, arrays, tensors, or an ``ImageDataset``.
            maps: ``None`` (no maps), ``"processed"`` (at the resized size the detector sees),
                ``"native"`` (each input's own size) or ``(H, W)`` (a given display size).
            on_error: ``"raise"`` stops at the first unreadable image (naming it); ``"skip"``
                yields it with ``score`` NaN, ``map`` None and ``error`` set.
            progress: show a progress bar for this call; ``None`` = the ``progress`` parameter.
            size_buckets: batch same-size images that lie within ``BUCKET_WINDOW`` batches of
                each other, not only consecutive ones (inputs of mixed sizes). Off by default:
                a batched convolution is not bit for bit the one of a single image, so scores
                and maps then differ from the default path's in the last bits (measured in
                benchmarks/RESULTS.md, "Size buckets").

        Yields:
            :class:`ImageResult` per input: index, name, score (higher = more anomalous), map
            (float32 HxW or None) and error (None, or why the input was skipped).
        """
        self._check_fitted("iter_score")  # type: ignore[attr-defined]
        check_on_error(on_error)
        maps = check_maps(maps)
        items = as_list(images)
        progress = self.progress if progress is None else bool(progress)  # type: ignore[attr-defined]
        window = BUCKET_WINDOW * int(self.batch_size) if size_buckets else 0  # type: ignore[attr-defined]
        return self._stream(items, maps, on_error, progress, window)

    def _stream(
        self, items: list[Any], maps: MapSize, on_error: str, progress: bool, window: int
    ) -> Iterator[ImageResult]:
        """Results in input order. Batches smaller than ``batch_size`` (inputs of mixed sizes)
        are searched together, up to ``batch_size`` images: one scan of the bank for them all
        (``_score_batches``); each image's result is the one it gets alone."""
        order = Reorder()
        batches = self._batches(items, on_error, progress, "score", window)  # type: ignore[attr-defined]
        for group in group_batches(batches, int(self.batch_size)):  # type: ignore[attr-defined]
            for s in (s for batch in group for s in batch.skipped):
                order.add(s.index, ImageResult(s.index, s.name, float("nan"), None, s.reason))
            live = [batch for batch in group if batch.pixels is not None]
            if live:
                self._collect(live, maps, order)
            yield from order.ready()

    def _collect(self, batches: list[Any], maps: MapSize, order: Reorder) -> None:
        """Score ``batches`` together and add their results to ``order``."""
        with_stats = self.input_profile_ is not None  # type: ignore[attr-defined]  # as the runtime
        scored = self._score_batches(batches, maps)  # type: ignore[attr-defined]
        for batch, (scores, out) in zip(batches, scored, strict=True):
            stats = (
                [tuple(v) for v in ood.pixel_stats(batch.pixels.numpy()).tolist()]
                if with_stats
                else [None] * len(batch.indices)
            )
            for j, i in enumerate(batch.indices):
                m = out[j] if maps is not None else None
                order.add(
                    i,
                    ImageResult(i, batch.names[j], float(scores[j]), m, None,
                                batch.sizes[j], stats[j]),
                )  # fmt: skip

    def score(self, images: Any, **options: Any) -> ScoreResult:
        """Scores, optional anomaly maps and the skipped inputs of ``images`` in one pass.

        Keyword options (``maps``, ``on_error``, ``progress``, ``size_buckets``) as in
        :meth:`iter_score`; nothing is warned: unreadable inputs skipped with
        ``on_error="skip"`` are returned in ``skipped``.

        Returns:
            :class:`ScoreResult`: ``scores`` (N,) float64, higher = more anomalous, NaN where
            skipped; ``maps`` N float32 arrays (None where skipped), or None when ``maps`` is
            None; ``skipped`` the (index, name, reason) records.
        """
        stream = self.iter_score(images, **options)
        return ScoreResult.collect(stream, with_maps=options.get("maps") is not None)

    def _scored(
        self, images: Any, maps: MapSize, on_error: str, progress: bool | None
    ) -> ScoreResult:
        """:meth:`score`, warning about skipped inputs (the older methods' behaviour)."""
        result = self.score(images, maps=maps, on_error=on_error, progress=progress)
        warn_skipped("{n} unreadable image(s) scored as NaN", result.skipped, stacklevel=4)
        return result

    def score_samples(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> np.ndarray:
        """Image anomaly scores, higher = more anomalous.

        Returns:
            (N,) float64; NaN for images skipped with ``on_error="skip"`` (with a warning).
        """
        return self._scored(images, None, on_error, progress).scores

    def score_with_maps(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Image scores and anomaly maps in one pass (no threshold needed).

        Returns:
            scores (N,) float64 (NaN for skipped images) and N float32 maps HxW at each input's
            own size (None if skipped).
        """
        r = self._scored(images, "native", on_error, progress)
        return r.scores, r.maps  # type: ignore[return-value]

    def anomaly_map(self, image: ImageInput, *, progress: bool | None = None) -> np.ndarray:
        """Per-pixel anomaly map of one image, float32 HxW at the image's own size."""
        m = self.score([image], maps="native", progress=progress).maps[0]  # type: ignore[index]
        assert m is not None
        return m

    def anomaly_maps(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> list[np.ndarray | None]:
        """Anomaly maps of several images at their own sizes (None for skipped ones)."""
        return self._scored(images, "native", on_error, progress).maps  # type: ignore[return-value]
