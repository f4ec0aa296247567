"""Calibrate regions: the map threshold of defect regions, chosen on images with masks.

Uses the calibration images that ``calibrate`` stored in the model (so ``evaluate``'s held-out
images stay unseen): the normal ones (empty masks) and the defective ones with a ground-truth
mask; defective images without a mask are left out (their defect pixels are unknown).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from patchcore.apps.workflow.data import ProgressFn, WorkflowError, resolve_data, stored_images
from patchcore.apps.workflow.files import model_transaction
from patchcore.apps.workflow.leakage import leave_out_training
from patchcore.apps.workflow.model import load_model
from patchcore.core import datasets


@dataclass
class RegionCalibration:
    """What :func:`calibrate_regions_model` did."""

    model_path: str
    region_threshold: float
    image_threshold: float | None
    method: str
    images: int
    normal: int
    with_masks: int
    left_out: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def calibrate_regions_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    method: str = "max_region_f1",
    device: str | None = None,
    progress: ProgressFn | None = None,
    total: ProgressFn | None = None,
    strict: bool = False,
) -> RegionCalibration:
    """Set the region threshold of a model file, chosen on its calibration images with
    ``method`` (see :meth:`patchcore.core.regions.RegionsMixin.calibrate_regions`).

    Images the model was fitted on are left out
    (:func:`~patchcore.apps.workflow.leakage.leave_out_training`; ``strict``: an error).

    Raises:
        WorkflowError: the model has no stored calibration split, ``data`` lacks its images,
            or none of them has a ground-truth mask.
    """
    with model_transaction(model) as transaction:
        det = load_model(model, device=device)
        names = det.metadata_.get("calibration_names")
        if not names:
            raise WorkflowError(
                f"{model}: no calibration split stored; run "
                f"`patchcore calibrate {model} DATA` first"
            )
        source = resolve_data(data)
        calib = stored_images(det, source, names, "calibration images")
        calib, warnings = leave_out_training(det, source, calib, what="calibration", strict=strict)
        kept = [s for s in calib if not s.is_anomalous or s.mask is not None]
        with_masks = sum(s.is_anomalous for s in kept)
        if with_masks == 0:
            raise WorkflowError(
                f"{source.spec}: none of the {len(calib)} calibration images has a ground-truth "
                "mask (DATA/ground_truth/<label>/<stem>_mask.png); without masks regions are cut "
                "at the image threshold"
            )
        if total:
            total(len(kept))
        t0 = time.perf_counter()
        masks = [datasets.load_mask(s) for s in kept]
        det.calibrate_regions([s.image for s in kept], masks, method=method, progress=False)
        seconds = time.perf_counter() - t0
        if progress:
            progress(len(kept))
        det.metadata_["region_calibration"] = {
            "data": source.spec,
            "images": len(kept),
            "with_masks": with_masks,
        }
        return RegionCalibration(
            model_path=str(transaction.save(det)),
            region_threshold=float(det.region_threshold_),  # type: ignore[arg-type]
            image_threshold=det.threshold_,
            method=str(det.state_.region_threshold_method),
            images=len(kept),
            normal=len(kept) - with_masks,
            with_masks=with_masks,
            left_out=len(calib) - len(kept),
            seconds=seconds,
            warnings=warnings,
        )
