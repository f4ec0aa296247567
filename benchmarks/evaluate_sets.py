"""Accuracy and speed of the default detector on every real set: fit on train/good, score test/.

The path users take: the defaults, every training image, native resolution, every test image.
Each seed refits (the seed moves the coreset's starts); the table shows each seed's row and the
mean with its spread. Writes benchmarks/out/evaluate_<set>_s<seed>.json and the table between the
``accuracy`` markers of benchmarks/RESULTS.md. Usage:

    python benchmarks/evaluate_sets.py [--sets deeppcb casting] [--seeds 0 1 2] [--train N] \
        [--test N] [--params '{"coreset_ratio": 0.01}'] [--tag defaults]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from common import (
    ROOT,
    SETS,
    image_metrics,
    machine,
    peak_rss_mb,
    pixel_metrics,
    subsets,
    write_results_section,
)
from lower_bound import detector_bounds, precision_rates

from patchcore import PatchCore


def run(name: str, n_train: int | None, n_test: int | None, params: dict, seed: int, tag: str):
    train, test = subsets(name, n_train, n_test)
    det = PatchCore(progress=True, seed=seed, **params)
    t0 = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - t0
    fit_rss = peak_rss_mb()
    t0 = time.perf_counter()
    scores, maps = det.score_with_maps(test)
    ms = (time.perf_counter() - t0) / len(test) * 1000
    bound = lower_bound(det, [m.shape for m in maps])
    row = {
        "set": name,
        "tag": tag,
        "seed": seed,
        "train": len(train),
        "test": len(test),
        "params": params,
        "bank": int(det.memory_bank_.shape[0]),
        "fit_s": round(fit_s, 1),
        "feature_s": round(det.feature_seconds_, 1),
        "coreset_s": round(det.coreset_seconds_, 1),
        "ms_per_image": round(ms, 1),
        "bound_ms": round(bound, 1),
        "over_bound": round(ms / bound, 2),
        "search_precision": det._index.precision,
        "fit_peak_rss_mb": round(fit_rss),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        **{k: round(v, 4) for k, v in image_metrics(test, scores).items()},
        **{k: round(v, 4) for k, v in pixel_metrics(test, maps).items()},
    }
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    out = ROOT / "benchmarks" / "out" / f"evaluate_{tag}_{name}_s{seed}.json"
    out.write_text(json.dumps(row, indent=1))
    return row


def lower_bound(det: PatchCore, sizes: list[tuple[int, int]]) -> float:
    """Mean arithmetic lower bound (benchmarks/lower_bound.py) over the scored images, ms, at
    the median matmul rates of this moment."""
    rates = precision_rates()
    return float(np.mean([b["bound_ms"] for b in detector_bounds(det, sizes, rates)]))


def table(rows: list[dict], header: str) -> str:
    cols = [
        ("set", "set"),
        ("seed", "seed"),
        ("train", "train imgs"),
        ("test", "test imgs"),
        ("params", "settings"),
        ("bank", "bank"),
        ("image_auroc", "image AUROC"),
        ("f1_max", "F1 (max-F1 thr.)"),
        ("pixel_auroc", "pixel AUROC"),
        ("aupro", "AUPRO"),
        ("fit_s", "fit s"),
        ("feature_s", "features s"),
        ("coreset_s", "coreset s"),
        ("ms_per_image", "ms/image (batched)"),
        ("bound_ms", "lower bound ms"),
        ("over_bound", "x bound"),
        ("fit_peak_rss_mb", "fit peak RSS MiB"),
        ("load", "load avg after"),
    ]
    lines = [header, "", "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key, "—")
            if key == "params":
                v = ", ".join(f"{k}={w}" for k, w in v.items()) or "defaults"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    for name in dict.fromkeys(r["set"] for r in rows):
        group = [r for r in rows if r["set"] == name]
        if len(group) < 2:
            continue
        cells = []
        for key, _ in cols:
            vals = [r[key] for r in group if isinstance(r.get(key), (int, float))]
            if key == "set":
                cells.append(f"**{name} mean**")
            elif key == "seed":
                cells.append(f"{len(group)} seeds")
            elif key in SPREAD and vals:
                cells.append(f"**{np.mean(vals):.4f}** ± {(max(vals) - min(vals)) / 2:.4f}")
            elif key in ("fit_s", "ms_per_image", "coreset_s") and vals:
                cells.append(f"{np.median(vals):.1f} (median)")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPREAD = ("image_auroc", "f1_max", "pixel_auroc", "aupro")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--train", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--test", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--params", default="{}", help="JSON of PatchCore settings, per set or shared")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="coreset seeds (refits)")
    ap.add_argument("--tag", default="defaults", help="names the saved rows")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="write RESULTS.md from the saved benchmarks/out/evaluate_<set>.json of --sets",
    )
    args = ap.parse_args()
    params = json.loads(args.params)
    rows = []
    if args.table_only:
        out = ROOT / "benchmarks" / "out"
        rows = [
            json.loads((out / f"evaluate_{args.tag}_{n}_s{seed}.json").read_text())
            for n in args.sets
            for seed in args.seeds
        ]
    for name in [] if args.table_only else args.sets:
        p = params.get(name, params) if isinstance(params.get(name), dict) else params
        p = {k: v for k, v in p.items() if k not in SETS}
        for seed in args.seeds:
            row = run(name, args.train, args.test, p, seed, args.tag)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.no_write:
        return
    header = (
        "## Defaults on full data (`benchmarks/evaluate_sets.py`)\n\n"
        f"Machine: {machine()}. The path users take: the defaults, every image of train/good, "
        "native resolution, every test image, one process per run (fit, then batched scoring "
        "with maps at each image's own size). F1 is at the max-F1 threshold chosen on the same "
        "scores (an upper bound, not a held-out figure); pixel metrics over images with masks, "
        "2,000 thresholds. Fit s is wall time of `fit` (features + coreset); the load average "
        "(1/5/15 min) after each run shows how busy the 2 cores were."
    )
    write_results_section("accuracy", table(rows, header))


if __name__ == "__main__":
    main()
