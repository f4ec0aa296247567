"""Predict: stream a verdict, score and optional heatmap overlay per image file."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import plots
from ..detector import PatchCore
from ..images import read_image
from .model import display_range, require_threshold


@dataclass
class Prediction:
    """One image's result; ``error`` is set (and score is None) for unreadable files.

    ``normalized``: the score mapped onto [0, 1] with the threshold at 0.5 (a mapping, not a
    probability; see :meth:`PatchCore.normalize`).
    """

    path: str
    score: float | None
    anomalous: bool | None
    threshold: float
    heatmap: str | None = None
    error: str | None = None
    normalized: float | None = None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "error"
        return "anomalous" if self.anomalous else "normal"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def _heatmap_name(path: Path, used: set[str]) -> str:
    stem = path.stem
    name = f"{stem}_heatmap.png"
    k = 2
    while name in used:
        name = f"{stem}_{k}_heatmap.png"
        k += 1
    used.add(name)
    return name


def predict_images(
    det: PatchCore,
    files: Sequence[Path],
    *,
    heatmaps: str | os.PathLike | None = None,
    alpha: float = 0.5,
) -> Iterator[Prediction]:
    """Stream one :class:`Prediction` per file, in order, as the detector's batches finish.

    One detector pass over all files (it batches and decodes them itself). Unreadable files
    yield a prediction with ``error`` set. With ``heatmaps``, the anomaly maps are asked at
    each file's own size and an overlay (``anomaly_map_overlay`` on the model's calibration
    display range) is written per image as ``<heatmaps>/<stem>_heatmap.png``; the overlay
    reads the file's pixels itself (the detector does not hand them back).

    Raises:
        WorkflowError: the model has no threshold.
    """
    threshold = require_threshold(det, None)
    det.normalize(threshold)  # a stale score mapping fails here, before any image
    outdir = Path(heatmaps) if heatmaps is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    rng = display_range(det)
    used: set[str] = set()
    paths = [str(f) for f in files]
    maps = "native" if outdir is not None else None
    for r in det.iter_score(paths, maps=maps, on_error="skip", progress=False):
        path = paths[r.index]
        if r.error is not None:
            yield Prediction(path, None, None, threshold, error=r.error)
            continue
        if not math.isfinite(r.score):  # fail closed: NaN >= threshold would read "normal"
            why = f"scored {r.score!r}: no verdict (the model holds non-finite values)"
            yield Prediction(path, None, None, threshold, error=why)
            continue
        heat = None
        if outdir is not None and r.map is not None:
            overlay = plots.anomaly_map_overlay(read_image(path), r.map, rng, alpha)
            heat = str(plots.save_png(overlay, outdir / _heatmap_name(Path(path), used)))
        norm = float(det.normalize(r.score))
        yield Prediction(
            path, r.score, bool(r.score >= threshold), threshold, heatmap=heat, normalized=norm
        )
