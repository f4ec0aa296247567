"""Calibrate: split labelled images per label, choose the threshold on the calibration part;
or, with normal images only, a split-conformal threshold for a requested false-alarm rate.

The split (names), the data spec and the heatmap display range are stored in the model's
``metadata_`` so that ``evaluate`` scores exactly the held-out part.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from patchcore.apps.workflow.data import (
    DataSource,
    ProgressFn,
    WorkflowError,
    available_train_images,
    labelled_images,
    resolve_data,
    split_for_calibration,
)
from patchcore.apps.workflow.files import model_transaction
from patchcore.apps.workflow.leakage import leave_out_training
from patchcore.apps.workflow.model import load_model
from patchcore.core import metrics
from patchcore.core.calibration import map_summary
from patchcore.core.conformal import TooFewNormalImagesError, normal_images_needed
from patchcore.core.datasets import ImageDataset
from patchcore.core.detector import PatchCore
from patchcore.lean.record import ANOMALOUS, judge
from patchcore.lean.util import check_fraction


@dataclass
class CalibrationSummary:
    """What :func:`calibrate_model` did."""

    model_path: str
    data: str
    threshold: float
    method: str
    max_fpr: float | None
    calibration_images: int
    calibration_normal: int
    calibration_anomalous: int
    test_images: int
    test_normal: int
    test_anomalous: int
    display_range: tuple[float, float]
    calibration_metrics: metrics.Metrics
    seconds: float
    ms_per_image: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    training_left_out: int = 0
    replaced: dict[str, Any] | None = None
    entry: dict[str, Any] | None = None


#: A threshold that flags more than this share of the normal calibration images is degenerate.
MAX_NORMAL_FLAGGED = 0.5
#: Calibration AUROC below this: the scores barely separate normal from defective images.
MIN_USEFUL_AUROC = 0.65


#: What to try against a degenerate threshold when nothing is known about the model.
GENERIC_TIPS = (
    "try native resolution (no --scale/--image-size), all training images "
    "(--train-fraction 1), or a larger --coreset-ratio, then calibrate again"
)


def settings_tips(det: PatchCore) -> str:
    """What to try against a degenerate threshold: only the settings of ``det`` that differ
    from the defaults measured best (native size, every training image, a bank of at least
    1 % of the patches, the top-10 score), else a better backbone or more training images."""
    tips = []
    if det.scale is not None or det.image_size is not None:
        tips.append("native resolution (no --scale/--image-size)")
    if float(det.metadata_.get("train_fraction", 1.0)) < 1.0:
        tips.append("all training images (--train-fraction 1)")
    if det.coreset_ratio < 0.01:
        tips.append("a larger --coreset-ratio (0.01)")
    if det.top_k == 1:
        tips.append("the top-10 score (--top-k 10)")
    if not tips:
        tips.append("more (and more varied) normal training images or --preset accurate")
    listed = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + " or " + tips[-1]
    return f"try {listed}, then fit and calibrate again"


def threshold_warnings(
    scores: np.ndarray, labels: np.ndarray, threshold: float, tips: str = GENERIC_TIPS
) -> list[str]:
    """Plain-language warnings about a degenerate threshold, each with what to try.

    Args:
        scores: (N,) finite calibration scores. labels: (N,) 1 = anomalous.
        threshold: the chosen threshold.
        tips: what to try (:func:`settings_tips` of the model).
    """
    out: list[str] = []
    normal = scores[labels == 0]
    flagged = float((judge(normal, threshold) == ANOMALOUS).mean()) if normal.size else 0.0
    area = metrics.auroc(labels, scores)
    if flagged > MAX_NORMAL_FLAGGED:
        out.append(
            f"the threshold flags {flagged:.0%} of the normal calibration images as defective: "
            f"it would stop the line on most good parts; {tips}"
        )
    if area < MIN_USEFUL_AUROC:
        out.append(
            f"calibration AUROC is {area:.2f} (0.5 = chance): the scores barely separate normal "
            f"from defective images, so no threshold works well; {tips}"
        )
    return out


def _check_settings(method: str, max_fpr: float | None, fraction: float) -> None:
    if method not in metrics.THRESHOLD_METHODS:
        raise WorkflowError(
            f"unknown threshold method {method!r}; "
            f"use one of {', '.join(metrics.THRESHOLD_METHODS)}"
        )
    if max_fpr is not None and not 0.0 <= max_fpr <= 1.0:
        raise WorkflowError(f"max FPR must be in [0, 1], got {max_fpr!r}")
    check_fraction(
        "calibration fraction (the rest is held out)",
        fraction,
        allow_one=False,
        error=WorkflowError,
    )


@dataclass
class CalibrationPass:
    """One scoring pass over calibration images: scores (NaN where skipped), each anomaly
    map's (min, max) and statistic (the ``map_extremes`` and ``map_statistics`` of
    :meth:`PatchCore.calibrate`), the skipped images and the seconds it took."""

    scores: np.ndarray
    extremes: np.ndarray
    map_stats: np.ndarray
    skipped: list[tuple[str, str]]
    seconds: float


def _score_for_calibration(
    det: PatchCore, calib: ImageDataset, progress: ProgressFn | None, total: ProgressFn | None
) -> CalibrationPass:
    """The :class:`CalibrationPass` of ``calib`` (``total`` is told the number of images
    first). Maps are asked at the processed size: only their extremes and statistics are kept."""
    if total:
        total(len(calib))
    t0 = time.perf_counter()
    scores = np.full(len(calib), np.nan)
    extremes = np.full((len(calib), 2), np.nan)
    skipped: list[tuple[str, str]] = []
    map_stats = np.full(len(calib), np.nan)
    for r in det.iter_score(calib.images, maps="processed", on_error="skip", progress=False):
        scores[r.index] = r.score
        if r.map is not None:
            lo, hi, map_stats[r.index] = map_summary(r.map)
            extremes[r.index] = (lo, hi)
        if r.error is not None:
            skipped.append((r.name, r.error))
        if progress:
            progress(1)
    return CalibrationPass(scores, extremes, map_stats, skipped, time.perf_counter() - t0)


def history_facts(det: PatchCore) -> dict[str, Any]:
    """The summary fields of the threshold just installed: ``entry``, its history entry, and
    ``replaced``, the entry of the threshold it replaced (None: it replaced none)."""
    history = det.threshold_history_
    before = dict(history[-1].get("replaced") or {}) if history else {}
    if len(history) > 1:
        before = dict(history[-2])
    return {
        "entry": dict(history[-1]) if history else None,
        "replaced": before if before.get("value") is not None else None,
    }


def calibrate_detector(
    det: PatchCore,
    pool: ImageDataset,
    *,
    method: str = "max_f1",
    max_fpr: float | None = None,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    data_spec: str = "",
    progress: ProgressFn | None = None,
    total: ProgressFn | None = None,
    warnings: Sequence[str] = (),
) -> tuple[CalibrationSummary, ImageDataset, ImageDataset]:
    """Split ``pool`` per label, choose the threshold on the calibration part.

    Sets ``det.threshold_`` and stores the split (names), the data spec and the heatmap display
    range (``[min, 0.7 * max]`` over the calibration maps) in ``det.metadata_``.

    Args:
        det: a fitted detector.
        pool: labelled images, none of them used for fitting.
        method: threshold method (see :data:`patchcore.core.metrics.THRESHOLD_METHODS`).
        max_fpr: optional bound on the calibration false positive rate.
        calibration_fraction: share of each label used for calibration, in (0, 1).
        seed: seeds the split.
        data_spec: stored as ``calibration_data``.
        progress: called with the number of images just scored.
        total: called once, after the checks, with the number of images to score.
        warnings: about ``pool`` (e.g. training images left out), recorded with the
            threshold before its own.

    Returns:
        (summary, calibration part, held-out test part).

    Raises:
        WorkflowError: a split without both labels, an empty held-out part, a bad method.
    """
    _check_settings(method, max_fpr, calibration_fraction)
    calib, test = split_for_calibration(pool, calibration_fraction, seed, data_spec)
    run = _score_for_calibration(det, calib, progress, total)
    scores, skipped, seconds = run.scores, run.skipped, run.seconds
    ok = np.isfinite(scores)
    y = calib.labels
    if len(set(y[ok].tolist())) < 2:
        raise WorkflowError(
            f"calibration needs readable normal and anomalous images; {len(skipped)} of "
            f"{len(calib)} could not be read"
        )
    try:  # the threshold calibrate will install, to record its warnings with it
        t = float(metrics.anomaly_threshold(y[ok], scores[ok], method=method, max_fpr=max_fpr))
    except ValueError as exc:
        raise WorkflowError(f"cannot choose a threshold: {exc}") from None
    warned = [*warnings, *threshold_warnings(scores[ok], y[ok], t, settings_tips(det))]
    context = {"data": data_spec, "seed": int(seed), "fraction": float(calibration_fraction),
               "split": True, "source": "calibrate", "warnings": warned}  # fmt: skip
    det.calibrate(
        calib.images, y, method=method, max_fpr=max_fpr, scores=scores,
        map_extremes=run.extremes, map_statistics=run.map_stats, context=context,
    )  # fmt: skip
    threshold = float(det.threshold_)  # type: ignore[arg-type]
    display = det.display_range_ or (math.nan, math.nan)  # chosen by calibrate
    ms = 1000.0 * seconds / max(1, len(calib))
    det.metadata_ = dict(det.metadata_)
    det.metadata_.update(
        calibration_data=data_spec,
        calibration_names=list(calib.names),
        test_names=list(test.names),
        calibration_fraction=float(calibration_fraction),
        calibration_seed=int(seed),
        calibration_method=method,
        calibration_max_fpr=None if max_fpr is None else float(max_fpr),
        display_range=list(display),
        calibration_skipped=[name for name, _ in skipped],
        ms_per_image=ms,
    )
    summary = CalibrationSummary(
        model_path="",
        data=data_spec,
        threshold=threshold,
        method=method,
        max_fpr=max_fpr,
        calibration_images=len(calib),
        calibration_normal=int((calib.labels == 0).sum()),
        calibration_anomalous=int(calib.labels.sum()),
        test_images=len(test),
        test_normal=int((test.labels == 0).sum()),
        test_anomalous=int(test.labels.sum()),
        display_range=display,
        calibration_metrics=metrics.Metrics.from_dict(
            metrics.evaluate(judge(scores[ok], threshold) == ANOMALOUS, y[ok])
        ),
        seconds=seconds,
        ms_per_image=ms,
        skipped=skipped,
        warnings=warned,
        **history_facts(det),
    )
    return summary, calib, test


def calibrate_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    device: str | None = None,
    progress: ProgressFn | None = None,
    total: ProgressFn | None = None,
    strict: bool = False,
    **settings: Any,
) -> CalibrationSummary:
    """Calibrate the threshold of a model file on ``data``'s labelled test images, in place.

    Args:
        model: the model file (rewritten with the threshold, split and display range).
        data: a data spec; images the model was fitted on are left out
            (:func:`~patchcore.apps.workflow.leakage.leave_out_training`: with a warning when
            they are not the fit's own training split).
        device: where to load the model (None: as saved).
        strict: a training image found in ``data`` by content is an error, not a warning.
        progress: called with the number of images just scored.
        total: called once with the number of images about to be scored.
        **settings: ``method``, ``max_fpr``, ``calibration_fraction``, ``seed``, as in
            :func:`calibrate_detector`.
    """
    with model_transaction(model) as transaction:
        det = load_model(model, device=device)
        source = resolve_data(data)
        labelled = labelled_images(source)
        pool, leaked = leave_out_training(det, source, labelled, what="labelled", strict=strict)
        summary, _, _ = calibrate_detector(
            det, pool, data_spec=source.spec, progress=progress, total=total, warnings=leaked,
            **settings,
        )  # fmt: skip
        summary.training_left_out = len(labelled) - len(pool)
        summary.model_path = str(transaction.save(det))
        return summary


@dataclass
class NormalCalibrationSummary:
    """What :func:`calibrate_normal_model` did (normal images only, split conformal)."""

    model_path: str
    data: str
    threshold: float
    max_fpr: float
    normal_images: int
    rank: int
    fpr_bounds: tuple[float, float]
    calibration_fpr: float
    images_needed: int
    fitting_images_left_out: int
    test_images: int
    display_range: tuple[float, float]
    seconds: float
    ms_per_image: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    replaced: dict[str, Any] | None = None
    entry: dict[str, Any] | None = None


def held_out_normals(
    det: PatchCore, source: DataSource, *, strict: bool = False
) -> tuple[ImageDataset, int, list[str]]:
    """``source``'s normal images that were not used to fit ``det``
    (:func:`~patchcore.apps.workflow.leakage.leave_out_training`: by the recorded training
    names in the fit's own data, by content anywhere).

    Returns:
        (the normal images, how many were left out as fitting images, warnings: fitting
        images found outside the fit's own data, and what could not be checked).

    Raises:
        WorkflowError: ``strict`` and a fitting image found by content.
    """
    normals = available_train_images(source)
    if not det.metadata_.get("train_names") and getattr(det, "train_digests_", None) is None:
        return (
            normals,
            0,
            [
                "the model records no training images (fitted outside `patchcore fit`?), so it "
                "cannot be checked that DATA's normal images were not used for fitting; fitting "
                "images score low and would make false alarms more frequent than asked"
            ],
        )
    pool, warnings = leave_out_training(det, source, normals, what="normal", strict=strict)
    return pool, len(normals) - len(pool), warnings


def _labelled_rest(source: DataSource, leave_out: set[str]) -> list[str]:
    """Names of ``source``'s labelled images outside ``leave_out`` (both labels), else []."""
    try:
        pool = labelled_images(source)
    except WorkflowError:
        return []
    names = [n for n in pool.names if n not in leave_out]
    labels = {int(y) for n, y in zip(pool.names, pool.labels, strict=True) if n not in leave_out}
    return names if labels == {0, 1} else []


def calibrate_normal_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    max_fpr: float,
    device: str | None = None,
    progress: ProgressFn | None = None,
    total: ProgressFn | None = None,
    strict: bool = False,
) -> NormalCalibrationSummary:
    """Choose a model file's threshold from ``data``'s normal images alone, in place.

    The calibration images are ``data``'s normal images (``DATA/train/good``, or a folder of
    normal images, or the ELPV normal cells) that the model was not fitted on, all of them
    (more images, a tighter rate); see :meth:`PatchCore.calibrate_normal` for the guarantee.
    ``data``'s labelled test images (if any) stay out and are stored as the held-out part
    for ``evaluate``.

    Raises:
        WorkflowError: a rate outside (0, 1), or fewer held-out normal images than the rate
            needs (the message gives the number).
    """
    if not 0.0 < max_fpr < 1.0:
        raise WorkflowError(f"max FPR must be in (0, 1) for --normal-only, got {max_fpr!r}")
    with model_transaction(model) as transaction:
        det = load_model(model, device=device)
        source = resolve_data(data)
        pool, left_out, warnings = held_out_normals(det, source, strict=strict)
        need = normal_images_needed(max_fpr)
        if len(pool) < need:
            raise WorkflowError(
                f"{source.spec}: a false-alarm rate of {max_fpr:g} needs at least {need} normal "
                f"images not used for fitting (n >= 1/rate - 1); it has {len(pool)} "
                f"({left_out} more were fitted on): add normal images, fit on fewer "
                f"(--train-fraction), or ask for a rate of at least {1 / (len(pool) + 1):.3g}"
            )
        run = _score_for_calibration(det, pool, progress, total)
        scores, skipped, seconds = run.scores, run.skipped, run.seconds
        ok = np.isfinite(scores)
        if int((~ok).sum()) > len(skipped):  # readable images scored NaN: fail closed
            raise WorkflowError(
                f"{int((~ok).sum()) - len(skipped)} readable normal images scored NaN or infinite: "
                "the model holds non-finite values; no threshold (fit it again)"
            )
        context = {"data": source.spec, "seed": None, "fraction": None, "split": True,
                   "source": "calibrate --normal-only", "warnings": warnings}  # fmt: skip
        try:
            det.calibrate_normal(
                None, max_fpr=max_fpr, scores=scores[ok], map_extremes=run.extremes[ok],
                map_statistics=run.map_stats[ok], context=context,
            )  # fmt: skip
        except TooFewNormalImagesError as exc:
            raise WorkflowError(f"{source.spec}: {len(skipped)} unreadable images; {exc}") from None
        c = det.calibration_ or {}
        calib_names = [n for n, good in zip(pool.names, ok, strict=True) if good]
        test_names = _labelled_rest(
            source, set(det.metadata_.get("train_names") or []) | set(pool.names)
        )
        display = det.display_range_ or (math.nan, math.nan)  # chosen by calibrate_normal
        ms = 1000.0 * seconds / max(1, len(pool))
        det.metadata_ = dict(det.metadata_)
        for k in ("calibration_fraction", "calibration_seed"):
            det.metadata_.pop(k, None)
        det.metadata_.update(
            calibration_data=source.spec,
            calibration_names=calib_names,
            test_names=test_names,
            calibration_method="conformal",
            calibration_max_fpr=float(max_fpr),
            display_range=list(display),
            calibration_skipped=[name for name, _ in skipped],
            ms_per_image=ms,
        )
        path = transaction.save(det)
        return NormalCalibrationSummary(
            model_path=str(path),
            data=source.spec,
            threshold=float(det.threshold_),  # type: ignore[arg-type]
            max_fpr=float(max_fpr),
            normal_images=int(c["n"]),
            rank=int(c["rank"]),
            fpr_bounds=(float(c["fpr_bounds"][0]), float(c["fpr_bounds"][1])),
            images_needed=need,
            fitting_images_left_out=left_out,
            test_images=len(test_names),
            calibration_fpr=float(c["calibration_fpr"]),
            display_range=display,
            seconds=seconds,
            ms_per_image=ms,
            skipped=skipped,
            warnings=warnings,
            **history_facts(det),
        )
