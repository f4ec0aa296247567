"""Explain: for each image, its worst patch beside the nearest normal training patch."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps import plots
from patchcore.apps.workflow.files import check_writable_folder
from patchcore.apps.workflow.predict import picture_name, write_picture
from patchcore.core.detector import PatchCore
from patchcore.core.explain import Explanation
from patchcore.core.images import ImageReadError, read_image
from patchcore.lean import record
from patchcore.lean.record import Inspection

#: The columns an explanation adds to the record's own (JSON and CSV).
EXPLAIN_FIELDS = ("distance", "box", "bank_row", "train_image", "train_box", "note", "crop")


@dataclass
class ExplainedImage:
    """One image's inspection record, its :class:`~patchcore.core.explain.Explanation` and,
    if written, its crop pair PNG."""

    record: Inspection
    explanation: Explanation
    crop: str | None = None

    def extra(self) -> dict[str, Any]:
        """The :data:`EXPLAIN_FIELDS` values (boxes ``[top, left, bottom, right]``)."""
        e = self.explanation
        return {
            "distance": None if e.error is not None else e.distance,
            "box": None if e.box is None else list(e.box),
            "bank_row": e.bank_row,
            "train_image": e.train_name,
            "train_box": None if e.train_box is None else list(e.train_box),
            "note": e.note,
            "crop": self.crop,
        }

    def nearest(self) -> str | None:
        """One line: the worst patch and the nearest normal training patch (tables)."""
        e = self.explanation
        if e.error is not None:
            return None
        where = e.note or f"{e.train_name} {list(e.train_box or e.train_patch or [])}"
        return f"worst patch {list(e.box or [])} at distance {e.distance:.4f} <- {where}"


def training_pixels(e: Explanation) -> np.ndarray | None:
    """The pixels of the training image ``e`` names, or None (in-memory, moved, unreadable)."""
    if e.train_name is None or e.train_name.startswith("image #"):
        return None
    try:
        return read_image(e.train_name) if Path(e.train_name).is_file() else None
    except ImageReadError:
        return None


def explanation_picture(e: Explanation, image: np.ndarray, height: int = 160) -> np.ndarray:
    """The crop pair of ``e`` (:func:`patchcore.apps.plots.explanation_pair`); ``image`` = its
    pixels."""
    assert e.box is not None
    train = training_pixels(e) if e.train_box is not None else None
    return plots.explanation_pair(image, e.box, train, e.train_box, height=height)


def _record(det: PatchCore, e: Explanation) -> Inspection:
    threshold = det.threshold_
    if e.error is not None:
        return record.error_record(e.name, e.index, e.error, threshold=threshold)
    mapping = det.state_.normalization if threshold is not None else None
    return record.inspection(
        e.name, e.index, e.score, threshold=threshold, normalization_map=mapping
    )


def explain_images(
    det: PatchCore,
    files: Sequence[str | os.PathLike],
    *,
    crops: str | os.PathLike | None = None,
    force: bool = False,
) -> Iterator[ExplainedImage]:
    """Stream each file's record and explanation, in order (one detector pass, a batch of
    files at a time); an unreadable file is an ``"error"`` record and the stream goes on.
    With ``crops``, ``<stem>_explain.png`` (the worst patch, red, beside the nearest training
    patch, green) is written per readable file (atomically; an existing file that patchcore
    did not write is refused unless ``force``).

    Raises:
        WorkflowError: ``crops`` cannot be written (before any image is scored).
    """
    paths = [str(f) for f in files]
    outdir = None if crops is None else check_writable_folder(crops, create=True)
    return _explain(det, paths, outdir, force)


def _explain(
    det: PatchCore, paths: list[str], outdir: Path | None, force: bool
) -> Iterator[ExplainedImage]:
    """The stream of :func:`explain_images` (its checks done)."""
    used: set[str] = set()
    step = max(1, int(det.batch_size))
    for start in range(0, len(paths), step):
        chunk = paths[start : start + step]
        for e in det.explain(chunk, on_error="skip", progress=False):
            e.index += start
            crop = None
            if outdir is not None and e.error is None:
                name = picture_name(Path(e.name), used, "explain")
                pic = explanation_picture(e, read_image(e.name))
                crop = write_picture(pic, outdir / name, force=force)
            yield ExplainedImage(_record(det, e), e, crop)
