"""Coreset selection at real size: the linear-time chunked greedy against the exact greedy.

Every training image of a shared set at native resolution, the default features; the same cached
features for every method. Reports selection seconds, the coverage radius (largest distance from
any training patch to the bank, computed exactly in float32) and image AUROC on every test image
(max patch score with the paper's reweighting, exact float32 search). Features are extracted once
per set and cached in benchmarks/out/features/<set>.pt. Usage:

    python benchmarks/bench_coreset_scale.py --sets casting magnetic_tile deeppcb \\
        --methods exact chunked random [--ratio 0.01] [--seeds 0] [--param oversample=5]

Rows are appended to benchmarks/out/coreset_scale.jsonl; --table writes the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import ROOT, append_row, machine, subsets, write_results_section

from patchcore import PatchCore
from patchcore.core import sampling
from patchcore.core.embedding import flatten_patches
from patchcore.core.metrics import auroc
from patchcore.core.search import NearestNeighborIndex

OUT = ROOT / "benchmarks" / "out"
ROWS = OUT / "coreset_scale.jsonl"


def cached_features(name: str) -> dict:
    path = OUT / "features" / f"{name}.pt"
    if path.exists():
        return torch.load(path)
    train, test = subsets(name, None, None)
    det = PatchCore(progress=False).fit(train[:1])
    out: dict = {}
    for split, ds in (("train", train), ("test", test)):
        feats, counts = [], []
        for b in det._batches(list(ds.images), "raise", True, split):
            emb = det._embed(b.pixels)
            feats.append(flatten_patches(emb).to(torch.float16))
            counts += [emb.shape[2] * emb.shape[3]] * emb.shape[0]
        out[split], out[split + "_counts"] = torch.cat(feats), torch.tensor(counts)
    out["labels"] = torch.tensor(test.labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def image_scores(bank: torch.Tensor, test: torch.Tensor, counts: list[int], k: int = 9):
    """Max patch distance with eq. 7's reweighting (as the detector), exact float32 search."""
    index = NearestNeighborIndex(bank)
    step = 65536
    dist = torch.cat([index.min_distances(test[i : i + step]) for i in range(0, len(test), step)])
    out, lo = [], 0
    for c in counts:
        a = int(dist[lo : lo + c].argmax())
        worst = test[lo + a].float()[None]
        nearest = bank[index.search(worst, 1)[1][:, 0]]
        d = torch.linalg.vector_norm(worst[:, None] - bank[index.search(nearest, k)[1]], dim=-1)
        out.append(float((1 - torch.softmax(d, 1)[:, 0]) * dist[lo + a]))
        lo += c
    return np.array(out)


def run(name: str, method: str, ratio: float, seed: int, params: dict) -> dict:
    f = cached_features(name)
    x = f["train"]
    n = sampling.coreset_size(x.shape[0], ratio)
    t0 = time.perf_counter()
    if method == "exact":
        idx = sampling.greedy_coreset(x, n, seed=seed)
    elif method == "chunked":
        idx = sampling.chunked_greedy_coreset(x, n, seed=seed, **params).indices
    else:
        idx = sampling.random_subsample(x.shape[0], n, seed=seed)
    seconds = time.perf_counter() - t0
    scores = image_scores(x[idx].float(), f["test"], f["test_counts"].tolist())
    row = {
        "set": name,
        "method": method,
        "params": params,
        "ratio": ratio,
        "seed": seed,
        "patches": int(x.shape[0]),
        "bank": n,
        "select_s": round(seconds, 1),
        "coverage": round(sampling.coverage_radius(x, idx), 3),
        "image_auroc": round(auroc(f["labels"].numpy(), scores), 4),
    }
    return append_row(ROWS, row)


def table() -> str:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    lines = [
        "## Coreset at real size: chunked greedy vs exact greedy "
        "(`benchmarks/bench_coreset_scale.py`)",
        "",
        f"Machine: {machine()}; selection on one thread (the greedy's own setting), the repair "
        "scan on two. All training images at native resolution, coreset ratio 0.01, the same "
        "cached float16 features for every method; coverage radius computed exactly; image "
        "AUROC over every test image with exact float32 search and eq. 7 reweighting.",
        "",
        "| set | patches | bank | method | settings | seed | select s | coverage radius | "
        "image AUROC | load after |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "defaults"
        lines.append(
            f"| {r['set']} | {r['patches']:,} | {r['bank']:,} | {r['method']} | {p} | {r['seed']} "
            f"| {r['select_s']} | {r['coverage']} | {r['image_auroc']} | {r['load']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=["casting", "magnetic_tile", "deeppcb"])
    ap.add_argument("--methods", nargs="*", default=["chunked", "exact"])
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--param", action="append", default=[], help="chunked option, name=value")
    ap.add_argument("--table", action="store_true", help="write RESULTS.md from the saved rows")
    args = ap.parse_args()
    params = {k: float(v) for k, v in (p.split("=") for p in args.param)}
    if args.table:
        write_results_section("coreset-scale", table())
        return
    torch.set_num_threads(2)
    for name in args.sets:
        for method in args.methods:
            for seed in args.seeds:
                print(json.dumps(run(name, method, args.ratio, seed, params)), flush=True)


if __name__ == "__main__":
    main()
