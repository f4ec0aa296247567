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

Names are imported on first use (as :mod:`patchcore` does), so that ``patchcore --help`` and
the commands that need no estimator start without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each public name and the module of this package that defines it.
_EXPORTS = {
    "AutoFitSummary": "auto",
    "fit_auto_model": "auto",
    "DISPLAY_TOP": "model",
    "ELPV": "data",
    "EXPLAIN_FIELDS": "explain",
    "REGION_SUFFIXES": "predict",
    "GALLERY_SIZE": "evaluate",
    "PIXEL_METRIC_SIDE": "scoring",
    "TILE_HEIGHT": "reporting",
    "CalibrationSummary": "calibrate",
    "DataSource": "data",
    "DemoResult": "demo",
    "Evaluation": "evaluate",
    "ExplainedImage": "explain",
    "FitSummary": "fit",
    "ModelChangedError": "files",
    "NormalCalibrationSummary": "calibrate",
    "RegionCalibration": "regions",
    "UpdateSummary": "update",
    "ProgressFn": "data",
    "WorkflowError": "data",
    "available_train_images": "data",
    "calibrate_detector": "calibrate",
    "calibrate_model": "calibrate",
    "calibrate_normal_model": "calibrate",
    "calibrate_regions_model": "regions",
    "check_target": "files",
    "check_writable_folder": "files",
    "display_range": "model",
    "evaluate_detector": "evaluate",
    "evaluate_model": "evaluate",
    "expand_inputs": "data",
    "explain_images": "explain",
    "explanation_picture": "explain",
    "fit_detector": "fit",
    "fit_model": "fit",
    "held_out_images": "evaluate",
    "held_out_normals": "calibrate",
    "HEATMAP_LAYOUTS": "predict",
    "inspect_files": "predict",
    "labelled_images": "data",
    "load_model": "model",
    "model_card": "model",
    "model_transaction": "files",
    "picture_name": "predict",
    "regions_file": "predict",
    "require_threshold": "model",
    "entry_text": "model",
    "split_entry": "model",
    "replaced_warning": "model",
    "threshold_history": "model",
    "resolve_data": "data",
    "run_demo": "demo",
    "update_model": "update",
    "write_picture": "predict",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
