"""Fit with the ``auto`` preset: choose the configuration on the calibration half, keep the
other half for ``evaluate``.

The labelled images (those not fitted on) are split per label exactly as ``calibrate`` splits
them (:func:`~patchcore.apps.workflow.data.split_for_calibration`, same fraction and seed);
every candidate of :data:`patchcore.core.autoselect.CANDIDATES` is fitted on the training
images and judged by image AUROC on the calibration half; the chosen model's threshold is then
calibrated on that same half and the split stored, so ``evaluate`` scores only images that took
no part in the choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchcore.apps.workflow.calibrate import CalibrationSummary, calibrate_detector
from patchcore.apps.workflow.data import (
    WorkflowError,
    available_train_images,
    labelled_images,
    resolve_data,
    split_for_calibration,
)
from patchcore.apps.workflow.files import MODEL, check_target
from patchcore.apps.workflow.fit import FitSummary, fit_summary
from patchcore.core import datasets
from patchcore.core.autoselect import CandidateResult, auto_select
from patchcore.core.inputs import input_name
from patchcore.lean.util import check_fraction, package_version

__all__ = ["AUTO_CHOSEN", "AutoFitSummary", "fit_auto_model"]

AUTO_CHOSEN = ("backbone", "layers", "scale", "image_size", "augment", "top_k")
"""Parameters the candidates set: not to be given with the ``auto`` preset."""


@dataclass
class AutoFitSummary:
    """What :func:`fit_auto_model` did: the chosen model's fit, every candidate, calibration."""

    fit: FitSummary
    chosen: str
    candidates: list[CandidateResult]
    seconds: float
    budget_seconds: float | None
    calibration: CalibrationSummary


def fit_auto_model(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    budget_minutes: float | None = None,
    train_fraction: float = 1.0,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    force: bool = False,
    report: Callable[[str], None] | None = None,
    **params: Any,
) -> AutoFitSummary:
    """Choose among the auto preset's candidates on ``data``'s calibration half, calibrate the
    chosen model's threshold there and save it to ``out`` (the held-out half is stored for
    ``evaluate``).

    Args:
        data: a data spec with normal training images and labelled test images.
        out: model file to write.
        budget_minutes: time box of the choice (``None``: every candidate).
        train_fraction: seeded share of the training images fitted on (ELPV: its normal
            cells, so that some are left for the split).
        calibration_fraction: share of each label used to choose and calibrate.
        seed: seeds the split and every candidate's coreset.
        force: replace ``out`` even when it is not a model file.
        report: called with a line of text as each candidate starts and ends.
        **params: other PatchCore settings for every candidate (``coreset_ratio``,
            ``device``, ``progress``...); none of :data:`AUTO_CHOSEN`.

    Raises:
        WorkflowError: a parameter the candidates set, no labelled images of both kinds, or a
            split without both labels.
    """
    clash = sorted(k for k in AUTO_CHOSEN if params.get(k) is not None)
    if clash:
        raise WorkflowError(
            f"the auto preset chooses {', '.join(clash)} itself; leave out those settings or "
            "pick a named preset"
        )
    check_fraction("train fraction", train_fraction, error=WorkflowError)
    check_target(out, MODEL, force=force)
    source = resolve_data(data)
    available = available_train_images(source)
    train = datasets.sample_fraction(available, train_fraction, seed=seed)
    used = set(train.names)
    labelled = labelled_images(source)
    pool = labelled.subset(np.array([n not in used for n in labelled.names], dtype=bool))
    calib, _ = split_for_calibration(pool, calibration_fraction, seed, source.spec)
    try:
        sel = auto_select(
            train,
            calib,
            calib.labels,
            budget_seconds=None if budget_minutes is None else 60.0 * budget_minutes,
            report=report,
            seed=seed,
            **params,
        )
    except ValueError as exc:
        raise WorkflowError(str(exc)) from None
    det = sel.detector
    skipped = {name for name, _ in det.skipped_}
    det.metadata_ = {
        "patchcore_version": package_version(),
        "fit_data": source.spec,
        "train_names": [
            s.name for i, s in enumerate(train) if input_name(s.image, i) not in skipped
        ],
        "train_fraction": float(train_fraction),
        "train_seed": int(seed),
        "auto_preset": sel.record(),
    }
    cal, chosen_on, _ = calibrate_detector(
        det, pool, calibration_fraction=calibration_fraction, seed=seed, data_spec=source.spec
    )
    if chosen_on.names != calib.names:  # the threshold's half must be the choice's half
        raise RuntimeError("the calibration split is not the one the candidates were judged on")
    path = det.save(out)
    cal.model_path = str(path)
    return AutoFitSummary(
        fit=fit_summary(det, path, source.spec, len(available)),
        chosen=sel.chosen,
        candidates=sel.candidates,
        seconds=sel.seconds,
        budget_seconds=sel.budget_seconds,
        calibration=cal,
    )
