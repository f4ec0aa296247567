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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps.workflow.data import (
    DataSource,
    ProgressFn,
    WorkflowError,
    resolve_data,
    short_spec,
    stored_images,
)
from patchcore.apps.workflow.files import check_folder_target, new_folder
from patchcore.apps.workflow.leakage import leave_out_training
from patchcore.apps.workflow.model import (
    entry_text,
    load_model,
    model_card,
    require_threshold,
    split_entry,
    threshold_history,
)
from patchcore.apps.workflow.reporting import write_evaluation_report
from patchcore.apps.workflow.scoring import ScoredSet, score_set
from patchcore.core import datasets, metrics
from patchcore.core.datasets import ImageDataset
from patchcore.core.detector import PatchCore
from patchcore.lean.record import ANOMALOUS, judge

#: Gallery tiles per group (true/false positives/negatives).
GALLERY_SIZE = 6


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
    warnings: list[str] = field(default_factory=list)
    split: str = ""


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
    test = stored_images(det, source, names, "held-out test images")
    overlap = set(test.names) & set(det.metadata_.get("calibration_names") or [])
    if overlap:  # cannot happen with files written by calibrate; refuse rather than leak
        raise WorkflowError(
            f"{len(overlap)} held-out images are also calibration images; recalibrate the model"
        )
    return test


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
        metrics.evaluate(judge(scores[ok], threshold) == ANOMALOUS, truth[ok], types[ok].tolist())
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
    force: bool = False,
    also_write: Callable[[Path], Any] | None = None,
    warnings: Sequence[str] = (),
) -> Evaluation:
    """Score ``test``, compute metrics, optionally write ``metrics.json`` and the report.

    Unreadable images are left out of the metrics and listed. Pixel AUROC / AUPRO are computed
    when some anomalous image has a mask (see :func:`measure`).

    The report folder is written whole as a new folder and then swapped in
    (:func:`~patchcore.apps.workflow.files.new_folder`: an existing folder that patchcore did
    not write is refused unless ``force``); ``also_write(folder)`` adds files to it first.
    ``warnings`` (about ``test``) go to the report's warnings box and the result.
    """
    threshold = require_threshold(det, None)
    if set(calibration_names) & set(test.names):
        raise WorkflowError("evaluation images overlap the calibration images; refusing")
    if report_dir is not None:
        check_folder_target(report_dir, force=force)  # before any scoring
    pixel = any(s.is_anomalous and s.mask is not None for s in test)
    keep = [report_dir is not None or (pixel and _pixel_candidate(s)) for s in test]
    scored = score_set(det, test, keep, progress)
    if not np.isfinite(scored.scores).any():
        raise WorkflowError(f"none of the {len(test)} test images could be read")
    measured, more_notes = measure(det, scored, threshold)
    payload = _payload(det, scored, measured)
    report_path = metrics_path = None
    if report_dir is not None:
        final = Path(report_dir).resolve()
        with new_folder(final, force=force) as out:
            if also_write is not None:
                also_write(out)
            write_evaluation_report(
                det, scored, measured, out, title, gallery_size, [*more_notes, *notes],
                warnings=warnings,
            )  # fmt: skip
            (out / "metrics.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
        report_path, metrics_path = str(final / "report.html"), str(final / "metrics.json")
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
        warnings=list(warnings),
    )


def evaluate_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    report_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: ProgressFn | None = None,
    total: ProgressFn | None = None,
    force: bool = False,
    strict: bool = False,
) -> Evaluation:
    """Evaluate a calibrated model file on the held-out half of ``data`` stored in it
    (``report_dir``, ``force``: see :func:`evaluate_detector`).

    Images the model was fitted on (an update may have added some after calibration) are left
    out (:func:`~patchcore.apps.workflow.leakage.leave_out_training`; ``strict``: an error).
    """
    if report_dir is not None:
        check_folder_target(report_dir, force=force)  # before loading and scoring
    det = load_model(model, device=device)
    require_threshold(det, model)
    source = resolve_data(data)
    test = held_out_images(det, source, model)
    test, warnings = leave_out_training(det, source, test, what="held-out test", strict=strict)
    if not len(test):
        raise WorkflowError(
            f"{model}: every held-out test image is a training image; calibrate again"
        )
    if total:
        total(len(test))
    split = split_text(det)
    notes = [f"Scored: {split}."]
    stored = det.metadata_.get("calibration_data")
    if stored and stored != source.spec:
        notes.append(f"calibrated on {stored}; held-out images looked up in {source.spec}")
    ev = evaluate_detector(
        det,
        test,
        report_dir=report_dir,
        title=f"PatchCore evaluation: {short_spec(source.spec)}",
        calibration_names=det.metadata_.get("calibration_names") or [],
        progress=progress,
        notes=notes,
        force=force,
        warnings=warnings,
    )
    return replace(ev, split=split)


def split_text(det: PatchCore) -> str:
    """Which calibration's held-out split ``evaluate`` scores, in words (the split stored by
    the last calibration that chose a threshold on a split of the data)."""
    entry, history = split_entry(det), threshold_history(det)
    if entry is None:
        return "the held-out split stored at calibration (before the threshold history existed)"
    text = f"the held-out split of the calibration {entry_text(entry)}"
    if history and history[-1] is not entry:
        text += f"; the threshold in use came after it: {entry_text(history[-1])}"
    else:
        text += ", the threshold in use"
    return text


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
