"""A toy detector and its ONNX export, made once per test session (test helper).

The service tests run every check on both backends; exporting takes tens of seconds on a
busy machine, so the export is cached here (a module imported once) rather than per module.
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
from conftest import textured
from PIL import Image

from patchcore.core.detector import PatchCore


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def toy_images() -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(train, good, bad) striped textures, as conftest's ``toy_images`` fixture."""
    rng = np.random.default_rng(0)
    images = [textured(rng, defect=k >= 10) for k in range(14)]  # the same draws, in order
    return images[:6], images[6:10], images[10:]


@functools.cache
def toy_detector() -> PatchCore:
    """Fitted on the toy normals; threshold: the median score of the toy test images."""
    train, good, bad = toy_images()
    det = PatchCore(
        image_size=64,
        coreset_ratio=0.25,
        progress=False,
        num_neighbors=3,
        search_precision="float32",
    )
    det.fit(train)
    det.set_threshold(float(np.median(det.score_samples(good + bad))))
    return det


@functools.cache
def toy_export() -> Path:
    """:func:`toy_detector` exported to ONNX (a folder removed at exit)."""
    from patchcore.core.export import export

    folder = Path(tempfile.mkdtemp(prefix="patchcore-service-export-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    export(toy_detector(), folder / "export", format="onnx")
    return folder / "export"
