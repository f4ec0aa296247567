"""Scores and native maps of a few real images, written to an .npz (run by
tests/test_core_unchanged.py under two versions of the package: the same script, the same CPU).

Usage: python _unchanged_run.py OUT.npz DATA_ROOT. Only public API present in every version
compared: PatchCore(...).fit, score_with_maps, score_samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchcore import PatchCore

#: today's default backbone, named: the commit compared with defaulted to efficientnet-lite0
LITE2 = {"backbone": "efficientnet-lite2"}
LITE0 = {"backbone": "efficientnet-lite0"}
#: (name, data set, parameters beside the defaults); images: 4 training, 4 test (2 normal, 2 not)
CASES = (
    ("casting", "casting", LITE2),
    ("tile", "magnetic_tile", LITE2),  # native sizes differ image to image: one batch per size
    ("casting_lite0", "casting", LITE0),
    ("tile_lite0", "magnetic_tile", LITE0),
    ("casting_scaled", "casting", {**LITE0, "scale": 0.5}),  # the resize path
    ("tile_eq7", "magnetic_tile", {**LITE0, "top_k": 1}),  # the paper's max + eq. 7 score
)


def files(folder: Path, n: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())[:n]


def main(out: str, root: str) -> None:
    torch.set_num_threads(1)  # the same reductions in every run
    data = Path(root)
    found: dict[str, np.ndarray] = {}
    for name, folder, params in CASES:
        ds = data / folder
        train = files(ds / "train" / "good", 4)
        bad = sorted(d for d in (ds / "test").iterdir() if d.name != "good")[0]
        test = files(ds / "test" / "good", 2) + files(bad, 2)
        det = PatchCore(progress=False, **params).fit(train)
        arr = np.asarray(Image.open(test[0]))  # in-memory forms of the same image
        tensor = torch.from_numpy(np.array(arr)).float() / 255.0
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
        inputs = [*test, arr, Image.open(test[1]), tensor]
        scores, maps = det.score_with_maps(inputs)
        found[f"{name}.scores"] = scores
        found[f"{name}.single"] = det.score_samples(arr)  # one in-memory image, inline
        for i, m in enumerate(maps):
            found[f"{name}.map{i}"] = m
        found[f"{name}.bank"] = det.memory_bank_.numpy()
    np.savez(out, **found)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
