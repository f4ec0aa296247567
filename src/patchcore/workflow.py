"""The reference workflow as library calls: fit, calibrate, evaluate, predict, demo.

These are the steps MATLAB's "Localize Industrial Defects Using PatchCore Anomaly Detector"
example walks through, one function each, so that the command line (:mod:`patchcore.cli`) only
parses arguments, calls one of them and prints what it returns:

1. :func:`fit_model`: fit a :class:`~patchcore.detector.PatchCore` on (a seeded fraction of) the
   normal training images and save it.
2. :func:`calibrate_model`: split the labelled test images per label into a calibration half
   and a held-out half, choose the threshold on the calibration half, remember the split and a
   common heatmap display range in the model file.
3. :func:`evaluate_model`: score exactly the held-out half (never a calibration image), compute
   the metrics and write ``metrics.json`` and the HTML report.
4. :func:`predict_images`: stream verdicts, scores and heatmap overlays for any images.
5. :func:`run_demo`: all of the above on the solar cells of the ``elpv-dataset`` package.

Data are named by a *data spec*: a folder (``DATA/train/good``, ``DATA/test/<label>``,
``DATA/ground_truth/<label>``, or just a folder of normal images for fitting) or
``elpv[:mono|poly|all]`` for the ELPV solar cells. What a model was fitted and calibrated on is
stored in ``PatchCore.metadata_`` (plain strings, lists and numbers):

=====================  ======================================================================
``fit_data``           data spec of the training images
``train_names``        names of the images the memory bank was built from
``calibration_data``   data spec of the labelled images that were split
``calibration_names``  names of the calibration half (threshold chosen on these)
``test_names``         names of the held-out half (the only images :func:`evaluate_model` scores)
``display_range``      ``[lo, hi]`` of the heatmap colours: ``[min, 0.7 * max]`` over the maps
                       of the calibration images, as in the reference example
=====================  ======================================================================
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets, metrics, plots, report
from ._util import check_fraction, package_version, resize_map
from .datasets import ImageDataset, Sample
from .detector import PatchCore
from .images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image

__all__ = [
    "CalibrationSummary",
    "DataSource",
    "DemoResult",
    "Evaluation",
    "FitSummary",
    "Prediction",
    "WorkflowError",
    "available_train_images",
    "calibrate_detector",
    "calibrate_model",
    "evaluate_detector",
    "evaluate_model",
    "expand_inputs",
    "fit_detector",
    "fit_model",
    "held_out_images",
    "labelled_images",
    "load_model",
    "model_card",
    "require_threshold",
    "predict_images",
    "resolve_data",
    "run_demo",
]

#: Images per call into the detector when streaming (bounds memory, drives progress).
CHUNK = 32
#: Gallery tiles per group (true/false positives/negatives).
GALLERY_SIZE = 6
#: Display range of the heatmap colours: [min, DISPLAY_TOP * max] over the calibration maps.
DISPLAY_TOP = 0.7
#: Longer side of the maps and masks pixel metrics are computed on (bounds memory).
PIXEL_METRIC_SIDE = 320
#: Height of the panels of a gallery tile, in pixels.
TILE_HEIGHT = 240
ELPV = "elpv"

ProgressFn = Callable[[int], None]


class WorkflowError(ValueError):
    """Bad input to a workflow step (missing folder, no images, model not calibrated...).

    The message is one line that says what is wrong and what to do.
    """


# ------------------------------------------------------------------------------ data sources


@dataclass(frozen=True)
class DataSource:
    """Where labelled images come from.

    Attributes:
        spec: the canonical data spec stored in model files: an absolute folder path, or
            ``"elpv:<cell type>"``.
        root: the folder (None for ELPV).
        cell_type: ELPV cell type (None for folders).
    """

    spec: str
    root: Path | None = None
    cell_type: str | None = None

    @property
    def is_elpv(self) -> bool:
        return self.cell_type is not None


def resolve_data(data: str | os.PathLike) -> DataSource:
    """Turn a user's data argument into a :class:`DataSource`.

    An existing folder wins; otherwise ``elpv``, ``elpv:mono``, ``elpv:poly`` or ``elpv:all``
    name the ELPV solar cells (``elpv`` = mono cells).

    Raises:
        WorkflowError: neither an existing folder nor an ELPV spec.
    """
    text = os.fspath(data)
    path = Path(text).expanduser()
    if path.is_dir():
        return DataSource(spec=str(path.resolve()), root=path.resolve())
    head, _, cell = text.partition(":")
    if head.lower() == ELPV and not path.exists():
        cell = (cell or "mono").lower()
        if cell not in ("mono", "poly", "all"):
            raise WorkflowError(
                f"{text}: unknown ELPV cell type {cell!r}; use elpv:mono, elpv:poly or elpv:all"
            )
        return DataSource(spec=f"{ELPV}:{cell}", cell_type=cell)
    if path.exists():
        raise WorkflowError(f"{path}: not a folder; DATA must be a data set folder")
    raise WorkflowError(f"{path}: no such folder")


def _elpv_all(source: DataSource) -> ImageDataset:
    try:
        return datasets.load_elpv(cell_type=source.cell_type)  # type: ignore[arg-type]
    except ModuleNotFoundError as exc:
        raise WorkflowError(str(exc)) from None


def available_train_images(source: DataSource) -> ImageDataset:
    """All normal images a model could be fitted on (before ``train_fraction``).

    Folders: ``DATA/train/good`` (any normal folder under ``DATA/train``), else images directly
    in ``DATA/train``, else images directly in ``DATA``. ELPV: all normal cells.
    """
    if source.is_elpv:
        ds = _elpv_all(source)
        return ds.subset(ds.labels == datasets.NORMAL)
    root = source.root
    assert root is not None
    train = root / "train"
    try:
        if train.is_dir():
            ds = datasets.load_folder(root, "train")
        elif list_images(root):
            ds = datasets.load_folder(root, None)
        else:
            raise WorkflowError(
                f"{root}: no training images: expected {root}/train/good/ with images "
                f"({', '.join(IMAGE_SUFFIXES)}) or a folder of normal images"
            )
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise WorkflowError(str(exc)) from None
    except ValueError as exc:
        if isinstance(exc, WorkflowError):
            raise
        raise WorkflowError(str(exc)) from None
    normal = ds.subset(ds.labels == datasets.NORMAL)
    if len(normal) == 0:
        raise WorkflowError(f"{root}: no normal training images (train/good) found")
    return normal


def labelled_images(source: DataSource) -> ImageDataset:
    """All labelled test images of a source (``DATA/test/<label>``, or ``DATA/<label>``).

    ELPV: every normal and defective cell (callers remove the training cells).
    """
    if source.is_elpv:
        return _elpv_all(source)
    root = source.root
    assert root is not None
    try:
        if (root / "test").is_dir():
            return datasets.load_folder(root, "test")
        return datasets.load_folder(root, None)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise WorkflowError(str(exc)) from None
    except ValueError as exc:
        raise WorkflowError(
            f"{root}: no labelled test images ({exc}); expected {root}/test/good/ and "
            f"{root}/test/<defect>/ folders"
        ) from None


def _limit_per_label(ds: ImageDataset, limit: int | None, seed: int) -> ImageDataset:
    """At most ``limit`` normal and ``limit`` anomalous samples (seeded choice, order kept)."""
    if limit is None:
        return ds
    keep = np.zeros(len(ds), dtype=bool)
    rng = np.random.default_rng(seed)
    for label in (datasets.NORMAL, datasets.ANOMALOUS):
        idx = np.flatnonzero(ds.labels == label)
        keep[rng.permutation(idx)[:limit]] = True
    return ds.subset(keep)


def _describe(ds: ImageDataset) -> str:
    n_anom = int(ds.labels.sum())
    return f"{len(ds)} images ({len(ds) - n_anom} normal, {n_anom} anomalous)"


# ------------------------------------------------------------------------------ model files


def load_model(path: str | os.PathLike, *, device: str | None = None) -> PatchCore:
    """Load a model file quietly (errors name the file; see :meth:`PatchCore.load`)."""
    det = PatchCore.load(path, device=device)
    det.progress = False
    return det


def require_threshold(det: PatchCore, model_path: str | os.PathLike | None) -> float:
    if det.threshold_ is None:
        where = f"{model_path}: " if model_path is not None else ""
        hint = f"patchcore calibrate {model_path} DATA" if model_path else "calibrate"
        raise WorkflowError(f"{where}threshold not calibrated yet; run `{hint}` first")
    return float(det.threshold_)


# ------------------------------------------------------------------------------ fit


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


def fit_detector(
    train: ImageDataset,
    *,
    backbone: str = "efficientnet-lite0",
    layers: Sequence[str] | None = None,
    image_size: int | None = None,
    scale: float | None = None,
    coreset_ratio: float = 0.1,
    sampling: str = "greedy",
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    data_spec: str = "",
    backbone_dtype: str = "float32",
) -> PatchCore:
    """Fit a detector on the (normal) images of ``train``; unreadable images are skipped.

    With neither ``image_size`` nor ``scale``, images keep their native resolution (measured
    best across the real sets, see benchmarks/RESULTS.md); ``scale=0.4`` is the reference's
    ``imresize(..., 0.4)``. The training names and data spec go to ``metadata_``.

    Raises:
        WorkflowError: bad parameters or no readable image.
    """
    det = PatchCore(
        backbone=backbone,
        layers=list(layers) if layers else None,
        image_size=image_size,
        scale=scale,
        coreset_ratio=coreset_ratio,
        sampling=sampling,
        seed=seed,
        device=device,
        progress=progress,
        backbone_dtype=backbone_dtype,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skipped images are returned instead
        try:
            det.fit(train, on_error="skip")
        except ValueError as exc:  # no readable image, unknown layer...
            raise WorkflowError(str(exc)) from None
    skipped = {path for path, _ in det.skipped_}
    used = [s.name for s in train if _sample_path(s) not in skipped]
    det.metadata_ = {
        "patchcore_version": package_version(),
        "fit_data": data_spec,
        "train_names": used,
    }
    det.progress = False
    return det


def _sample_path(sample: Sample) -> str:
    return str(sample.image) if isinstance(sample.image, Path) else sample.name


def fit_model(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    train_fraction: float = 0.2,
    seed: int = 0,
    **params: Any,
) -> FitSummary:
    """Fit on ``data``'s normal training images and save the model to ``out``.

    Args:
        data: a data spec (see :func:`resolve_data`).
        out: model file to write.
        train_fraction: seeded share of the training images used, in (0, 1].
        seed: seeds the training subset and the coreset.
        **params: detector settings for :func:`fit_detector`.
    """
    check_fraction("train fraction", train_fraction, error=WorkflowError)
    source = resolve_data(data)
    available = available_train_images(source)
    train = datasets.sample_fraction(available, train_fraction, seed=seed)
    det = fit_detector(train, seed=seed, data_spec=source.spec, **params)
    det.metadata_.update(train_fraction=float(train_fraction), train_seed=int(seed))
    path = det.save(out)
    return _fit_summary(det, path, source.spec, len(available))


def _fit_summary(det: PatchCore, path: Path | None, spec: str, available: int) -> FitSummary:
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
    )


# ------------------------------------------------------------------------------ scoring helpers


def _scores_and_maps(
    det: PatchCore, images: list[Any]
) -> tuple[np.ndarray, list[np.ndarray | None], list[tuple[str, str]]]:
    """Scores and anomaly maps of ``images`` in one pass (unreadable: NaN / None)."""
    r = det.score(images, maps="native", on_error="skip")
    return r.scores, list(r.maps or []), [(s.name, s.reason) for s in r.skipped]


def _scores(det: PatchCore, images: list[Any]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    r = det.score(images, on_error="skip")
    return r.scores, [(s.name, s.reason) for s in r.skipped]


def _chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ------------------------------------------------------------------------------ calibrate


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
) -> tuple[CalibrationSummary, ImageDataset, ImageDataset]:
    """Split ``pool`` per label, choose the threshold on the calibration part.

    Sets ``det.threshold_`` and stores the split (names), the data spec and the heatmap display
    range (``[min, 0.7 * max]`` over the calibration maps) in ``det.metadata_``.

    Args:
        det: a fitted detector.
        pool: labelled images, none of them used for fitting.
        method: threshold method (see :data:`patchcore.metrics.THRESHOLD_METHODS`).
        max_fpr: optional bound on the calibration false positive rate.
        calibration_fraction: share of each label used for calibration, in (0, 1).
        seed: seeds the split.
        data_spec: stored as ``calibration_data``.
        progress: called with the number of images just scored.
        total: called once, after the checks, with the number of images to score.

    Returns:
        (summary, calibration part, held-out test part).

    Raises:
        WorkflowError: a split without both labels, an empty held-out part, a bad method.
    """
    if method not in metrics.THRESHOLD_METHODS:
        raise WorkflowError(
            f"unknown threshold method {method!r}; "
            f"use one of {', '.join(metrics.THRESHOLD_METHODS)}"
        )
    if max_fpr is not None and not 0.0 <= max_fpr <= 1.0:
        raise WorkflowError(f"max FPR must be in [0, 1], got {max_fpr!r}")
    check_fraction(
        "calibration fraction (the rest is held out)",
        calibration_fraction,
        allow_one=False,
        error=WorkflowError,
    )
    counts = pool.counts()
    if int(pool.labels.sum()) == 0 or int((pool.labels == 0).sum()) == 0:
        raise WorkflowError(
            f"calibration needs normal and anomalous images; {data_spec or 'the data'} has "
            f"{_describe(pool)}"
        )
    calib, test = datasets.split_each_label(pool, calibration_fraction, seed=seed)
    for part, what in ((calib, "calibration"), (test, "held-out test")):
        if len(set(part.labels.tolist())) < 2:
            raise WorkflowError(
                f"the {what} part has {_describe(part)}: too few images per label "
                f"({', '.join(f'{k} {v}' for k, v in counts.items())}) for a "
                f"{calibration_fraction:g} split"
            )
    if total:
        total(len(calib))
    t0 = time.perf_counter()
    scores = np.full(len(calib), np.nan)
    lo, hi = math.inf, -math.inf
    skipped: list[tuple[str, str]] = []
    images = calib.images
    for sl in _chunks(len(calib)):
        s, maps, sk = _scores_and_maps(det, images[sl])
        scores[sl] = s
        skipped += sk
        for m in maps:
            if m is not None:
                lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
        if progress:
            progress(sl.stop - sl.start)
    seconds = time.perf_counter() - t0
    ok = np.isfinite(scores)
    y = calib.labels
    if len(set(y[ok].tolist())) < 2:
        raise WorkflowError(
            f"calibration needs readable normal and anomalous images; {len(skipped)} of "
            f"{len(calib)} could not be read"
        )
    try:
        det.calibrate(calib.images, y, method=method, max_fpr=max_fpr, scores=scores)
    except ValueError as exc:
        raise WorkflowError(f"cannot choose a threshold: {exc}") from None
    threshold = float(det.threshold_)  # type: ignore[arg-type]
    top = DISPLAY_TOP * hi
    display = (lo, top if top > lo else hi)
    det.metadata_ = dict(det.metadata_)
    det.metadata_.update(
        calibration_data=data_spec,
        calibration_names=list(calib.names),
        test_names=list(test.names),
        calibration_fraction=float(calibration_fraction),
        calibration_seed=int(seed),
        calibration_method=method,
        calibration_max_fpr=None if max_fpr is None else float(max_fpr),
        display_range=[float(display[0]), float(display[1])],
        calibration_skipped=[name for name, _ in skipped],
        ms_per_image=1000.0 * seconds / max(1, len(calib)),
    )
    cal_metrics = metrics.Metrics.from_dict(metrics.evaluate(scores[ok] >= threshold, y[ok]))
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
        display_range=(float(display[0]), float(display[1])),
        calibration_metrics=cal_metrics,
        seconds=seconds,
        ms_per_image=1000.0 * seconds / max(1, len(calib)),
        skipped=skipped,
    )
    return summary, calib, test


def _without_training_images(
    det: PatchCore, source: DataSource, pool: ImageDataset
) -> ImageDataset:
    """Drop images the model was fitted on (same data spec, same names)."""
    if det.metadata_.get("fit_data") != source.spec:
        return pool
    used = set(det.metadata_.get("train_names") or [])
    if not used:
        return pool
    return pool.subset(np.array([n not in used for n in pool.names], dtype=bool))


def calibrate_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    method: str = "max_f1",
    max_fpr: float | None = None,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    device: str | None = None,
    progress: ProgressFn | None = None,
    total: Callable[[int], None] | None = None,
) -> CalibrationSummary:
    """Calibrate the threshold of a model file on ``data``'s labelled test images, in place.

    ``total`` is called once with the number of images about to be scored.
    """
    det = load_model(model, device=device)
    source = resolve_data(data)
    pool = _without_training_images(det, source, labelled_images(source))
    summary, _, _ = calibrate_detector(
        det,
        pool,
        method=method,
        max_fpr=max_fpr,
        calibration_fraction=calibration_fraction,
        seed=seed,
        data_spec=source.spec,
        progress=progress,
        total=total,
    )
    summary.model_path = str(det.save(model))
    return summary


# ------------------------------------------------------------------------------ evaluate


@dataclass
class Evaluation:
    """What :func:`evaluate_model` measured; ``metrics`` is what ``metrics.json`` holds."""

    metrics: dict[str, Any]
    scored_names: list[str]
    calibration_names: list[str]
    report_path: str | None
    metrics_path: str | None
    skipped: list[tuple[str, str]]
    seconds: float
    ms_per_image: float


def held_out_images(det: PatchCore, source: DataSource, model_path: Any = None) -> ImageDataset:
    """The held-out test images stored at calibration time, looked up in ``source``.

    Raises:
        WorkflowError: the model has no stored split, or ``source`` lacks some of its images.
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


def _small_shape(h: int, w: int, side: int = PIXEL_METRIC_SIDE) -> tuple[int, int]:
    f = min(1.0, side / max(h, w))
    return (max(1, round(h * f)), max(1, round(w * f)))


def _read(sample: Sample) -> np.ndarray:
    return read_image(sample.image) if isinstance(sample.image, Path) else sample.image


def _gallery_order(
    scores: np.ndarray, truth: np.ndarray, pred: np.ndarray, k: int
) -> dict[str, list[int]]:
    """Indices of up to ``k`` images per outcome, most telling first.

    True positives: highest scores first (clearest detections); true negatives: lowest first
    (clearest passes); false positives: highest first (most confidently wrong alarms); false
    negatives: lowest first (most thoroughly missed defects).
    """
    out = {}
    for key, t, p, descending in (
        ("true_positives", 1, True, True),
        ("true_negatives", 0, False, False),
        ("false_positives", 0, True, True),
        ("false_negatives", 1, False, False),
    ):
        idx = np.flatnonzero((truth == t) & (pred == p) & np.isfinite(scores))
        order = np.argsort(-scores[idx] if descending else scores[idx], kind="stable")
        out[key] = idx[order][:k].tolist()
    return out


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
    when some anomalous image has a mask, on the normal images and the anomalous images with
    masks, at most :data:`PIXEL_METRIC_SIDE` pixels on the longer side.
    """
    threshold = require_threshold(det, None)
    calib = set(calibration_names)
    if calib & set(test.names):
        raise WorkflowError("evaluation images overlap the calibration images; refusing")
    with_mask = [s.mask is not None for s in test]
    want_maps = any(m for m, s in zip(with_mask, test, strict=True) if s.is_anomalous)
    scores = np.full(len(test), np.nan)
    small_maps: dict[int, np.ndarray] = {}
    skipped: list[tuple[str, str]] = []
    images = test.images
    t0 = time.perf_counter()
    for sl in _chunks(len(test)):
        if want_maps:
            s, maps, sk = _scores_and_maps(det, images[sl])
            for j, m in enumerate(maps):
                i = sl.start + j
                if m is not None and (with_mask[i] or not test[i].is_anomalous):
                    small_maps[i] = resize_map(m, _small_shape(*m.shape))
        else:
            s, sk = _scores(det, images[sl])
        scores[sl] = s
        skipped += sk
        if progress:
            progress(sl.stop - sl.start)
    seconds = time.perf_counter() - t0
    ok = np.isfinite(scores)
    if not ok.any():
        raise WorkflowError(f"none of the {len(test)} test images could be read")
    truth = test.labels
    pred = scores >= threshold
    types = np.asarray(test.defect_types, dtype=object)
    measured = metrics.Metrics.from_dict(metrics.evaluate(pred[ok], truth[ok], types[ok].tolist()))
    both = 0 < int(truth[ok].sum()) < int(ok.sum())
    measured = replace(
        measured,
        auroc=metrics.auroc(truth[ok], scores[ok]) if both else None,
        threshold=threshold,
        threshold_method=det.threshold_method_,
    )
    if small_maps:
        idx = sorted(small_maps)
        masks = [datasets.load_mask(test[i], small_maps[i].shape) for i in idx]
        pairs = [(m, small_maps[i]) for m, i in zip(masks, idx, strict=True) if m is not None]
        pm = [p[0] for p in pairs]
        mp = [p[1] for p in pairs]
        try:
            measured = replace(
                measured,
                pixel_auroc=metrics.pixel_auroc(pm, mp),
                aupro=metrics.aupro(pm, mp, 0.3),
                pixel_metric_images=len(pairs),
            )
        except ValueError as exc:
            notes = [*notes, f"pixel metrics not computed: {exc}"]
    result = measured.as_dict()
    n = int(ok.sum())
    ms = 1000.0 * seconds / max(1, len(test))
    scored = [nm for nm, good in zip(test.names, ok, strict=True) if good]
    payload = {
        "metrics": result,
        "data": det.metadata_.get("calibration_data"),
        "threshold": threshold,
        "threshold_method": det.threshold_method_,
        "num_scored": n,
        "scored_names": scored,
        "skipped": [{"path": p, "problem": r} for p, r in skipped],
        "scores": {
            nm: float(s) for nm, s in zip(test.names, scores, strict=True) if np.isfinite(s)
        },
        "seconds": seconds,
        "ms_per_image": ms,
        "model": model_card(det, ms),
    }
    report_path = metrics_path = None
    if report_dir is not None:
        out = Path(report_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        report_path = str(
            _write_report(
                det,
                test,
                out,
                scores,
                pred,
                measured,
                threshold,
                gallery_size,
                title,
                ms,
                skipped,
                notes,
            )
        )
        metrics_path = str(out / "metrics.json")
        Path(metrics_path).write_text(json.dumps(_jsonable(payload), indent=2), encoding="utf-8")
    return Evaluation(
        metrics=_jsonable(payload),
        scored_names=scored,
        calibration_names=list(calibration_names),
        report_path=report_path,
        metrics_path=metrics_path,
        skipped=skipped,
        seconds=seconds,
        ms_per_image=ms,
    )


def evaluate_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    report_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: ProgressFn | None = None,
    total: Callable[[int], None] | None = None,
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
        title=f"PatchCore evaluation: {_short_spec(source.spec)}",
        calibration_names=det.metadata_.get("calibration_names") or [],
        progress=progress,
        notes=notes,
    )


def _short_spec(spec: str) -> str:
    return spec if spec.startswith(ELPV) else Path(spec).name or spec


def model_card(det: PatchCore, ms_per_image: float | None) -> dict[str, Any]:
    card = det.card()
    md = det.metadata_
    size = card.get("image_size")
    if size is None:
        size = f"native, scaled by {card.get('scale'):g}" if card.get("scale") else "native"
    elif isinstance(size, (list, tuple)):
        size = f"{size[0]} x {size[1]}"
    else:
        size = f"{size} x {size}"
    out: dict[str, Any] = {
        "backbone": card["backbone"],
        "tapped layers": ", ".join(card["layers"]),
        "image size": size,
        "training images": card["training_images"],
        "training data": md.get("fit_data", ""),
        "memory bank": f"{card['bank_size']:,} patches x {card['feature_dim']} features",
        "coreset ratio": f"{card['coreset_ratio']:g} ({card['sampling']})",
        "threshold": card["threshold"],
        "threshold method": card["threshold_method"],
        "calibration": _calibration_text(md),
        "heatmap display range": _range_text(md.get("display_range")),
        "fit time": f"{card['fit_seconds']:.1f} s",
    }
    if ms_per_image is not None:
        out["scoring time"] = f"{ms_per_image:.1f} ms per image (with anomaly map)"
    out["seed"] = det.seed
    out["patchcore version"] = md.get("patchcore_version", package_version())
    return out


def _range_text(display: Sequence[float] | None) -> str:
    if not display:
        return "not stored (each heatmap uses its own range)"
    return f"[{display[0]:.4g}, {display[1]:.4g}] (min, 0.7 x max over the calibration maps)"


def _calibration_text(md: dict[str, Any]) -> str:
    if not md.get("calibration_names"):
        return "not stored"
    bound = md.get("calibration_max_fpr")
    extra = f", max FPR {bound:g}" if bound is not None else ""
    return (
        f"{len(md['calibration_names'])} images of {md.get('calibration_data', '?')} "
        f"(fraction {md.get('calibration_fraction', 0):g}, seed {md.get('calibration_seed')}"
        f"{extra}); {len(md.get('test_names', []))} held out"
    )


def _write_report(
    det: PatchCore,
    test: ImageDataset,
    out: Path,
    scores: np.ndarray,
    pred: np.ndarray,
    measured: metrics.Metrics,
    threshold: float,
    gallery_size: int,
    title: str,
    ms: float,
    skipped: list[tuple[str, str]],
    notes: Sequence[str],
) -> Path:
    ok = np.isfinite(scores)
    truth = test.labels
    figdir = out / "figures"
    figures: dict[str, Path] = {}
    figures["score_histogram"] = plots.score_histogram(
        scores[ok],
        truth[ok],
        threshold,
        figdir / "score_histogram.png",
        title="Anomaly scores of the held-out test images",
    )
    if measured.auroc is not None:
        fpr, tpr, _ = metrics.roc_curve(truth[ok], scores[ok])
        op = (measured.false_positive_rate, measured.recall)
        figures["roc"] = plots.roc_plot(fpr, tpr, measured.auroc, figdir / "roc.png", op)
    figures["confusion_matrix"] = plots.confusion_matrix_plot(
        measured.confusion_matrix, figdir / "confusion_matrix.png"
    )
    all_recall = measured.defect_type_recall or {}
    recall = {t: r for t, r in all_recall.items() if t != datasets.GOOD}
    counts = measured.defect_type_counts or {}
    if recall:
        figures["per_type_recall"] = plots.per_type_recall_plot(
            recall, figdir / "per_type_recall.png", counts=counts
        )
    per_type = {t: {"recall": r, "n": counts.get(t)} for t, r in recall.items()}
    display = det.metadata_.get("display_range")
    galleries = _galleries(det, test, out, scores, pred, threshold, display, gallery_size)
    n_normal = int((truth[ok] == 0).sum())
    all_notes = [
        f"Evaluated on {int(ok.sum())} held-out test images ({n_normal} normal, "
        f"{int(ok.sum()) - n_normal} anomalous) that were not used to choose the threshold "
        f"({_calibration_text(det.metadata_)}).",
        "Galleries, up to "
        f"{gallery_size} each: true positives and false positives by highest score first, "
        "true negatives and false negatives by lowest score first.",
        "Heatmaps share one colour scale: [min, 0.7 x max] of the anomaly maps of the "
        "calibration images"
        + (
            f" = [{display[0]:.4g}, {display[1]:.4g}]."
            if display
            else " (not stored: each image uses its own range)."
        ),
    ]
    if measured.pixel_auroc is not None:
        all_notes.append(
            f"Pixel metrics use maps and masks resized to at most {PIXEL_METRIC_SIDE} px on "
            f"the longer side ({measured.pixel_metric_images} images with known masks); "
            "AUPRO up to a false positive rate of 0.3."
        )
    if skipped:
        all_notes.append(
            f"{len(skipped)} unreadable test image(s) left out: "
            + "; ".join(f"{p}: {r}" for p, r in skipped[:10])
        )
    all_notes += list(notes)
    return report.write_report(
        out,
        title=title,
        model_card=model_card(det, ms),
        metrics=measured,
        figures=figures,
        galleries=galleries,
        per_type_recall=per_type or None,
        notes=all_notes,
    )


def _galleries(
    det: PatchCore,
    test: ImageDataset,
    out: Path,
    scores: np.ndarray,
    pred: np.ndarray,
    threshold: float,
    display: Sequence[float] | None,
    k: int,
) -> dict[str, list[dict[str, Any]]]:
    order = _gallery_order(scores, test.labels, pred, k)
    wanted = sorted({i for idx in order.values() for i in idx})
    maps = (
        dict(
            zip(
                wanted,
                det.anomaly_maps([test.images[i] for i in wanted], on_error="skip"),
                strict=True,
            )
        )
        if wanted
        else {}
    )
    rng = tuple(display) if display else None
    galleries: dict[str, list[dict[str, Any]]] = {}
    gdir = out / "gallery"
    for key, idx in order.items():
        items = []
        for rank, i in enumerate(idx):
            s = test[i]
            m = maps.get(i)
            if m is None:
                continue
            try:
                image = _read(s)
                mask = datasets.load_mask(s) if s.mask is not None else None
            except ImageReadError:
                continue
            tile = plots.gallery_tile(
                image,
                m,
                rng,
                float(scores[i]),
                threshold,
                s.name,
                mask,
                height=TILE_HEIGHT,
                annotate=False,
            )
            path = plots.save_png(tile, gdir / f"{key}_{rank + 1:02d}.png")
            kind = s.defect_type if s.is_anomalous else "normal"
            items.append(
                {"image_path": path, "caption": f"{s.name} ({kind})", "score": float(scores[i])}
            )
        galleries[key] = items
    return galleries


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


# ------------------------------------------------------------------------------ predict


@dataclass
class Prediction:
    """One image's result; ``error`` is set (and score is None) for unreadable files."""

    path: str
    score: float | None
    anomalous: bool | None
    threshold: float
    heatmap: str | None = None
    error: str | None = None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "error"
        return "anomalous" if self.anomalous else "normal"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def expand_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Files and folders -> image files (folders expanded, sorted; files kept as given).

    Raises:
        WorkflowError: a path that does not exist, or no image at all.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = list_images(p, recursive=recursive)
            if not found:
                raise WorkflowError(
                    f"{p}: no images found ({', '.join(IMAGE_SUFFIXES)})"
                    + ("" if recursive else "; use --recursive for sub-folders")
                )
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise WorkflowError(f"{p}: no such file or folder")
    if not files:
        raise WorkflowError("no images given")
    return files


def _heatmap_name(path: Path, used: set[str]) -> str:
    stem = path.stem
    name = f"{stem}_heatmap.png"
    k = 2
    while name in used:
        name = f"{stem}_{k}_heatmap.png"
        k += 1
    used.add(name)
    return name


def predict_images(
    det: PatchCore,
    files: Sequence[Path],
    *,
    heatmaps: str | os.PathLike | None = None,
    alpha: float = 0.5,
    chunk: int = CHUNK,
) -> Iterator[Prediction]:
    """Stream one :class:`Prediction` per file, in order, scoring ``chunk`` files at a time.

    Unreadable files yield a prediction with ``error`` set. With ``heatmaps``, an overlay
    (``anomaly_map_overlay`` on the model's calibration display range) is written per image as
    ``<heatmaps>/<stem>_heatmap.png``.

    Raises:
        WorkflowError: the model has no threshold.
    """
    threshold = require_threshold(det, None)
    outdir = Path(heatmaps) if heatmaps is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    display = det.metadata_.get("display_range")
    rng = tuple(display) if display else None
    used: set[str] = set()
    for sl in _chunks(len(files), chunk):
        batch = [str(f) for f in files[sl]]
        if outdir is not None:
            scores, maps, skipped = _scores_and_maps(det, batch)
        else:
            scores, skipped = _scores(det, batch)
            maps = [None] * len(batch)
        problems = dict(skipped)
        for path, s, m in zip(batch, scores, maps, strict=True):
            if not np.isfinite(s):
                yield Prediction(
                    path, None, None, threshold, error=problems.get(path, "unreadable")
                )
                continue
            heat = None
            if outdir is not None and m is not None:
                overlay = plots.anomaly_map_overlay(read_image(path), m, rng, alpha)
                heat = str(plots.save_png(overlay, outdir / _heatmap_name(Path(path), used)))
            yield Prediction(path, float(s), bool(s >= threshold), threshold, heatmap=heat)


# ------------------------------------------------------------------------------ demo


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
    backbone: str = "efficientnet-lite0",
    method: str = "max_f1",
    seed: int = 0,
    limit: int | None = None,
    device: str = "auto",
    fit_progress: bool = True,
    progress: ProgressFn | None = None,
    stage: Callable[[str, int], None] | None = None,
) -> DemoResult:
    """The whole reference workflow on the ELPV solar cells.

    Normal = defect probability 0, anomalous = 1.0 (the uncertain cells are left out). A seeded
    ``train_fraction`` of the normal cells is fitted on; the other normal cells and all
    defective ones form the test pool, split per label into a calibration part (threshold) and
    a held-out part (metrics, report). Everything is written to ``out_dir``: ``model.pt``,
    ``metrics.json``, ``report.html`` and its PNGs.

    Args:
        limit: use at most this many normal and this many defective cells (quick runs).
        stage: called with a stage name and its number of images before each stage.
    """
    check_fraction("train fraction", train_fraction, error=WorkflowError)
    if limit is not None and limit < 4:
        raise WorkflowError(f"limit must be at least 4 images per label, got {limit}")
    out = Path(out_dir)
    source = resolve_data(f"{ELPV}:{cell_type}")
    cells = _limit_per_label(_elpv_all(source), limit, seed)
    normals = cells.subset(cells.labels == datasets.NORMAL)
    train, pool = datasets.normal_train_split(cells, train_fraction, seed=seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if stage:
        stage("fit", len(train))
    det = fit_detector(
        train,
        backbone=backbone,
        image_size=image_size,
        scale=None,
        coreset_ratio=coreset_ratio,
        seed=seed,
        device=device,
        progress=fit_progress,
        data_spec=source.spec,
    )
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
    model_path = det.save(out / "model.pt")
    cal.model_path = str(model_path)
    t2 = time.perf_counter()
    if stage:
        stage("evaluate", len(test))
    evaluation = evaluate_detector(
        det,
        test,
        report_dir=out,
        title=f"PatchCore demo: ELPV solar cells ({cell_type})",
        calibration_names=calib.names,
        progress=progress,
        notes=[
            f"Data: elpv-dataset {cell_type} cells; normal = defect probability 0, anomalous = "
            f"1.0, uncertain cells left out; {len(train)} of {len(normals)} normal cells "
            f"(fraction {train_fraction:g}) fitted on"
            + (f"; limited to {limit} cells per label" if limit else "")
            + ".",
        ],
    )
    timings["evaluate"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    fit = _fit_summary(det, model_path, source.spec, len(normals))
    return DemoResult(str(out), str(model_path), fit, cal, evaluation, timings)
