"""Labelled image collections: folder / VisA / ELPV loaders and seeded, stratified splits.

A data set is an immutable :class:`ImageDataset` of :class:`Sample` records
(:mod:`patchcore.core.samples`, re-exported here). Samples hold file
paths (images are read lazily, by whoever consumes them) or in-memory arrays. Labels follow one
convention everywhere: ``0`` = normal (defect type ``"good"``), ``1`` = anomalous (defect type =
the name of its folder, e.g. ``"crack"``).

Folder layout (MVTec AD style, labels from folder names like MATLAB's
``imageDatastore(..., LabelSource="foldernames")``)::

    root/train/good/*.png
    root/test/good/*.png                       # normal folders: good / normal / ok
    root/test/<defect>/*.png                   # every other folder is a defect type
    root/ground_truth/<defect>/<stem>_mask.png # or <stem>.png; any image suffix

Example:
    >>> test = load_folder("data/deeppcb", "test")
    >>> calib, evaluation = split_each_label(test, 0.5, seed=0)
"""

from __future__ import annotations

import csv
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from patchcore.core.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image
from patchcore.core.samples import (
    ANOMALOUS,
    GOOD,
    MASK_FOLDER,
    NORMAL,
    NORMAL_NAMES,
    ImageDataset,
    OnError,
    Sample,
    concat,
    load_mask,
    preview,
)
from patchcore.lean.util import check_fraction, check_on_error

__all__ = [
    "NORMAL",
    "ANOMALOUS",
    "Sample",
    "ImageDataset",
    "load_mask",
    "concat",
    "load_folder",
    "load_visa",
    "load_elpv",
    "elpv_benchmark_split",
    "split_each_label",
    "sample_fraction",
    "normal_train_split",
    "check_readable",
]

# --- folder layout ----------------------------------------------------------------------------


def load_folder(
    root: str | os.PathLike,
    split: str | None = "test",
    *,
    normal_names: Sequence[str] = NORMAL_NAMES,
    mask_root: str | os.PathLike | None = None,
    on_error: OnError | None = None,
) -> ImageDataset:
    """Load a data set whose labels are folder names.

    Label folders are ``root/<split>/<label>/`` (or ``root/<label>/`` when ``split`` is None).
    Folders named like ``normal_names`` (case-insensitive) hold normal images (label 0, defect
    type ``"good"``); every other folder is a defect type (label 1, defect type = folder name).
    A folder holding only image files and no label folders is taken as all normal, except for
    ``split="test"``: a test split must say which images are defective, so a flat ``test/``
    folder is a ``ValueError`` pointing at ``test/<label>/``.
    Anomalous images get the mask ``mask_root/<label>/<stem>_mask.<ext>`` or
    ``mask_root/<label>/<stem>.<ext>`` where one exists (``mask_root`` defaults to
    ``root/ground_truth``); a warning lists defect images a mask folder has no mask for.

    Args:
        root: the data set folder.
        split: ``"train"``, ``"test"``, any other sub-folder name, or None.
        normal_names: folder names that mean "normal".
        mask_root: folder with ``<label>/`` mask folders; default ``root/ground_truth``.
        on_error: None (default): images are not opened here (cheap; an unreadable file surfaces
            when it is read). ``"raise"`` / ``"skip"``: every image and mask is decoded once now,
            see :func:`check_readable` (skipped files are reported with a warning).

    Returns:
        The samples: normal folders first, then defect folders by name, files sorted by name.
        Names are paths relative to ``root`` (e.g. ``"test/crack/001.png"``).

    Raises:
        FileNotFoundError: ``root`` or ``root/split`` is missing (the message lists what is there).
        ValueError: no images found; loose images next to label folders; a flat ``test``
            split; ``split=None`` on a
            folder holding ``train`` / ``test``.
    """
    check_on_error(on_error, allow_none=True)
    root = Path(root)
    _require_dir(root)
    base = root if split is None else root / split
    if split is not None:
        _require_dir(base, what=f"split {split!r}")
    normal = {n.lower() for n in normal_names}
    if GOOD not in normal:
        normal_names = tuple(normal_names)
        raise ValueError(
            f"normal_names={normal_names!r} must include 'good' (the name of the normal type)"
        )
    mask_base = Path(mask_root) if mask_root is not None else root / MASK_FOLDER
    subdirs, loose = _label_folders(root, base, split, mask_base)
    samples = _folder_samples(root, subdirs, loose, normal, mask_base)
    if not samples:
        found = ", ".join(d.name for d in subdirs) or "nothing"
        raise ValueError(
            f"{base}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)}); it holds {found}"
        )
    source = root.as_posix() if split is None else f"{root.as_posix()}/{split}"
    ds = ImageDataset(samples, source=source)
    if on_error is not None:
        ds, _ = check_readable(ds, on_error=on_error)
    return ds


def _label_folders(
    root: Path, base: Path, split: str | None, mask_base: Path
) -> tuple[list[Path], list[Path]]:
    """(label folders, loose image files) of ``base``, refusing the layouts
    :func:`load_folder` cannot label."""
    subdirs = [
        d
        for d in sorted(base.iterdir())
        if d.is_dir() and not d.name.startswith((".", "__")) and d != mask_base
    ]
    if split is None and {"train", "test"} & {d.name for d in subdirs}:
        raise ValueError(
            f"{root} holds {', '.join(d.name for d in subdirs)}; "
            "pass split='train' or split='test' to choose the label folders"
        )
    loose = list_images(base)
    if loose and subdirs:
        raise ValueError(
            f"{base} holds both image files ({preview([p.name for p in loose])}) and label "
            f"folders ({', '.join(d.name for d in subdirs)}); move the images into a label folder"
        )
    if loose and split == "test":  # a flat test/ folder would count every defect as normal
        raise ValueError(
            f"{base} holds image files ({preview([p.name for p in loose])}) but no label "
            f"folders, so their labels are unknown; put them in {base}/<label>/ "
            f"({base}/good/ for normal images, {base}/<defect type>/ for the others)"
        )
    return subdirs, loose


def _folder_samples(
    root: Path, subdirs: list[Path], loose: list[Path], normal: set[str], mask_base: Path
) -> list[Sample]:
    """The samples of loose images (all normal) or of label folders (normal ones first)."""
    if loose:  # a plain folder of images (train, or split=None): all normal
        return [Sample(p, NORMAL, GOOD, None, _rel(p, root)) for p in loose]
    samples: list[Sample] = []
    ordered = sorted(subdirs, key=lambda d: (d.name.lower() not in normal, d.name))
    for d in ordered:
        files = list_images(d)
        if not files:
            warnings.warn(f"{d}: label folder without images, ignored", stacklevel=3)
            continue
        if d.name.lower() in normal:
            samples += [Sample(p, NORMAL, GOOD, None, _rel(p, root)) for p in files]
        else:
            masks = _find_masks(files, mask_base / d.name)
            samples += [
                Sample(p, ANOMALOUS, d.name, m, _rel(p, root))
                for p, m in zip(files, masks, strict=True)
            ]
    return samples


def _find_masks(images: list[Path], folder: Path) -> list[Path | None]:
    """Mask path per image: ``<stem>_mask.<ext>`` preferred over ``<stem>.<ext>``."""
    if not folder.is_dir():
        return [None] * len(images)
    index = {p.name.lower(): p for p in list_images(folder)}
    out: list[Path | None] = []
    for img in images:
        stem = img.stem.lower()
        found = None
        for pattern in (f"{stem}_mask", stem):
            found = next((index[pattern + s] for s in IMAGE_SUFFIXES if pattern + s in index), None)
            if found is not None:
                break
        out.append(found)
    missing = [img.name for img, m in zip(images, out, strict=True) if m is None]
    if missing:
        warnings.warn(
            f"{folder}: no mask for {len(missing)} of {len(images)} images "
            f"({preview(missing)}); their masks are unknown (None)",
            stacklevel=4,
        )
    return out


# --- VisA -------------------------------------------------------------------------------------


def load_visa(
    root: str | os.PathLike,
    object_name: str,
    split: str | None = "test",
    *,
    split_csv: str | os.PathLike | None = None,
    on_error: OnError | None = None,
) -> ImageDataset:
    """Load one object of the VisA data set, raw or converted.

    Raw layout (as downloaded)::

        root/<object>/Data/Images/{Normal,Anomaly}/*.JPG
        root/<object>/Data/Masks/Anomaly/<stem>.png
        root/split_csv/1cls.csv     # object,split,label,image,mask (paths relative to root)

    The csv gives the split (``train`` / ``test``) and the label (``normal`` / ``anomaly``).
    With ``split=None`` all rows of the object are used (or, without a csv, all images of
    ``Normal`` and ``Anomaly``). Converted layout (``<object>/train/good``, ``test/good``,
    ``test/bad``, ``ground_truth/bad``) is loaded with :func:`load_folder`.
    Anomalous samples have defect type ``"bad"`` in both layouts.

    Args:
        root: the VisA folder (holding one folder per object).
        object_name: e.g. ``"candle"``, ``"pcb1"``.
        split: ``"train"``, ``"test"`` or None.
        split_csv: the split csv file or the folder holding ``1cls.csv``;
            default ``root/split_csv/1cls.csv``. Raw layout only.
        on_error: as in :func:`load_folder`; with ``"skip"`` csv rows whose files are missing
            are also skipped (with a warning) instead of raising.

    Returns:
        The samples, named by their path relative to ``root`` (raw) or ``root/<object>``
        (converted).
    """
    check_on_error(on_error, allow_none=True)
    root = Path(root)
    _require_dir(root)
    obj = root / object_name
    _require_dir(obj, what=f"VisA object {object_name!r}")
    if not (obj / "Data").is_dir():
        return load_folder(obj, split, on_error=on_error)

    csv_path = _visa_csv(root, split_csv)
    if csv_path is None:
        if split is not None:
            raise FileNotFoundError(
                f"{root / 'split_csv' / '1cls.csv'}: no such file; the raw VisA layout needs the "
                "split csv for split={split!r}: pass split_csv=PATH (or split=None for all images)"
            )
        samples = _visa_from_folders(root, obj)
    else:
        samples = _visa_from_csv(root, object_name, split, csv_path, on_error)
    if not samples:
        raise ValueError(f"{obj}: no images found for split {split!r}")
    source = f"{obj.as_posix()}" + ("" if split is None else f"/{split}")
    ds = ImageDataset(samples, source=source)
    if on_error is not None:
        ds, _ = check_readable(ds, on_error=on_error)
    return ds


def _visa_csv(root: Path, split_csv: str | os.PathLike | None) -> Path | None:
    if split_csv is None:
        p = root / "split_csv" / "1cls.csv"
        return p if p.is_file() else None
    p = Path(split_csv)
    if p.is_dir():
        p = p / "1cls.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such split csv file")
    return p


def _visa_from_csv(
    root: Path, object_name: str, split: str | None, csv_path: Path, on_error: OnError | None
) -> list[Sample]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = {"object", "split", "label", "image", "mask"}
        if reader.fieldnames is None or not columns <= set(reader.fieldnames):
            raise ValueError(
                f"{csv_path}: expected columns {sorted(columns)}, got {reader.fieldnames}"
            )
        rows = list(reader)
    objects = sorted({r["object"] for r in rows})
    if object_name not in objects:
        raise ValueError(f"{csv_path}: no rows for object {object_name!r}; it lists {objects}")
    rows = [r for r in rows if r["object"] == object_name]
    splits = sorted({r["split"] for r in rows})
    rows = [r for r in rows if split is None or r["split"] == split]
    if not rows:
        raise ValueError(f"{csv_path}: no rows for {object_name!r} in split {split!r} ({splits})")
    samples, missing = [], []
    for r in rows:
        label = r["label"].strip().lower()
        if label not in ("normal", "anomaly"):
            raise ValueError(f"{csv_path}: label {r['label']!r}; expected 'normal' or 'anomaly'")
        image = root / r["image"].strip()
        mask = root / r["mask"].strip() if r["mask"].strip() else None
        gone = [p for p in (image, mask) if p is not None and not p.is_file()]
        if gone:
            missing += gone
            continue
        if label == "normal":
            samples.append(Sample(image, NORMAL, GOOD, None, r["image"].strip()))
        else:
            samples.append(Sample(image, ANOMALOUS, "bad", mask, r["image"].strip()))
    if missing:
        msg = f"{csv_path}: {len(missing)} listed files do not exist ({preview(missing)})"
        if on_error != "skip":
            raise FileNotFoundError(msg + "; pass on_error='skip' to leave those rows out")
        warnings.warn(msg + "; those rows were skipped", stacklevel=3)
    return samples


def _visa_from_folders(root: Path, obj: Path) -> list[Sample]:
    images = obj / "Data" / "Images"
    samples: list[Sample] = []
    normal_dir, anomaly_dir = images / "Normal", images / "Anomaly"
    for d in (normal_dir, anomaly_dir):
        _require_dir(d)
    samples += [Sample(p, NORMAL, GOOD, None, _rel(p, root)) for p in list_images(normal_dir)]
    files = list_images(anomaly_dir)
    masks = _find_masks(files, obj / "Data" / "Masks" / "Anomaly")
    samples += [
        Sample(p, ANOMALOUS, "bad", m, _rel(p, root)) for p, m in zip(files, masks, strict=True)
    ]
    return samples


# --- ELPV -------------------------------------------------------------------------------------


def load_elpv(
    *,
    cell_type: Literal["mono", "poly", "all"] = "all",
    normal_max_prob: float = 0.0,
    anomalous_min_prob: float = 1.0,
    labels_csv: str | os.PathLike | None = None,
) -> ImageDataset:
    """Solar cell electroluminescence images of the ``elpv-dataset`` package (300x300, grey).

    Each of the 2,624 cells has a defect probability (0, 1/3, 2/3 or 1) and a cell type.
    Cells with probability <= ``normal_max_prob`` are normal, those >= ``anomalous_min_prob``
    anomalous (defect type ``"defective"``); the uncertain ones in between are left out.
    Images are not read here: samples hold the paths of the package's PNG files.

    Args:
        cell_type: ``"mono"``, ``"poly"`` or ``"all"``.
        normal_max_prob: highest defect probability counted as normal.
        anomalous_min_prob: lowest defect probability counted as anomalous.
        labels_csv: the package's ``labels.csv`` (default: the installed package's).

    Returns:
        Normal and anomalous cells in file order, named like ``"images/cell0001.png"``.
        Use :func:`normal_train_split` (or :func:`elpv_benchmark_split`) for train / test.
    """
    if cell_type not in ("mono", "poly", "all"):
        raise ValueError(f"cell_type must be 'mono', 'poly' or 'all', got {cell_type!r}")
    if not 0.0 <= normal_max_prob < anomalous_min_prob <= 1.0:
        raise ValueError(
            "need 0 <= normal_max_prob < anomalous_min_prob <= 1, got "
            f"normal_max_prob={normal_max_prob!r}, anomalous_min_prob={anomalous_min_prob!r}"
        )
    path = Path(labels_csv) if labels_csv is not None else _elpv_labels_csv()
    eps = 1e-9
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, prob_s, kind = line.split()
            prob = float(prob_s)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: expected 'PATH PROBABILITY TYPE', got {line!r}"
            ) from None
        if cell_type != "all" and kind != cell_type:
            continue
        if prob <= normal_max_prob + eps:
            samples.append(Sample(path.parent / rel, NORMAL, GOOD, None, rel))
        elif prob >= anomalous_min_prob - eps:
            samples.append(Sample(path.parent / rel, ANOMALOUS, "defective", None, rel))
    if not samples:
        raise ValueError(f"{path}: no cells of type {cell_type!r} within the thresholds")
    return ImageDataset(samples, source=f"elpv/{cell_type}")


def _elpv_labels_csv() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the ELPV images come with the 'elpv-dataset' package: pip install elpv-dataset"
        )
    path = Path(spec.origin).parent / "data" / "labels.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (broken elpv-dataset install?)")
    return path


def elpv_benchmark_split(
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
    cell_type: Literal["mono", "poly", "all"] = "all",
    normal_max_prob: float = 0.0,
    anomalous_min_prob: float = 1.0,
) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for ELPV: a seeded ``train_fraction`` of the normal cells to fit on;
    the remaining normal cells plus all anomalous cells to test on."""
    ds = load_elpv(
        cell_type=cell_type,
        normal_max_prob=normal_max_prob,
        anomalous_min_prob=anomalous_min_prob,
    )
    return normal_train_split(ds, train_fraction, seed=seed)


# --- splits -----------------------------------------------------------------------------------


def split_each_label(
    ds: ImageDataset, fraction: float = 0.5, *, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Split every defect type (and the normals) at random in the same proportion.

    Like MATLAB's ``splitEachLabel(imds, p, "randomized")``: of each group of ``n`` samples with
    the same defect type, ``round(fraction * n)`` go to the first part, the rest to the second.
    The parts are disjoint, cover ``ds`` and keep the original order.

    Args:
        ds: the data set.
        fraction: share of each group in the first part, in (0, 1].
        seed: seed of the random choice (same seed, same split).

    Returns:
        (first, second); ``second`` is empty when ``fraction`` is 1.
    """
    check_fraction("fraction", fraction)
    rng = np.random.default_rng(seed)
    types = np.asarray(ds.defect_types, dtype=object)
    take = np.zeros(len(ds), dtype=bool)
    for t in ds.counts():  # fixed group order: "good", then by name
        idx = np.flatnonzero(types == t)
        k = int(np.floor(fraction * len(idx) + 0.5))
        take[rng.permutation(idx)[:k]] = True
    return ds.subset(take), ds.subset(~take)


def sample_fraction(ds: ImageDataset, fraction: float, *, seed: int = 0) -> ImageDataset:
    """A seeded random ``fraction`` of the samples (at least one), in the original order.

    Not stratified: meant for e.g. a fraction of the (all normal) training images.
    """
    check_fraction("fraction", fraction)
    if len(ds) == 0:
        raise ValueError("cannot sample from an empty data set")
    k = max(1, int(np.floor(fraction * len(ds) + 0.5)))
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:k])
    return ds.subset(idx)


def normal_train_split(
    ds: ImageDataset, train_fraction: float = 0.5, *, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for a set of labelled images without its own split.

    Returns:
        train: a seeded ``train_fraction`` of the normal samples (at least one);
        test: the other normal samples followed by all anomalous samples.
    """
    check_fraction("fraction", train_fraction)
    normals = ds.subset(ds.labels == NORMAL)
    if len(normals) == 0:
        raise ValueError(f"{ds!r} has no normal samples to train on")
    train = sample_fraction(normals, train_fraction, seed=seed)
    chosen = set(train.names)
    rest = normals.subset([i for i, n in enumerate(normals.names) if n not in chosen])
    return train, concat(rest, ds.subset(ds.labels == ANOMALOUS))


# --- readability ------------------------------------------------------------------------------


def check_readable(
    ds: ImageDataset, on_error: OnError = "raise"
) -> tuple[ImageDataset, list[tuple[str, str]]]:
    """Decode every image file (and mask file) once to find unreadable ones.

    Args:
        ds: the data set.
        on_error: ``"raise"``: the first :class:`~patchcore.core.images.ImageReadError` (naming the
            file) propagates. ``"skip"``: unreadable samples are left out, listed in the report
            and summarised in a warning.

    Returns:
        (the readable samples, [(name, reason), ...] for each sample left out).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    keep = np.ones(len(ds), dtype=bool)
    report: list[tuple[str, str]] = []
    for i, s in enumerate(ds):
        try:
            for ref, what in ((s.image, "image"), (s.mask, "mask")):
                if isinstance(ref, Path):
                    arr = read_image(ref)
                elif isinstance(ref, np.ndarray):
                    arr = ref
                else:
                    continue
                if arr.ndim not in (2, 3) or min(arr.shape[:2]) == 0:
                    raise ImageReadError(s.name, f"{what} array of shape {arr.shape}")
        except ImageReadError as exc:
            if on_error == "raise":
                raise
            keep[i] = False
            report.append((s.name, str(exc)))
    if report:
        warnings.warn(
            f"skipped {len(report)} of {len(ds)} images that cannot be read: "
            + "; ".join(reason for _, reason in report[:5])
            + (f"; ... and {len(report) - 5} more" if len(report) > 5 else ""),
            stacklevel=2,
        )
    return ds.subset(keep), report


# --- helpers ----------------------------------------------------------------------------------


def _require_dir(path: Path, what: str = "folder") -> None:
    if path.is_dir():
        return
    if path.exists():
        raise NotADirectoryError(f"{path}: not a folder")
    parent = path.parent
    if parent.is_dir():
        there = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
        listing = f"{parent} holds: {preview(there, 20) or 'nothing'}"
    else:
        listing = f"{parent} does not exist either"
    raise FileNotFoundError(f"{path}: no such {what}; {listing}")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
