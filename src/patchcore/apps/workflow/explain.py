"""Explain: for each image, its worst patch beside the nearest normal training patch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps import plots
from patchcore.apps.workflow.predict import _heatmap_name
from patchcore.core.detector import PatchCore
from patchcore.core.explain import Explanation
from patchcore.core.images import ImageReadError, read_image


@dataclass
class ExplainedImage:
    """An :class:`~patchcore.core.explain.Explanation` and, if written, its crop pair PNG."""

    explanation: Explanation
    crop: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.explanation.as_dict(), "crop": self.crop}


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


def explain_images(
    det: PatchCore, files: Sequence[str | os.PathLike], *, crops: str | os.PathLike | None = None
) -> list[ExplainedImage]:
    """Explain each file (one detector pass); with ``crops``, write ``<stem>_explain.png``
    (the worst patch, red, beside the nearest training patch, green) per readable file."""
    paths = [str(f) for f in files]
    outdir = Path(crops) if crops is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    out = []
    used: set[str] = set()
    for e in det.explain(paths, on_error="skip", progress=False):
        crop = None
        if outdir is not None and e.error is None:
            name = _heatmap_name(Path(e.name), used, "explain")
            pic = explanation_picture(e, read_image(e.name))
            crop = str(plots.save_png(pic, outdir / name))
        out.append(ExplainedImage(e, crop))
    return out
