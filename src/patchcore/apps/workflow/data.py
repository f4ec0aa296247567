"""Data specs, the images they hold, and the splits the workflow keeps apart.

A *data spec* is a folder (``DATA/train/good``, ``DATA/test/<label>``,
``DATA/ground_truth/<label>``, or just a folder of normal images for fitting) or
``elpv[:mono|poly|all]`` for the ELPV solar cells.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore.core import datasets
from patchcore.core.datasets import ImageDataset
from patchcore.core.detector import PatchCore
from patchcore.core.images import IMAGE_SUFFIXES, list_images

ELPV = "elpv"

#: Called with the number of images just done (drives a progress bar).
ProgressFn = Callable[[int], None]


class WorkflowError(ValueError):
    """Bad input to a workflow step (missing folder, no images, model not calibrated...).

    The message is one line that says what is wrong and what to do.
    """


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


def short_spec(spec: str) -> str:
    """A data spec for titles: ELPV specs as they are, folders by their name."""
    return spec if spec.startswith(ELPV) else Path(spec).name or spec


def elpv_cells(source: DataSource) -> ImageDataset:
    """Every normal and defective ELPV cell of ``source``'s cell type."""
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
        ds = elpv_cells(source)
        return ds.subset(ds.labels == datasets.NORMAL)
    root = source.root
    assert root is not None
    if not (root / "train").is_dir() and not list_images(root):
        raise WorkflowError(
            f"{root}: no training images: expected {root}/train/good/ with images "
            f"({', '.join(IMAGE_SUFFIXES)}) or a folder of normal images"
        )
    try:
        ds = datasets.load_folder(root, "train" if (root / "train").is_dir() else None)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
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
        return elpv_cells(source)
    root = source.root
    assert root is not None
    try:
        return datasets.load_folder(root, "test" if (root / "test").is_dir() else None)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise WorkflowError(str(exc)) from None
    except ValueError as exc:
        raise WorkflowError(
            f"{root}: no labelled test images ({exc}); expected {root}/test/good/ and "
            f"{root}/test/<defect>/ folders"
        ) from None


def stored_images(det: PatchCore, source: DataSource, names: list[str], what: str) -> ImageDataset:
    """The labelled images of ``source`` named ``names`` (a split stored in ``det``), in that
    order.

    Raises:
        WorkflowError: ``source`` lacks some of them (the message names one and the data the
            model was calibrated on).
    """
    pool = labelled_images(source)
    index = {n: i for i, n in enumerate(pool.names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise WorkflowError(
            f"{source.spec} lacks {len(missing)} of the {len(names)} {what} (e.g. {missing[0]}); "
            f"the model was calibrated on {det.metadata_.get('calibration_data', '?')}"
        )
    return pool.subset([index[n] for n in names])


def limit_per_label(ds: ImageDataset, limit: int | None, seed: int) -> ImageDataset:
    """At most ``limit`` normal and ``limit`` anomalous samples (seeded choice, order kept)."""
    if limit is None:
        return ds
    keep = np.zeros(len(ds), dtype=bool)
    rng = np.random.default_rng(seed)
    for label in (datasets.NORMAL, datasets.ANOMALOUS):
        idx = np.flatnonzero(ds.labels == label)
        keep[rng.permutation(idx)[:limit]] = True
    return ds.subset(keep)


def describe(ds: ImageDataset) -> str:
    """``"N images (a normal, b anomalous)"``."""
    n_anom = int(ds.labels.sum())
    return f"{len(ds)} images ({len(ds) - n_anom} normal, {n_anom} anomalous)"


def split_for_calibration(
    pool: ImageDataset, fraction: float, seed: int, data_spec: str = ""
) -> tuple[ImageDataset, ImageDataset]:
    """(calibration part, held-out part) of ``pool``, split per label.

    Raises:
        WorkflowError: a pool or a part without both labels.
    """
    counts = pool.counts()
    if int(pool.labels.sum()) == 0 or int((pool.labels == 0).sum()) == 0:
        raise WorkflowError(
            f"calibration needs normal and anomalous images; {data_spec or 'the data'} has "
            f"{describe(pool)}"
        )
    calib, test = datasets.split_each_label(pool, fraction, seed=seed)
    for part, what in ((calib, "calibration"), (test, "held-out test")):
        if len(set(part.labels.tolist())) < 2:
            raise WorkflowError(
                f"the {what} part has {describe(part)}: too few images per label "
                f"({', '.join(f'{k} {v}' for k, v in counts.items())}) for a "
                f"{fraction:g} split"
            )
    return calib, test


def without_training_images(det: PatchCore, source: DataSource, pool: ImageDataset) -> ImageDataset:
    """Drop images the model was fitted on (same data spec, same names)."""
    if det.metadata_.get("fit_data") != source.spec:
        return pool
    used = set(det.metadata_.get("train_names") or [])
    if not used:
        return pool
    return pool.subset(np.array([n not in used for n in pool.names], dtype=bool))


def expand_inputs(
    inputs: Iterable[str | os.PathLike], recursive: bool = False, missing_ok: bool = False
) -> list[Path]:
    """Files and folders -> image files (folders expanded, sorted; files kept as given).

    Args:
        inputs: files and folders.
        recursive: also look in sub-folders.
        missing_ok: keep a path that does not exist as a file (its reading then fails on its
            own, e.g. as one ``error`` row of ``predict``) instead of raising.

    Raises:
        WorkflowError: a path that does not exist (unless ``missing_ok``), or no image at all.
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
        elif p.exists() or missing_ok:
            files.append(p)
        else:
            raise WorkflowError(f"{p}: no such file or folder")
    if not files:
        raise WorkflowError("no images given")
    return files
