"""The int8 scan against the bfloat16 one, per patch and in the fit's repair scan (issue #24).

``patches``: each set's default model (``benchmarks/out/models/{set}-all.pt``, as
``bench_export.py`` fits it) on ``--images`` test images spread over the sorted list: the
share of patches for which the int8 scan finds the nearest bank row, the mean and 99th
percentile of its excess over the float32 distance, the bfloat16 estimates' mean and largest
relative error, and ``patch_scores_groups`` time per image in both precisions (median of 5);
``--clamp P`` also builds the table with its scale at the P-quantile of the bank's elements
instead of their maximum (the outliers clamped), for the same share and excess.

``repair``: ``repair_bounds`` (the fit's repair scan) on magnetic_tile-sized synthetic rows
(1.29 M float16 rows of 168 features around 64 centres, 11,600 bank rows), bfloat16 and int8
alternating ``--repeats`` times; medians.

    python benchmarks/bench_int8_scan.py patches [--sets ...] [--images 8] [--clamp 0.999 0.9999]
    python benchmarks/bench_int8_scan.py repair [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import DATA, ROOT, machine

from patchcore import PatchCore
from patchcore.core import search
from patchcore.core.embedding import flatten_patches
from patchcore.core.images import as_tensor
from patchcore.core.sampling import stages

MODELS = ROOT / "benchmarks" / "out" / "models"


def _median_ms(fn, n: int = 5) -> float:  # noqa: ANN001
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def patches(name: str, images: int, clamps: list[float]) -> None:
    det = PatchCore.load(MODELS / f"{name}-all.pt")
    bank = det.memory_bank_.float()
    files = sorted(p for p in (DATA / name / "test").rglob("*") if p.is_file())
    files = files[:: max(1, len(files) // images)][:images]
    groups = []
    for f in files:
        with torch.inference_mode():
            emb = det._embed(as_tensor(f)[None])
        groups.append(flatten_patches(emb).float().view(1, -1, emb.shape[1]))
    q = torch.cat([g[0] for g in groups])
    exact = search.NearestNeighborIndex(bank).exact_min_distances(q)
    row: dict = {"bench": "int8-patches", "set": name, "images": len(files)}
    for precision in ("bfloat16", "int8"):
        index = search.NearestNeighborIndex(bank, precision=precision)
        ms = _median_ms(lambda index=index: search.patch_scores_groups(index, groups, 10))
        row[f"{precision}_search_ms_per_image"] = round(ms / len(files), 1)
        got = index.min_distances(q)
        rel = (got - exact) / exact
        if precision == "int8":
            row["int8_nearest_share"] = round(float((rel < 1e-5).float().mean()), 4)
            row["int8_excess_mean"] = float(rel.mean())
            row["int8_excess_p99"] = float(rel.quantile(0.99))
        else:
            row["bf16_error_mean"] = float(rel.abs().mean())
            row["bf16_error_max"] = float(rel.abs().max())
    centred = bank - bank.mean(0)
    for p in clamps:
        top = float(torch.quantile(centred.abs().flatten()[::7], p))
        index = search.NearestNeighborIndex(bank, precision="int8")
        # quantising ``centred`` at top / 127 is quantising this stretch at its maximum / 127
        table = search.Int8Table(centred * (float(centred.abs().max()) / top))
        table.centred, table.scale = centred, top / 127.0
        index._int8 = table
        rel = (index.min_distances(q) - exact) / exact
        row[f"clamp_{p}_nearest_share"] = round(float((rel < 1e-5).float().mean()), 4)
        row[f"clamp_{p}_excess_mean"] = float(rel.mean())
    print(json.dumps({**row, "machine": machine()}), flush=True)


def repair(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 168, generator=gen) * 3
    pick = torch.randint(0, 64, (1_290_499,), generator=gen)
    x = (centres[pick] + torch.randn(1_290_499, 168, generator=gen)).half()
    bank = x[torch.randperm(x.shape[0], generator=gen)[:11_600]].float()
    real = stages.resolve_precision
    times: dict[str, list[float]] = {"bfloat16": [], "int8": []}
    try:
        for _ in range(repeats):
            for precision in times:
                stages.resolve_precision = lambda *a, p=precision, **k: p
                t0 = time.perf_counter()
                stages.repair_bounds(x, bank)
                times[precision].append(time.perf_counter() - t0)
    finally:
        stages.resolve_precision = real
    medians = {k: round(float(np.median(v)), 1) for k, v in times.items()}
    print(json.dumps({"bench": "int8-repair", "seconds": medians, "machine": machine()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("patches", "repair"))
    ap.add_argument("--sets", nargs="+", default=["deeppcb", "magnetic_tile", "casting"])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--clamp", nargs="*", type=float, default=[])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.what == "repair":
        repair(args.repeats)
        return
    for name in args.sets:
        patches(name, args.images, args.clamp)


if __name__ == "__main__":
    main()
