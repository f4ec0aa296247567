"""Demo: the whole reference workflow on the ELPV solar cells of the ``elpv-dataset`` package."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patchcore.apps.workflow.calibrate import CalibrationSummary, calibrate_detector
from patchcore.apps.workflow.data import (
    ELPV,
    ProgressFn,
    WorkflowError,
    elpv_cells,
    limit_per_label,
    resolve_data,
)
from patchcore.apps.workflow.evaluate import Evaluation, evaluate_detector
from patchcore.apps.workflow.files import check_folder_target
from patchcore.apps.workflow.fit import FitSummary, fit_detector, fit_summary
from patchcore.core import datasets
from patchcore.lean.util import check_fraction


@dataclass
class DemoResult:
    """What :func:`run_demo` did."""

    out_dir: str
    model_path: str
    fit: FitSummary
    calibration: CalibrationSummary
    evaluation: Evaluation
    timings: dict[str, float]


def run_demo(
    out_dir: str | os.PathLike = "patchcore-demo",
    *,
    cell_type: str = "mono",
    train_fraction: float = 0.5,
    calibration_fraction: float = 0.5,
    image_size: int | None = 160,
    coreset_ratio: float = 0.01,
    backbone: str = "efficientnet-lite2",
    method: str = "max_f1",
    seed: int = 0,
    limit: int | None = None,
    device: str = "auto",
    fit_progress: bool = True,
    progress: ProgressFn | None = None,
    stage: Callable[[str, int], None] | None = None,
    force: bool = False,
) -> DemoResult:
    """The whole reference workflow on the ELPV solar cells.

    Normal = defect probability 0, anomalous = 1.0 (the uncertain cells are left out). A seeded
    ``train_fraction`` of the normal cells is fitted on; the other normal cells and all
    defective ones form the test pool, split per label into a calibration part (threshold) and
    a held-out part (metrics, report). Everything is written to ``out_dir``: ``model.pt``,
    ``metrics.json``, ``report.html`` and its PNGs, as a new folder swapped in at the end
    (:func:`~patchcore.apps.workflow.files.new_folder`; ``force``: write into an existing
    folder that patchcore did not write).

    Args:
        limit: use at most this many normal and this many defective cells (quick runs).
        stage: called with a stage name and its number of images before each stage.
    """
    check_fraction("train fraction", train_fraction, error=WorkflowError)
    if limit is not None and limit < 4:
        raise WorkflowError(f"limit must be at least 4 images per label, got {limit}")
    out = check_folder_target(Path(out_dir).resolve(), force=force)  # before any work
    source = resolve_data(f"{ELPV}:{cell_type}")
    cells = limit_per_label(elpv_cells(source), limit, seed)
    normals = cells.subset(cells.labels == datasets.NORMAL)
    train, pool = datasets.normal_train_split(cells, train_fraction, seed=seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if stage:
        stage("fit", len(train))
    params = {"backbone": backbone, "image_size": image_size, "scale": None}
    params.update({"coreset_ratio": coreset_ratio, "seed": seed, "device": device})
    det = fit_detector(train, progress=fit_progress, data_spec=source.spec, **params)
    det.metadata_.update(train_fraction=float(train_fraction), train_seed=int(seed))
    timings["fit"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    cal, calib, test = calibrate_detector(
        det,
        pool,
        method=method,
        calibration_fraction=calibration_fraction,
        seed=seed,
        data_spec=source.spec,
        progress=progress,
        total=(lambda n: stage("calibrate", n)) if stage else None,
    )
    timings["calibrate"] = time.perf_counter() - t1
    model_path = out / "model.pt"
    cal.model_path = str(model_path)
    t2 = time.perf_counter()
    if stage:
        stage("evaluate", len(test))
    limited = f"; limited to {limit} cells per label" if limit else ""
    evaluation = evaluate_detector(
        det,
        test,
        report_dir=out,
        title=f"PatchCore demo: ELPV solar cells ({cell_type})",
        calibration_names=calib.names,
        progress=progress,
        force=force,
        also_write=lambda folder: det.save(folder / model_path.name),
        notes=[
            f"Data: elpv-dataset {cell_type} cells; normal = defect probability 0, anomalous = "
            f"1.0, uncertain cells left out; {len(train)} of {len(normals)} normal cells "
            f"(fraction {train_fraction:g}) fitted on{limited}.",
        ],
    )
    timings["evaluate"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    fit = fit_summary(det, model_path, source.spec, len(normals))
    return DemoResult(str(out), str(model_path), fit, cal, evaluation, timings)
