"""Data specs, the images they hold, and the splits the workflow keeps apart.

A *data spec* is a folder (``DATA/train/good``, ``DATA/test/<label>``,
``DATA/ground_truth/<label>``, or just a folder of normal images for fitting),
``elpv[:mono|poly|all]`` for the ELPV solar cells, or ``visa:ROOT:OBJECT`` for one object of
the VisA data set as downloaded (``ROOT/OBJECT/Data/Images/{Normal,Anomaly}``, masks in
``ROOT/OBJECT/Data/Masks/Anomaly``, the split in ``ROOT/split_csv/1cls.csv``; read by
:func:`patchcore.core.datasets.load_visa`: its ``train`` rows fit, its ``test`` rows
calibrate and evaluate).
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
VISA = "visa"

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
        spec: the canonical data spec stored in model files: an absolute folder path,
            ``"elpv:<cell type>"`` or ``"visa:<absolute VisA root>:<object>"``.
        root: the folder (the VisA root for VisA; None for ELPV).
        cell_type: ELPV cell type (None for folders).
        visa_object: the VisA object (None for the others).
    """

    spec: str
    root: Path | None = None
    cell_type: str | None = None
    visa_object: str | None = None

    @property
    def is_elpv(self) -> bool:
        return self.cell_type is not None


def resolve_data(data: str | os.PathLike) -> DataSource:
    """Turn a user's data argument into a :class:`DataSource`.

    An existing folder wins; otherwise ``elpv``, ``elpv:mono``, ``elpv:poly`` or ``elpv:all``
    name the ELPV solar cells (``elpv`` = mono cells), and ``visa:ROOT:OBJECT`` one VisA
    object.

    Raises:
        WorkflowError: neither an existing folder nor an ELPV or VisA spec.
    """
    text = os.fspath(data)
    path = Path(text).expanduser()
    if path.is_dir():
        return DataSource(spec=str(path.resolve()), root=path.resolve())
    head, _, cell = text.partition(":")
    if head.lower() == VISA and not path.exists():
        return _visa_source(text, cell)
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


def _visa_source(text: str, rest: str) -> DataSource:
    root_text, _, obj = rest.rpartition(":")
    if not root_text or not obj:
        raise WorkflowError(f"{text}: a VisA spec is visa:ROOT:OBJECT, e.g. visa:VisA:pcb4")
    root = Path(root_text).expanduser()
    if not (root / obj).is_dir():
        raise WorkflowError(f"{text}: no folder {root / obj} (the VisA object {obj!r})")
    root = root.resolve()
    return DataSource(spec=f"{VISA}:{root}:{obj}", root=root, visa_object=obj)


def short_spec(spec: str) -> str:
    """A data spec for titles: ELPV specs as they are, VisA by its object, folders by name."""
    if spec.startswith(f"{VISA}:"):
        return spec.rpartition(":")[2]
    return spec if spec.startswith(ELPV) else Path(spec).name or spec


def visa_split(source: DataSource, split: str) -> ImageDataset:
    """The ``split`` rows (``"train"`` or ``"test"``) of a VisA source."""
    assert source.root is not None and source.visa_object is not None
    try:
        return datasets.load_visa(source.root, source.visa_object, split)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise WorkflowError(str(exc)) from None


def elpv_cells(source: DataSource) -> ImageDataset:
    """Every normal and defective ELPV cell of ``source``'s cell type."""
    try:
        return datasets.load_elpv(cell_type=source.cell_type)  # type: ignore[arg-type]
    except ModuleNotFoundError as exc:
        raise WorkflowError(str(exc)) from None


def available_train_images(source: DataSource) -> ImageDataset:
    """All normal images a model could be fitted on (before ``train_fraction``).

    Folders: ``DATA/train/good`` (any normal folder under ``DATA/train``), else images directly
    in ``DATA/train``, else images directly in ``DATA``, else ``DATA/good`` (a labelled folder
    without a split). ELPV: all normal cells; VisA: the normal ``train`` rows.
    """
    if source.is_elpv or source.visa_object is not None:
        ds = elpv_cells(source) if source.is_elpv else visa_split(source, "train")
        return ds.subset(ds.labels == datasets.NORMAL)
    root = source.root
    assert root is not None
    labelled_flat = (root / datasets.GOOD).is_dir() and not list_images(root)
    if not (root / "train").is_dir() and not list_images(root) and not labelled_flat:
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
    if source.visa_object is not None:
        return visa_split(source, "test")
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
