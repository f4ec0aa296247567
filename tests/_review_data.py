"""Small real review sets for tests/test_review*.py: a magnetic_tile subset (links, nothing
copied) with its ground-truth masks, one file that is not an image, and two tiny models fitted
in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import data_set, link_first

from patchcore.core.detector import PatchCore

DEFECTS = ("blowhole", "crack", "break")


def review_set(root: Path, normal: int = 6, per_defect: int = 2) -> Path:
    """``root/data``: ``good/`` (``normal`` images and a broken file), ``per_defect`` images of
    each of :data:`DEFECTS` and their masks in ``ground_truth/``."""
    src = data_set("magnetic_tile")
    data = root / "data"
    link_first(src / "test" / "good", data / "good", normal)
    for d in DEFECTS:
        files = link_first(src / "test" / d, data / d, per_defect)
        for f in files:
            mask = src / "ground_truth" / d / f"{f.stem}_mask.png"
            (data / "ground_truth" / d).mkdir(parents=True, exist_ok=True)
            (data / "ground_truth" / d / mask.name).symlink_to(mask)
    (data / "good" / "zz_broken.png").write_bytes(b"this is not an image")
    return data


def tiny_model(path: Path, image_size: int = 96, train: int = 5) -> Path:
    """A small model on magnetic_tile training images; threshold at the largest training
    score (so that some normal test images are false positives)."""
    src = data_set("magnetic_tile") / "train" / "good"
    images = sorted(src.iterdir())[:train]
    det = PatchCore(
        backbone="efficientnet-lite0", image_size=image_size, coreset_ratio=0.1, progress=False
    ).fit(images)
    det.set_threshold(float(np.max(det.score_samples(images))), method="max of training scores")
    return det.save(path)
