"""What scoring returns: per-image results, the whole result of a call, and verdicts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from patchcore.core.inputs import Skipped

__all__ = ["Classification", "ImageResult", "MapSize", "ScoreResult", "check_maps"]


class Classification(NamedTuple):
    """Output of :meth:`PatchCore.classify`.

    labels: (N,) bool, True = anomalous. scores: (N,) float. maps: N float32 arrays HxW at each
    input's own size.
    """

    labels: np.ndarray
    scores: np.ndarray
    maps: list[np.ndarray]


MapSize = str | tuple[int, int] | None
"""``None``, ``"processed"``, ``"native"`` or ``(H, W)``: see :meth:`PatchCore.iter_score`."""


class ImageResult(NamedTuple):
    """One input's outcome, yielded by :meth:`PatchCore.iter_score` in input order.

    index: position in the input. name: its path, or ``"image #<index>"``. score: higher = more
    anomalous, NaN when skipped. map: float32 HxW or None. error: None, or why it was skipped.
    size: the input's own (H, W), None when skipped. stats: its pixel statistics
    (:func:`patchcore.lean.ood.pixel_stats`: mean, std, colourfulness of the processed
    pixels), None when skipped or when the model has no input profile (they feed only the
    out-of-distribution hint of its record, with ``size`` and ``map``).
    """

    index: int
    name: str
    score: float
    map: np.ndarray | None
    error: str | None
    size: tuple[int, int] | None = None
    stats: tuple[float, float, float] | None = None


@dataclass
class ScoreResult:
    """What :meth:`PatchCore.score` did.

    Attributes:
        scores: (N,) float64, higher = more anomalous; NaN for skipped inputs.
        maps: N float32 HxW arrays (None for skipped inputs), or None when no maps were asked.
        skipped: the unreadable inputs, as (index, name, reason) records.
    """

    scores: np.ndarray
    maps: list[np.ndarray | None] | None
    skipped: list[Skipped]

    @classmethod
    def collect(cls, results: Iterable[ImageResult], with_maps: bool) -> ScoreResult:
        """Gather a stream of per-image results (in input order) into one result."""
        results = list(results)
        return cls(
            scores=np.array([r.score for r in results], dtype=np.float64),
            maps=[r.map for r in results] if with_maps else None,
            skipped=[Skipped(r.index, r.name, r.error) for r in results if r.error is not None],
        )


def check_maps(maps: MapSize) -> MapSize:
    """``maps`` if it is a valid :data:`MapSize` (a list (H, W) made a tuple); else ValueError."""
    if maps is None or (isinstance(maps, str) and maps in ("processed", "native")):
        return maps
    if (
        isinstance(maps, (tuple, list))
        and len(maps) == 2
        and all(isinstance(v, (int, np.integer)) and v >= 1 for v in maps)
    ):
        return (int(maps[0]), int(maps[1]))
    raise ValueError(
        f"maps must be None, 'processed', 'native' or (height, width) in pixels, got {maps!r}"
    )
