"""Evaluate: score exactly the held-out images, compute the metrics, write the results.

One pass of the detector over the test images gives the scores and, where they are needed
(pixel metrics, report galleries), the anomaly maps at each image's own size (masks are at that
size), shrunk to at most :data:`PIXEL_METRIC_SIDE` pixels on the longer side as they stream in,
so only small maps are kept.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps.workflow.data import (
    DataSource,
    ProgressFn,
    WorkflowError,
    labelled_images,
    resolve_data,
    short_spec,
)
from patchcore.apps.workflow.model import load_model, model_card, require_threshold
from patchcore.core import datasets, metrics
from patchcore.core.datasets import ImageDataset
from patchcore.core.detector import PatchCore
from patchcore.lean.util import resize_map

#: Gallery tiles per group (true/false positives/negatives).
GALLERY_SIZE = 6
#: Longer side of the maps and masks pixel metrics are computed on (bounds memory).
PIXEL_METRIC_SIDE = 320


@dataclass
class Evaluation:
    """What :func:`evaluate_model` measured.

    ``measured`` is the typed metrics; ``metrics`` is what ``metrics.json`` holds (those
    metrics by their keys, plus the scores, the skipped images and the model card).
    """

    metrics: dict[str, Any]
    scored_names: list[str]
    calibration_names: list[str]
    report_path: str | None
    metrics_path: str | None
    skipped: list[tuple[str, str]]
    seconds: float
    ms_per_image: float
    measured: metrics.Metrics


@dataclass
class ScoredSet:
    """One pass of the detector over a data set.

    Attributes:
        data: the images.
        scores: (N,) image scores, NaN for unreadable images.
        maps: index -> anomaly map at most :data:`PIXEL_METRIC_SIDE` px on the longer side
            (only for the images that needed one).
        skipped: (name, reason) of the unreadable images.
        seconds: time spent scoring.
    """

    data: ImageDataset
    scores: np.ndarray
    maps: dict[int, np.ndarray]
    skipped: list[tuple[str, str]]
    seconds: float

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.data))


def held_out_images(det: PatchCore, source: DataSource, model_path: Any = None) -> ImageDataset:
    """The held-out test images stored at calibration time, looked up in ``source``.

    Raises:
        WorkflowError: the model has no threshold or no stored split, or ``source`` lacks
            some of its images.
    """
    require_threshold(det, model_path)
    names = det.metadata_.get("test_names")
    if not names:
        raise WorkflowError(
            f"{model_path or 'model'}: no held-out test split stored (threshold set by hand?); "
            f"run `patchcore calibrate {model_path or 'MODEL'} DATA` first"
        )
    pool = labelled_images(source)
    index = {n: i for i, n in enumerate(pool.names)}
    missing = [n for n in names if n not in index]
    if missing:
        stored = det.metadata_.get("calibration_data", "?")
        raise WorkflowError(
            f"{source.spec} lacks {len(missing)} of the {len(names)} held-out test images "
            f"(e.g. {missing[0]}); the model was calibrated on {stored}"
        )
    test = pool.subset([index[n] for n in names])
    overlap = set(test.names) & set(det.metadata_.get("calibration_names") or [])
    if overlap:  # cannot happen with files written by calibrate; refuse rather than leak
        raise WorkflowError(
            f"{len(overlap)} held-out images are also calibration images; recalibrate the model"
        )
    return test


def small_shape(h: int, w: int, side: int = PIXEL_METRIC_SIDE) -> tuple[int, int]:
    """(H, W) scaled down (never up) so that the longer side is at most ``side``."""
    f = min(1.0, side / max(h, w))
    return (max(1, round(h * f)), max(1, round(w * f)))


def score_set(
    det: PatchCore, test: ImageDataset, keep_map: Sequence[bool], progress: ProgressFn | None
) -> ScoredSet:
    """Score ``test`` in one detector pass; keep a small map of the images marked in
    ``keep_map`` (maps are computed only when some image needs one)."""
    scores = np.full(len(test), np.nan)
    small: dict[int, np.ndarray] = {}
    skipped: list[tuple[str, str]] = []
    # Maps at the image's own size, then shrunk: measuring at the processed size instead would
    # change the pixel metrics (aspect ratio and mask resolution; AUPRO 0.46 -> 0.32 on 12
    # magnetic_tile images at 128 px), and the detector takes one map size for all images.
    want = "native" if any(keep_map) else None
    t0 = time.perf_counter()
    for r in det.iter_score(test.images, maps=want, on_error="skip", progress=False):
        scores[r.index] = r.score
        if r.error is not None:
            skipped.append((r.name, r.error))
        elif r.map is not None and keep_map[r.index]:
            small[r.index] = resize_map(r.map, small_shape(*r.map.shape))
        if progress:
            progress(1)
    return ScoredSet(test, scores, small, skipped, time.perf_counter() - t0)


def measure(
    det: PatchCore, scored: ScoredSet, threshold: float
) -> tuple[metrics.Metrics, list[str]]:
    """The metrics of a scored set (readable images only) and notes on what was left out.

    Pixel AUROC / AUPRO (FPR <= 0.3) use the normal images and the anomalous images with
    masks, when some anomalous image has one.
    """
    test, scores = scored.data, scored.scores
    ok = np.isfinite(scores)
    truth = test.labels
    types = np.asarray(test.defect_types, dtype=object)
    measured = metrics.Metrics.from_dict(
        metrics.evaluate(scores[ok] >= threshold, truth[ok], types[ok].tolist())
    )
    both = 0 < int(truth[ok].sum()) < int(ok.sum())
    measured = replace(
        measured,
        auroc=metrics.auroc(truth[ok], scores[ok]) if both else None,
        threshold=threshold,
        threshold_method=det.threshold_method_,
    )
    notes: list[str] = []
    idx = [i for i in sorted(scored.maps) if _pixel_candidate(test[i])]
    if any(test[i].is_anomalous for i in idx):
        masks = [datasets.load_mask(test[i], scored.maps[i].shape) for i in idx]
        pairs = [(m, scored.maps[i]) for m, i in zip(masks, idx, strict=True) if m is not None]
        pm, mp = [p[0] for p in pairs], [p[1] for p in pairs]
        try:
            measured = replace(
                measured,
                pixel_auroc=metrics.pixel_auroc(pm, mp),
                aupro=metrics.aupro(pm, mp, 0.3),
                pixel_metric_images=len(pairs),
            )
        except ValueError as exc:
            notes.append(f"pixel metrics not computed: {exc}")
    return measured, notes


def _pixel_candidate(sample: datasets.Sample) -> bool:
    return sample.mask is not None or not sample.is_anomalous


def _payload(det: PatchCore, scored: ScoredSet, measured: metrics.Metrics) -> dict[str, Any]:
    """What ``metrics.json`` holds (JSON-ready)."""
    test, scores = scored.data, scored.scores
    ok = np.isfinite(scores)
    return _jsonable(
        {
            "metrics": measured.as_dict(),
            "data": det.metadata_.get("calibration_data"),
            "threshold": measured.threshold,
            "threshold_method": det.threshold_method_,
            "num_scored": int(ok.sum()),
            "scored_names": [n for n, good in zip(test.names, ok, strict=True) if good],
            "skipped": [{"path": p, "problem": r} for p, r in scored.skipped],
            "scores": {
                n: float(s) for n, s in zip(test.names, scores, strict=True) if np.isfinite(s)
            },
            "seconds": scored.seconds,
            "ms_per_image": scored.ms_per_image,
            "model": model_card(det, scored.ms_per_image),
        }
    )


def evaluate_detector(
    det: PatchCore,
    test: ImageDataset,
    *,
    report_dir: str | os.PathLike | None = None,
    title: str = "PatchCore evaluation",
    calibration_names: Sequence[str] = (),
    gallery_size: int = GALLERY_SIZE,
    progress: ProgressFn | None = None,
    notes: Sequence[str] = (),
) -> Evaluation:
    """Score ``test``, compute metrics, optionally write ``metrics.json`` and the report.

    Unreadable images are left out of the metrics and listed. Pixel AUROC / AUPRO are computed
    when some anomalous image has a mask (see :func:`measure`).
    """
    from patchcore.apps.workflow.reporting import write_evaluation_report

    threshold = require_threshold(det, None)
    if set(calibration_names) & set(test.names):
        raise WorkflowError("evaluation images overlap the calibration images; refusing")
    pixel = any(s.is_anomalous and s.mask is not None for s in test)
    keep = [report_dir is not None or (pixel and _pixel_candidate(s)) for s in test]
    scored = score_set(det, test, keep, progress)
    if not np.isfinite(scored.scores).any():
        raise WorkflowError(f"none of the {len(test)} test images could be read")
    measured, more_notes = measure(det, scored, threshold)
    payload = _payload(det, scored, measured)
    report_path = metrics_path = None
    if report_dir is not None:
        out = Path(report_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        path = write_evaluation_report(
            det, scored, measured, out, title, gallery_size, [*more_notes, *notes]
        )
        report_path = str(path)
        metrics_path = str(out / "metrics.json")
        Path(metrics_path).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return Evaluation(
        metrics=payload,
        scored_names=list(payload["scored_names"]),
        calibration_names=list(calibration_names),
        report_path=report_path,
        metrics_path=metrics_path,
        skipped=scored.skipped,
        seconds=scored.seconds,
        ms_per_image=scored.ms_per_image,
        measured=measured,
    )


def evaluate_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    report_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: ProgressFn | None = None,
    total: ProgressFn | None = None,
) -> Evaluation:
    """Evaluate a calibrated model file on the held-out half of ``data`` stored in it."""
    det = load_model(model, device=device)
    require_threshold(det, model)
    source = resolve_data(data)
    test = held_out_images(det, source, model)
    if total:
        total(len(test))
    notes = []
    stored = det.metadata_.get("calibration_data")
    if stored and stored != source.spec:
        notes.append(f"calibrated on {stored}; held-out images looked up in {source.spec}")
    return evaluate_detector(
        det,
        test,
        report_dir=report_dir,
        title=f"PatchCore evaluation: {short_spec(source.spec)}",
        calibration_names=det.metadata_.get("calibration_names") or [],
        progress=progress,
        notes=notes,
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x
