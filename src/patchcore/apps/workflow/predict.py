"""Predict: stream a verdict, score and optional heatmap overlay per image file."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps import plots
from patchcore.apps.workflow.model import display_range, require_threshold
from patchcore.core.detector import PatchCore
from patchcore.core.images import read_image
from patchcore.lean.regions import DEFAULT_MIN_AREA, REGION_FIELDS, Region, label_regions


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
    regions: list[Region] | None = None
    region_threshold: float | None = None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "error"
        return "anomalous" if self.anomalous else "normal"

    def as_dict(self) -> dict[str, Any]:
        """Plain fields; ``regions`` (a list of dicts) and ``region_threshold`` only when
        regions were asked."""
        d = asdict(self)
        d["verdict"] = self.verdict
        if self.region_threshold is None:
            del d["regions"], d["region_threshold"]
        return d


def _heatmap_name(path: Path, used: set[str], suffix: str = "heatmap") -> str:
    """A PNG name for ``path``'s picture not yet in ``used``: ``stem_suffix.png``, then
    ``stem_2_suffix.png``, ... (added to ``used``)."""
    stem = path.stem
    name = f"{stem}_{suffix}.png"
    k = 2
    while name in used:
        name = f"{stem}_{k}_{suffix}.png"
        k += 1
    used.add(name)
    return name


def predict_images(
    det: PatchCore,
    files: Sequence[Path],
    *,
    heatmaps: str | os.PathLike | None = None,
    alpha: float = 0.5,
    regions: bool = False,
    region_threshold: float | None = None,
    min_area: int = DEFAULT_MIN_AREA,
) -> Iterator[Prediction]:
    """Stream one :class:`Prediction` per file, in order, as the detector's batches finish.

    One detector pass over all files (it batches and decodes them itself). Unreadable files
    yield a prediction with ``error`` set. With ``heatmaps``, the anomaly maps are asked at
    each file's own size and an overlay (``anomaly_map_overlay`` on the model's calibration
    display range) is written per image as ``<heatmaps>/<stem>_heatmap.png``; the overlay
    reads the file's pixels itself (the detector does not hand them back).

    With ``regions``, each prediction lists the defect regions of its native-size map
    (:func:`patchcore.lean.regions.label_regions` cut at ``det.region_cut(region_threshold)``:
    ``region_threshold``, else the model's calibrated region threshold, else its image
    threshold; at least ``min_area`` pixels), and the overlays draw their boxes.

    Raises:
        WorkflowError: the model has no threshold.
    """
    threshold = require_threshold(det, None)
    det.normalize(threshold)  # a stale score mapping fails here, before any image
    cut = det.region_cut(region_threshold) if regions else None
    outdir = Path(heatmaps) if heatmaps is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    rng = display_range(det)
    used: set[str] = set()
    paths = [str(f) for f in files]
    maps = "native" if outdir is not None or regions else None
    for r in det.iter_score(paths, maps=maps, on_error="skip", progress=False):
        path = paths[r.index]
        if r.error is not None:
            yield Prediction(path, None, None, threshold, error=r.error)
            continue
        if not math.isfinite(r.score):  # fail closed: NaN >= threshold would read "normal"
            why = f"scored {r.score!r}: no verdict (the model holds non-finite values)"
            yield Prediction(path, None, None, threshold, error=why)
            continue
        if cut is not None and not np.isfinite(r.map).all():  # fail closed: no regions
            why = "its anomaly map holds NaN/inf: no regions (the model holds non-finite values)"
            yield Prediction(path, None, None, threshold, error=why)
            continue
        found = None if cut is None else label_regions(r.map, cut, min_area=min_area)
        heat = None
        if outdir is not None and r.map is not None:
            overlay = plots.anomaly_map_overlay(read_image(path), r.map, rng, alpha)
            if found:
                overlay = plots.draw_regions(overlay, found, r.map.shape)
            heat = str(plots.save_png(overlay, outdir / _heatmap_name(Path(path), used)))
        yield Prediction(
            path,
            r.score,
            bool(r.score >= threshold),
            threshold,
            heatmap=heat,
            normalized=float(det.normalize(r.score)),
            regions=found,
            region_threshold=cut,
        )


def write_regions(
    predictions: Sequence[Prediction], path: str | os.PathLike, *, min_area: int
) -> Path:
    """Write the regions of ``predictions`` (made with ``regions=True``) to a .json or .csv file.

    JSON: ``{"region_threshold", "min_area", "images": [{"path", "verdict", "score",
    "error", "regions": [{x0, y0, x1, y1, area, peak, mean, peak_x, peak_y}, ...]}]}``, one
    entry per image in input order. CSV: one row per region (``path, verdict, score, region``
    (1 = highest peak) and the region's fields); images without regions have no row.
    Coordinates are the image's native pixels, boxes half-open (``x1``, ``y1`` exclusive).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cuts = {p.region_threshold for p in predictions if p.region_threshold is not None}
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "verdict", "score", "region", *REGION_FIELDS])
            for p in predictions:
                for k, r in enumerate(p.regions or (), start=1):
                    d = r.as_dict()
                    w.writerow([p.path, p.verdict, p.score, k, *(d[f] for f in REGION_FIELDS)])
        return path
    doc = {
        "region_threshold": next(iter(cuts)) if len(cuts) == 1 else None,
        "min_area": min_area,
        "images": [
            {
                "path": p.path,
                "verdict": p.verdict,
                "score": p.score,
                "error": p.error,
                "regions": None if p.regions is None else [r.as_dict() for r in p.regions],
            }
            for p in predictions
        ],
    }
    path.write_text(json.dumps(doc, indent=1))
    return path
