"""Can triangle-inequality pruning make the exact searches cheaper? (issue #24: "less arithmetic")

Both of the product's large costs are exact nearest-row scans: scoring (every test patch against
the bank) and the coreset's repair stage (every training patch against the picks so far). An
exact scan may skip rows whose lower bound already exceeds a distance found, so this measures,
on the default models' real features, how much of each scan such bounds could skip:

- ``search SET``: the bank (of ``benchmarks/out/models/{SET}-all.pt``) cut into ``C`` k-means
  clusters (centre ``c``, radius ``r_c``; each row's distance ``rho_j`` to its centre); the test
  patches of ``--images`` seeded test images. Shares of the bank an exact search must still
  compute: ``row_oracle`` (rows with ``|d(q, c) - rho_j| < d*``, given the true nearest distance
  ``d*``: a floor for any such scheme), ``cluster_oracle`` (clusters with ``d(q, c) - r_c < d*``),
  and ``blocked`` (what a matrix-product implementation computes: blocks of ``--block``
  consecutive patches, each block scanning every cluster any of its patches needs, with the
  distance found in each patch's nearest cluster as its bound).
- ``repair SET``: stages 1 and 2 of the default coreset on every training image's features,
  then each row's triangle upper bound on its distance to the picks (through the chunk picks of
  its own chunk, whose distances to the picks are computed exactly) against the repair's own
  bfloat16 bounds: the share of rows whose bound cannot rule them out of the repair's
  candidates (the rows a pruned repair scan would still have to scan).

    python benchmarks/bench_pruning.py search casting [--clusters 256 1024]
    python benchmarks/bench_pruning.py repair casting

One JSON line per set and setting, with the machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
from common import DATA, ROOT, machine

from patchcore.core.detector import PatchCore
from patchcore.core.embedding import flatten_patches
from patchcore.core.images import as_tensor
from patchcore.core.sampling import stages

MODELS = ROOT / "benchmarks" / "out" / "models"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def kmeans(x: torch.Tensor, c: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """(c, D) Lloyd centres of (N, D) rows, seeded."""
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:c]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=c).clamp(min=1).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts, centres)
    return centres


def search(name: str, clusters: list[int], n_images: int, block: int) -> None:
    det = PatchCore.load(MODELS / f"{name}-all.pt")
    bank = det.memory_bank_.float()
    files = sorted(
        p for p in (DATA / name / "test").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    random.Random(0).shuffle(files)
    with torch.inference_mode():
        q = torch.cat([flatten_patches(det._embed(as_tensor(f)[None])) for f in files[:n_images]])
    mean = bank.mean(0)
    b, q = bank - mean, q.float() - mean
    d = torch.cdist(q, b)
    best = d.min(1).values
    for c in clusters:
        centres = kmeans(b, c)
        assign = torch.cdist(b, centres).argmin(1)
        rho = (b - centres[assign]).norm(dim=1)
        radius = torch.zeros(c).scatter_reduce_(0, assign, rho, "amax", include_self=False)
        sizes = torch.bincount(assign, minlength=c).float()
        dqc = torch.cdist(q, centres)
        row_oracle = ((dqc[:, assign] - rho).abs() < best[:, None]).float().mean()
        cluster_oracle = ((dqc - radius) < best[:, None]).float() @ sizes / len(b)
        blocked = []
        for lo in range(0, len(q), block):
            dq = dqc[lo : lo + block]
            first = torch.zeros(c, dtype=torch.bool)
            first[dq.argmin(1)] = True
            bound = d[lo : lo + block][:, first[assign]].min(1).values
            need = ((dq - radius) < bound[:, None]).any(0) | first
            blocked.append(float(need.float() @ sizes) / len(b))
        row = {
            "bench": "search",
            "set": name,
            "bank": len(b),
            "queries": len(q),
            "clusters": c,
            "row_oracle": round(float(row_oracle), 3),
            "cluster_oracle": round(float(cluster_oracle.mean()), 3),
            f"blocked_{block}": round(sum(blocked) / len(blocked), 3),
        }
        print(json.dumps({**row, "load": os.getloadavg()[0], "machine": machine()}), flush=True)


def repair(name: str) -> None:
    det = PatchCore()
    files = sorted((DATA / name / "train" / "good").iterdir())
    x = det.extract_features(files, progress=False).features
    num = x.shape[0]
    n = det.bank_size(num)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    union = stages.chunk_stage(x, stages.keep_fraction(num, n), starts=stages.chunk_starts(
        num, stages.CHUNK_ROWS, gen))  # fmt: skip
    n_repair = stages.repair_size(n, num)
    start = int(torch.randint(union.numel(), (1,), generator=gen).item())
    xu = x[union].float()
    picked = union[stages.union_greedy(xu, n - n_repair, start)]
    t1 = time.perf_counter()
    picks = x[picked].float()
    upper = stages.repair_bounds(x, picks)  # the scan a pruned repair would cut
    t2 = time.perf_counter()
    via = stages.exact_sq_distances(xu, picks).float().sqrt()  # chunk picks to the picks
    chunk_of = union // stages.CHUNK_ROWS
    tri = torch.empty(num)
    for j in range(-(-num // stages.CHUNK_ROWS)):
        lo = j * stages.CHUNK_ROWS
        mine = (chunk_of == j).nonzero().squeeze(1)
        part = x[lo : lo + stages.CHUNK_ROWS].float()
        tri[lo : lo + stages.CHUNK_ROWS] = (torch.cdist(part, xu[mine]) + via[mine]).amin(1)
    t3 = time.perf_counter()
    pool = stages.REPAIR_POOL * n_repair
    cut = upper.topk(pool).values[-1]  # the repair's candidates: bounds at least this
    row = {
        "bench": "repair",
        "set": name,
        "rows": num,
        "bank": n,
        "candidates": pool,
        "stages_1_2_s": round(t1 - t0, 1),
        "repair_scan_s": round(t2 - t1, 1),
        "triangle_bounds_s": round(t3 - t2, 1),
        "triangle_over_scan_median": round(
            float((tri / upper.clamp(min=1e-12).sqrt()).median()), 2
        ),
        "rows_still_to_scan": round(float((tri.square() >= cut).float().mean()), 3),
    }
    print(json.dumps({**row, "load": os.getloadavg()[0], "machine": machine()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("search", "repair"))
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--clusters", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--images", type=int, default=6, help="test images (search)")
    ap.add_argument("--block", type=int, default=64, help="patches per product block (search)")
    args = ap.parse_args()
    for name in args.sets:
        if args.mode == "search":
            search(name, args.clusters, args.images, args.block)
        else:
            repair(name)


if __name__ == "__main__":
    main()
