"""Fit: a detector on (a seeded fraction of) the normal training images, saved to a file."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchcore.apps.workflow.data import WorkflowError, available_train_images, resolve_data
from patchcore.apps.workflow.files import MODEL, check_target
from patchcore.core import datasets
from patchcore.core.datasets import ImageDataset
from patchcore.core.detector import PatchCore
from patchcore.core.inputs import input_name
from patchcore.lean.util import check_fraction, package_version


@dataclass
class FitSummary:
    """What :func:`fit_model` did."""

    model_path: str
    data: str
    available_images: int
    training_images: int
    bank_size: int
    feature_dim: int
    train_patches: int
    seconds: float
    feature_seconds: float
    coreset_seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)
    distributed: dict[str, Any] = field(default_factory=dict)  # a Ray fit: workers, radius


def fit_detector(
    train: ImageDataset,
    *,
    progress: bool = True,
    data_spec: str = "",
    ray: dict[str, Any] | None = None,
    **params: Any,
) -> PatchCore:
    """Fit a detector on the (normal) images of ``train``; unreadable images are skipped.

    With neither ``image_size`` nor ``scale``, images keep their native resolution (measured
    best across the real sets, see benchmarks/RESULTS.md); ``scale=0.4`` is the reference's
    ``imresize(..., 0.4)``. The training names and data spec go to ``metadata_``. Skipped
    images are listed in ``skipped_`` (the detector also warns about them).

    Args:
        train: the training images.
        progress: show the detector's progress bars while fitting.
        data_spec: stored as ``fit_data``.
        ray: fit on Ray workers instead (:func:`patchcore.scale.fit_distributed`'s
            ``workers``, ``address``...); its workers and coverage radius go to ``metadata_``
            as ``distributed_fit``.
        **params: :class:`~patchcore.core.detector.PatchCore` parameters (``backbone``,
            ``layers``, ``image_size``, ``scale``, ``coreset_ratio``, ``sampling``, ``seed``,
            ``device``, ``backbone_dtype``...); the detector's defaults for the others.

    Raises:
        WorkflowError: bad parameters or no readable image.
        TypeError: a name that is not a PatchCore parameter.
    """
    if params.get("layers") is not None:
        params["layers"] = list(params["layers"]) or None
    det = PatchCore(**params)
    distributed: dict[str, Any] = {}
    try:
        if ray is None:
            det.fit(train, on_error="skip", progress=progress)
        else:
            from patchcore.scale import fit_distributed

            fit = fit_distributed(train, **ray, **params)
            det = fit.detector
            distributed = {
                "workers": len(fit.shard_rows),
                "coverage_radius": (
                    fit.coverage_radius if math.isfinite(fit.coverage_radius) else None
                ),
                "shard_patches": fit.shard_rows,
            }
    except ValueError as exc:  # no readable image, unknown layer...
        raise WorkflowError(str(exc)) from None
    skipped = {name for name, _ in det.skipped_}
    used = [s.name for i, s in enumerate(train) if input_name(s.image, i) not in skipped]
    det.metadata_ = {
        "patchcore_version": package_version(),
        "fit_data": data_spec,
        "train_names": used,
    }
    if distributed:
        det.metadata_["distributed_fit"] = distributed
    return det


def fit_model(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    train_fraction: float = 1.0,
    seed: int = 0,
    force: bool = False,
    **params: Any,
) -> FitSummary:
    """Fit on ``data``'s normal training images and save the model to ``out``.

    Args:
        data: a data spec (see :func:`~patchcore.apps.workflow.resolve_data`).
        out: model file to write.
        train_fraction: seeded share of the training images used, in (0, 1]; default all
            (the reference workflow's 0.2 saved memory that the float16 feature store and the
            linear-time coreset no longer need).
        seed: seeds the training subset and the coreset.
        force: replace ``out`` even when it is not a model file.
        **params: detector settings for :func:`fit_detector`.

    Raises:
        WorkflowError: ``out`` is an existing file that is not a model file (and not
            ``force``), or cannot be written: before any image is read.
    """
    check_fraction("train fraction", train_fraction, error=WorkflowError)
    check_target(out, MODEL, force=force)
    source = resolve_data(data)
    available = available_train_images(source)
    train = datasets.sample_fraction(available, train_fraction, seed=seed)
    det = fit_detector(train, seed=seed, data_spec=source.spec, **params)
    det.metadata_.update(train_fraction=float(train_fraction), train_seed=int(seed))
    path = det.save(out)
    return fit_summary(det, path, source.spec, len(available))


def fit_summary(det: PatchCore, path: Path | None, spec: str, available: int) -> FitSummary:
    """A :class:`FitSummary` of a fitted detector."""
    return FitSummary(
        model_path=str(path) if path is not None else "",
        data=spec,
        available_images=available,
        training_images=int(det.n_train_images_),
        bank_size=int(det.memory_bank_.shape[0]),
        feature_dim=int(det.memory_bank_.shape[1]),
        train_patches=int(det.n_train_patches_),
        seconds=float(det.fit_seconds_),
        feature_seconds=float(det.feature_seconds_),
        coreset_seconds=float(det.coreset_seconds_),
        skipped=list(det.skipped_),
        card=det.card(),
        distributed=dict(det.metadata_.get("distributed_fit") or {}),
    )
