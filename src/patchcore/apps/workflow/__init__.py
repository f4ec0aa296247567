"""The reference workflow as library calls: fit, calibrate, evaluate, predict, demo.

These are the steps MATLAB's "Localize Industrial Defects Using PatchCore Anomaly Detector"
example walks through, one function each, so that the command line (:mod:`patchcore.apps.cli`) only
parses arguments, calls one of them and prints what it returns. One module per stage:

- :mod:`.data`: data specs (:func:`resolve_data`), the images they hold and the splits.
- :mod:`.model`: loading a model file, the threshold check, the model card.
- :mod:`.auto`: :func:`fit_auto_model` fits the ``auto`` preset's candidates, keeps the best
  on the calibration half and calibrates there (the held-out half is stored for ``evaluate``).
- :mod:`.fit`: :func:`fit_model` fits a :class:`~patchcore.core.detector.PatchCore` on (a seeded
  fraction of) the normal training images and saves it.
- :mod:`.calibrate`: :func:`calibrate_model` splits the labelled test images per label into a
  calibration half and a held-out half, chooses the threshold on the calibration half and
  remembers the split and a common heatmap display range in the model file;
  :func:`calibrate_normal_model` chooses it from normal images alone (split conformal, a
  requested false-alarm rate), leaving every labelled image for ``evaluate``.
- :mod:`.evaluate`: :func:`evaluate_model` scores exactly the held-out half (never a
  calibration image), computes the metrics and writes ``metrics.json``;
  :mod:`.reporting` writes the HTML report.
- :mod:`.regions`: :func:`calibrate_regions_model` sets the map threshold of defect regions
  on the stored calibration images that have masks.
- :mod:`.predict`: :func:`inspect_files` streams one inspection record
  (:class:`patchcore.lean.record.Inspection`) per file with its heatmap picture;
  :func:`regions_file` writes the records' regions as JSON or CSV.
- :mod:`.demo`: :func:`run_demo`, all of the above on the solar cells of ``elpv-dataset``.
- :mod:`.update`: :func:`update_model` adds normal images to a model file (``partial_fit``).
- :mod:`.explain`: :func:`explain_images`, each image's record and its worst patch beside the
  nearest normal training patch.
- :mod:`.files`: every file written here is written whole or not at all, never over a file of
  another kind, and model files one update at a time (:func:`model_transaction`).

Every stage makes one call into the detector (``fit``, or one ``iter_score`` stream that also
drives the caller's progress callback) and asks for anomaly maps at the size it needs.

Data are named by a *data spec*: a folder (``DATA/train/good``, ``DATA/test/<label>``,
``DATA/ground_truth/<label>``, or just a folder of normal images for fitting) or
``elpv[:mono|poly|all]`` for the ELPV solar cells. What a model was fitted and calibrated on is
stored in ``PatchCore.metadata_`` (see :mod:`.model`).
"""

from __future__ import annotations

from patchcore.apps.workflow.auto import AutoFitSummary, fit_auto_model
from patchcore.apps.workflow.calibrate import (
    CalibrationSummary,
    NormalCalibrationSummary,
    calibrate_detector,
    calibrate_model,
    calibrate_normal_model,
    held_out_normals,
)
from patchcore.apps.workflow.data import (
    ELPV,
    DataSource,
    ProgressFn,
    WorkflowError,
    available_train_images,
    expand_inputs,
    labelled_images,
    resolve_data,
)
from patchcore.apps.workflow.demo import DemoResult, run_demo
from patchcore.apps.workflow.evaluate import (
    GALLERY_SIZE,
    Evaluation,
    evaluate_detector,
    evaluate_model,
    held_out_images,
)
from patchcore.apps.workflow.explain import (
    EXPLAIN_FIELDS,
    ExplainedImage,
    explain_images,
    explanation_picture,
)
from patchcore.apps.workflow.files import (
    ModelChangedError,
    check_target,
    check_writable_folder,
    model_transaction,
)
from patchcore.apps.workflow.fit import FitSummary, fit_detector, fit_model
from patchcore.apps.workflow.model import (
    DISPLAY_TOP,
    display_range,
    entry_text,
    load_model,
    model_card,
    replaced_warning,
    require_threshold,
    split_entry,
    threshold_history,
)
from patchcore.apps.workflow.predict import (
    HEATMAP_LAYOUTS,
    REGION_SUFFIXES,
    inspect_files,
    picture_name,
    regions_file,
    write_picture,
)
from patchcore.apps.workflow.regions import RegionCalibration, calibrate_regions_model
from patchcore.apps.workflow.reporting import TILE_HEIGHT
from patchcore.apps.workflow.scoring import PIXEL_METRIC_SIDE
from patchcore.apps.workflow.update import UpdateSummary, update_model

__all__ = [
    "DISPLAY_TOP",
    "ELPV",
    "EXPLAIN_FIELDS",
    "REGION_SUFFIXES",
    "GALLERY_SIZE",
    "PIXEL_METRIC_SIDE",
    "TILE_HEIGHT",
    "AutoFitSummary",
    "CalibrationSummary",
    "DataSource",
    "DemoResult",
    "Evaluation",
    "ExplainedImage",
    "FitSummary",
    "ModelChangedError",
    "NormalCalibrationSummary",
    "RegionCalibration",
    "UpdateSummary",
    "ProgressFn",
    "WorkflowError",
    "available_train_images",
    "calibrate_detector",
    "calibrate_model",
    "calibrate_normal_model",
    "calibrate_regions_model",
    "check_target",
    "check_writable_folder",
    "display_range",
    "evaluate_detector",
    "evaluate_model",
    "expand_inputs",
    "explain_images",
    "explanation_picture",
    "fit_auto_model",
    "fit_detector",
    "fit_model",
    "held_out_images",
    "held_out_normals",
    "HEATMAP_LAYOUTS",
    "inspect_files",
    "labelled_images",
    "load_model",
    "model_card",
    "model_transaction",
    "picture_name",
    "regions_file",
    "require_threshold",
    "entry_text",
    "split_entry",
    "replaced_warning",
    "threshold_history",
    "resolve_data",
    "run_demo",
    "update_model",
    "write_picture",
]
