"""The leakage guard: images a model was fitted on never calibrate or evaluate it.

A model scores its own training images low, so a threshold chosen on them, or metrics measured
on them, look better than the model is (calibration F1 1.0, evaluation 1.0 on every metric).
``calibrate``, ``calibrate --normal-only``, ``calibrate-regions`` and ``evaluate`` pass their
images through :func:`leave_out_training`:

- **by content**: the model stores a digest of every image it was fitted on, later updates
  included (:mod:`patchcore.lean.fingerprints`: SHA-256 of a file's bytes, of an in-memory
  image's pixels); an image with the same digest is left out, whatever its name or folder;
- **by name**, in the data the model was fitted on (``fit_data``): the training names it
  recorded. A model file written before digests existed is checked this way only, and the
  guard says so.

Training images of the fit's own data, found by their names, are left out quietly: such a data
set holds its training split by design (the ELPV cells, a folder used for both). Any other
training image (found by content: a copy, a link, another folder) is left out with a warning
that gives the count and the first names; ``strict=True`` makes it an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from patchcore.apps.workflow.data import (
    DataSource,
    WorkflowError,
    available_train_images,
    resolve_data,
)
from patchcore.core.datasets import ImageDataset
from patchcore.core.detector import PatchCore
from patchcore.lean.fingerprints import content_digest

__all__ = ["Overlap", "leave_out_training", "training_overlap"]

#: Names shown in a leakage warning.
SHOWN = 3


@dataclass
class Overlap:
    """Which images of a pool the model was fitted on.

    Attributes:
        keep: (N,) bool, True for the images that were not fitted on.
        expected: training images of the fit's own data, found by their recorded names.
        unexpected: names of the other training images found (by content).
        by_content: whether digests were compared (False: a model file without them).
        notes: what could not be checked, in words.
    """

    keep: np.ndarray
    expected: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    by_content: bool = True
    notes: list[str] = field(default_factory=list)


def _stored_digests(det: PatchCore) -> tuple[set[str] | None, str | None]:
    """The digests of ``det``'s training images, and a note when they are not the model's own.

    A model file without digests (written before they existed; an update of one records the
    added images' only): the digests of the training images it names, taken now from its
    training data when that is still readable; else None (names only, and a note saying so).
    """
    found = getattr(det, "train_digests_", None)
    known = {d for d in found or () if d}
    if found is not None and len(known) == len(found):
        return known, None
    md = det.metadata_
    used = set(md.get("train_names") or [])
    try:
        fitted_on = available_train_images(resolve_data(md.get("fit_data") or ""))
    except WorkflowError:
        return known or None, (
            "this model file records no content digests of its training images (written "
            f"before they existed) and its training data {md.get('fit_data')!r} is not "
            "readable here: training images are recognised by their names in that data only; "
            "fit again to check by content"
        )
    taken = {content_digest(s.image) for s in fitted_on if s.name in used}
    return known | {d for d in taken if d is not None}, None


def training_overlap(det: PatchCore, source: DataSource, pool: ImageDataset) -> Overlap:
    """Which of ``pool``'s images (from ``source``) ``det`` was fitted on (see the module
    docstring)."""
    md = det.metadata_
    same_data = md.get("fit_data") == source.spec
    names = set(md.get("train_names") or []) if same_data else set()
    stored, note = _stored_digests(det)
    keep = np.ones(len(pool), dtype=bool)
    out = Overlap(keep=keep, by_content=stored is not None, notes=[note] if note else [])
    for i, sample in enumerate(pool):
        if sample.name in names:
            keep[i] = False
            out.expected.append(sample.name)
        elif stored and content_digest(sample.image) in stored:
            keep[i] = False
            out.unexpected.append(sample.name)
    return out


def leave_out_training(
    det: PatchCore, source: DataSource, pool: ImageDataset, *, what: str, strict: bool = False
) -> tuple[ImageDataset, list[str]]:
    """``pool`` without the images ``det`` was fitted on, and the warnings to show.

    Args:
        det: the model.
        source: where ``pool`` comes from.
        pool: the images about to calibrate or evaluate the model.
        what: the images' role in messages (e.g. "calibration", "held-out test").
        strict: a training image found outside the fit's own data (by content) is an error.

    Returns:
        (the images left, warnings: the leaked training images left out, and what could not
        be checked).

    Raises:
        WorkflowError: ``strict`` and a training image found by content.
    """
    found = training_overlap(det, source, pool)
    warnings = list(found.notes)
    if found.unexpected:
        n, first = len(found.unexpected), ", ".join(found.unexpected[:SHOWN])
        text = (
            f"{n} of the {len(pool)} {what} images of {source.spec} "
            f"{'is an image' if n == 1 else 'are images'} the model was fitted on (same "
            f"content as a training image: {first}{', ...' if n > SHOWN else ''}); "
            f"{'it scores' if n == 1 else 'they score'} low on the model's own bank and would "
            "make the results look better than they are"
        )
        if strict:
            raise WorkflowError(f"{text} (--strict: stopped; remove them from {source.spec})")
        warnings.insert(0, f"{text}: left out")
    return pool.subset(found.keep), warnings
