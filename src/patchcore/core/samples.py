"""Samples and data sets: :class:`Sample` (one image, its label, defect type and mask) and the
immutable, ordered :class:`ImageDataset` of them, with :func:`concat` and :func:`load_mask`.

Labels follow one convention everywhere: ``0`` = normal (defect type ``"good"``), ``1`` =
anomalous (defect type = e.g. the name of its folder). The loaders and splits are in
:mod:`patchcore.core.datasets` (which re-exports these names).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
from PIL import Image

from patchcore.core.images import ImageReadError, read_image
from patchcore.lean.util import resize_mask

__all__ = [
    "ANOMALOUS",
    "GOOD",
    "MASK_FOLDER",
    "NORMAL",
    "NORMAL_NAMES",
    "ImageDataset",
    "ImageRef",
    "OnError",
    "Sample",
    "concat",
    "image_shape",
    "load_mask",
    "preview",
]

NORMAL = 0
ANOMALOUS = 1
GOOD = "good"
NORMAL_NAMES = ("good", "normal", "ok")
MASK_FOLDER = "ground_truth"

OnError = Literal["raise", "skip"]
ImageRef = Path | np.ndarray


@dataclass(frozen=True, eq=False)
class Sample:
    """One image with its label.

    Attributes:
        image: path to the image file (read lazily) or an in-memory uint8 array HxW / HxWxC.
        label: 0 normal, 1 anomalous.
        defect_type: ``"good"`` for normal samples, otherwise the defect type (folder name).
        mask: path to a ground-truth mask (white = defect), a HxW array, or ``None``.
        name: stable identifier, unique within a data set (loaders use the relative path).
            Defaults to the image path for file samples; required for in-memory arrays.
    """

    image: ImageRef
    label: int = NORMAL
    defect_type: str = GOOD
    mask: ImageRef | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.image, (str, os.PathLike)):
            object.__setattr__(self, "image", Path(self.image))
        elif not isinstance(self.image, np.ndarray):
            raise TypeError(
                f"Sample.image must be a path or a numpy array, got {type(self.image).__name__}"
            )
        if isinstance(self.mask, (str, os.PathLike)):
            object.__setattr__(self, "mask", Path(self.mask))
        elif self.mask is not None and not isinstance(self.mask, np.ndarray):
            raise TypeError(
                f"Sample.mask must be a path, a numpy array or None, got {type(self.mask).__name__}"
            )
        label = int(self.label)
        if label not in (NORMAL, ANOMALOUS):
            raise ValueError(f"label must be 0 (normal) or 1 (anomalous), got {self.label!r}")
        object.__setattr__(self, "label", label)
        if label == NORMAL and self.defect_type != GOOD:
            raise ValueError(
                f"a normal sample has defect_type 'good', got {self.defect_type!r}; "
                "use label=1 for a defect type"
            )
        if label == ANOMALOUS and self.defect_type.lower() in ("", GOOD):
            raise ValueError(
                f"an anomalous sample needs a defect type other than 'good', "
                f"got {self.defect_type!r}"
            )
        if not self.name:
            if not isinstance(self.image, Path):
                raise ValueError("a Sample holding an in-memory array needs a name")
            object.__setattr__(self, "name", self.image.as_posix())

    @property
    def is_anomalous(self) -> bool:
        return self.label == ANOMALOUS


class ImageDataset(Sequence[Sample]):
    """An immutable, ordered collection of :class:`Sample` with unique names.

    Args:
        samples: the samples, in order.
        source: where the samples came from (shown by ``repr``), e.g. ``"deeppcb/test"``.
    """

    def __init__(self, samples: Iterable[Sample] = (), *, source: str = "") -> None:
        self._samples: tuple[Sample, ...] = tuple(samples)
        for s in self._samples:
            if not isinstance(s, Sample):
                raise TypeError(f"ImageDataset holds Sample objects, got {type(s).__name__}")
        dupes = [n for n, c in Counter(s.name for s in self._samples).items() if c > 1]
        if dupes:
            raise ValueError(
                f"sample names must be unique; repeated: {preview(dupes)}. "
                "Give distinct names (e.g. relative paths) when combining data sets"
            )
        self.source = source
        labels = np.fromiter((s.label for s in self._samples), dtype=np.int64)
        labels.setflags(write=False)
        self._labels = labels

    # --- Sequence protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> ImageDataset: ...

    def __getitem__(self, index: int | slice) -> Sample | ImageDataset:
        if isinstance(index, slice):
            return ImageDataset(self._samples[index], source=self.source)
        return self._samples[int(index)]  # numpy integers too

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __add__(self, other: ImageDataset) -> ImageDataset:
        if not isinstance(other, ImageDataset):
            return NotImplemented
        return concat(self, other)

    def __repr__(self) -> str:
        n_anom = int(self._labels.sum())
        parts = [f"{len(self)} images: {len(self) - n_anom} normal, {n_anom} anomalous"]
        defects = {k: v for k, v in self.counts().items() if k != GOOD}
        if defects:
            parts.append("[" + ", ".join(f"{k} {v}" for k, v in defects.items()) + "]")
        src = f", source={self.source!r}" if self.source else ""
        return f"ImageDataset({' '.join(parts)}{src})"

    # --- columns -----------------------------------------------------------------------------
    @property
    def samples(self) -> tuple[Sample, ...]:
        return self._samples

    @property
    def images(self) -> list[ImageRef]:
        """Image paths (or arrays), in order."""
        return [s.image for s in self._samples]

    @property
    def labels(self) -> np.ndarray:
        """int64 array (N,) of 0 (normal) / 1 (anomalous); read-only."""
        return self._labels

    @property
    def defect_types(self) -> list[str]:
        return [s.defect_type for s in self._samples]

    @property
    def masks(self) -> list[ImageRef | None]:
        return [s.mask for s in self._samples]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._samples]

    def counts(self) -> dict[str, int]:
        """Number of samples per defect type, ``"good"`` first, then by name."""
        c = Counter(self.defect_types)
        return {k: c[k] for k in sorted(c, key=lambda k: (k != GOOD, k))}

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The samples at the given positions (ints, in the given order) or a boolean mask (N,)."""
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask of shape {idx.shape} for {len(self)} samples")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {idx.shape}")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} samples")
        return ImageDataset((self._samples[int(i)] for i in idx), source=self.source)


def concat(*datasets: ImageDataset) -> ImageDataset:
    """Samples of several data sets, in order (names must stay unique)."""
    sources = [d.source for d in datasets if d.source]
    source = " + ".join(dict.fromkeys(sources))
    return ImageDataset((s for d in datasets for s in d), source=source)


def load_mask(sample: Sample, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The ground-truth mask of a sample as a boolean array.

    Args:
        sample: the sample.
        shape: (H, W) to return; a mask of another size is resized (nearest neighbour). ``None``:
            the mask's own size, or the image's size when there is no mask file.

    Returns:
        bool array (H, W), True = defect. All False for a normal sample without a mask;
        ``None`` for an anomalous sample without a mask (its defect location is unknown).
    """
    if sample.mask is None:
        if sample.is_anomalous:
            return None
        if shape is None:
            shape = image_shape(sample.image)
        return np.zeros(tuple(shape), dtype=bool)
    m = read_image(sample.mask) if isinstance(sample.mask, Path) else np.asarray(sample.mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.ndim != 2:
        raise ImageReadError(sample.name, f"mask of shape {m.shape}; expected HxW")
    top = float(m.max(initial=0))
    out = m > top / 2 if top > 0 else np.zeros(m.shape, dtype=bool)
    if shape is not None:
        out = resize_mask(out, (int(shape[0]), int(shape[1])))
    return out


def image_shape(image: ImageRef) -> tuple[int, int]:
    if isinstance(image, np.ndarray):
        return (int(image.shape[0]), int(image.shape[1]))
    try:
        with Image.open(image) as im:  # header only
            w, h = im.size
    except FileNotFoundError:
        raise ImageReadError(image, "no such file") from None
    except OSError as exc:
        raise ImageReadError(image, f"cannot read image header ({exc})") from None
    return (h, w)


def preview(items: Sequence[object], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, with the total when there are more."""
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
