"""What the default top-10 image score costs against the paper's max + eq. 7, same model.

One detector per set fitted with the defaults on every training image; then the same test
images are scored with maps (the user's path) alternately at ``top_k=10`` and ``top_k=1``
(``set_params`` on the fitted model: the same bank, index and images), ``--rounds`` times each,
so that both see the same load; the table gives the medians, their ratio and how many patches
per image the bfloat16 search re-checked in float32 for each. Usage:

    python benchmarks/bench_top_k.py [--sets deeppcb casting] [--test 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from common import ROOT, machine, subsets, write_results_section

from patchcore import PatchCore
from patchcore.core import search
from patchcore.core.embedding import flatten_patches

OUT = ROOT / "benchmarks" / "out" / "top_k.jsonl"


def rechecked(det: PatchCore, images: list, k: int) -> float:
    """Mean patches per image that ``search.patch_scores(..., k)`` re-checks in float32."""
    counts = []
    original = det._index.exact_min_distances

    def counting(rows: torch.Tensor) -> torch.Tensor:
        counts.append(rows.shape[0])
        return original(rows)

    det._index.exact_min_distances = counting  # type: ignore[method-assign]
    try:
        for b in det._batches(images, "raise", False, "score"):
            emb = det._embed(b.pixels)
            n, _, h, w = emb.shape
            search.patch_scores(det._index, flatten_patches(emb).float().view(n, h * w, -1), k)
    finally:
        det._index.exact_min_distances = original  # type: ignore[method-assign]
    return sum(counts) / len(images)


def run(name: str, n_test: int, rounds: int) -> dict:
    train, test = subsets(name, None, n_test)
    det = PatchCore(progress=False).fit(train)
    images = list(test.images)
    det.score_with_maps(images[:8])  # warm-up
    times: dict[int, list[float]] = {10: [], 1: []}
    scores = {}
    for _ in range(rounds):
        for k in (10, 1):
            det.set_params(top_k=k)
            t0 = time.perf_counter()
            s, _ = det.score_with_maps(images)
            times[k].append((time.perf_counter() - t0) / len(images) * 1000)
            scores[k] = s
    row = {
        "set": name,
        "train": len(train),
        "test": len(images),
        "bank": int(det.memory_bank_.shape[0]),
        "precision": det._index.precision,
        "ms_top10": round(float(np.median(times[10])), 1),
        "ms_top1": round(float(np.median(times[1])), 1),
        "ratio": round(float(np.median(times[10]) / np.median(times[1])), 3),
        "rechecked_top10": round(rechecked(det, images, 10), 1),
        "rechecked_top1": round(rechecked(det, images, 1), 1),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "## The top-10 image score's cost (`benchmarks/bench_top_k.py`)",
        "",
        f"Machine: {machine()}. One model per set (defaults, every training image); the same "
        "test images scored with native-size maps alternately at top_k=10 and top_k=1 on that "
        "model, medians of the rounds; re-checked = patches per image the bfloat16 search "
        "re-computed in float32 (those that could be among the image's k largest).",
        "",
        "| set | train | test | bank | ms/image top_k=10 | top_k=1 | ratio | re-checked top-10 "
        "| top-1 | load at the end | date |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['train']} | {r['test']} | {r['bank']:,} | {r['ms_top10']} "
            f"| {r['ms_top1']} | {r['ratio']} | {r['rechecked_top10']} | {r['rechecked_top1']} "
            f"| {r['load']} | {r['date']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=["deeppcb", "magnetic_tile", "casting"])
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.sets:
        rows.append(run(name, args.test, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    write_results_section("top-k-cost", table(rows))


if __name__ == "__main__":
    main()
