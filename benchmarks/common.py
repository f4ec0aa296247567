"""Shared helpers for the benchmark scripts: data subsets, evaluation, machine facts."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import time
from pathlib import Path

import numpy as np
import torch

from patchcore.core.datasets import (
    ImageDataset,
    load_folder,
    load_mask,
    sample_fraction,
    split_each_label,
)
from patchcore.core.metrics import anomaly_threshold, aupro, auroc, evaluate, pixel_auroc

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ("deeppcb", "magnetic_tile", "casting")


def subsets(name: str, n_train: int | None, n_test: int | None, seed: int = 0):
    """(train, test) of a real set; seeded stratified subsets when counts are given."""
    train = load_folder(DATA / name, "train")
    test = load_folder(DATA / name, "test")
    if n_train is not None and n_train < len(train):
        train = sample_fraction(train, n_train / len(train), seed=seed)
    if n_test is not None and n_test < len(test):
        test, _ = split_each_label(test, n_test / len(test), seed=seed)
    return train, test


def image_metrics(test: ImageDataset, scores: np.ndarray) -> dict[str, float]:
    y = test.labels
    t = anomaly_threshold(y, scores, "max_f1")
    ev = evaluate(scores >= t, y)
    return {"image_auroc": auroc(y, scores), "f1_max": ev["F1Score"]}


def pixel_metrics(test: ImageDataset, maps: list[np.ndarray]) -> dict[str, float]:
    """Pixel AUROC and AUPRO over images with a known mask (normals: empty masks)."""
    masks, kept = [], []
    for s, m in zip(test, maps, strict=True):
        mask = load_mask(s, m.shape)
        if mask is not None:
            masks.append(mask)
            kept.append(m)
    if not any(m.any() for m in masks):
        return {}
    return {
        "pixel_auroc": pixel_auroc(masks, kept, num_thresholds=2000),
        "aupro": aupro(masks, kept, num_thresholds=2000),
    }


def median_seconds(fn, repeats: int, warmup: int = 2, stat=np.median) -> float:  # noqa: ANN001
    """Median wall seconds of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls
    (``stat=min``: the fastest call instead)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(stat(times))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__} CPU, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
    )


def write_results_section(name: str, body: str) -> None:
    """Replace (or append) the ``<!-- name:start -->`` ... ``<!-- name:end -->`` section."""
    results = ROOT / "benchmarks" / "RESULTS.md"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


def append_row(path: Path, row: dict) -> dict:
    """Add the load average and date to ``row`` and append it to the JSON-lines file ``path``."""
    row["load"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    row["date"] = time.strftime("%Y-%m-%d %H:%M")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row
