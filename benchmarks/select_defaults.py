"""Choose defaults (image size, layers, backbone, coreset ratio, smoothing) by measurement.

Runs a grid of configurations on every real set in ../shared/data with seeded subsets and
writes one JSON line per (set, configuration) to benchmarks/out/defaults.jsonl, then prints a
table. Usage: python benchmarks/select_defaults.py [--grid size|layers|backbone|ratio|sigma]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (
    ROOT,
    SETS,
    image_metrics,
    machine,
    pixel_metrics,
    subsets,
    write_results_section,
)

from patchcore import PatchCore

GRIDS: dict[str, list[dict]] = {
    # resolution: native vs fixed sizes (lite0, default layers)
    "size": [{"image_size": 224}, {"image_size": 320}, {"image_size": None}],
    "layers": [
        {"layers": ["stage2", "stage3"]},
        {"layers": ["stage3", "stage4"]},
        {"layers": ["stage3", "stage5"]},
        {"layers": ["stage2", "stage3", "stage5"]},
    ],
    "backbone": [
        {"backbone": "efficientnet-lite0"},
        {"backbone": "efficientnet-lite1"},
        {"backbone": "efficientnet-lite2"},
    ],
    "ratio": [{"coreset_ratio": 0.01}, {"coreset_ratio": 0.1}, {"coreset_ratio": 0.25}],
    "neighbors": [{"num_neighbors": 1}, {"num_neighbors": 9}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grid", default="size", choices=sorted(GRIDS))
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--train", type=int, default=40, help="training images per set")
    ap.add_argument("--test", type=int, default=80, help="test images per set (stratified)")
    ap.add_argument("--base", default="{}", help="JSON of settings shared by the whole grid")
    ap.add_argument(
        "--table",
        action="store_true",
        help="only render benchmarks/out/defaults.jsonl into benchmarks/RESULTS.md",
    )
    args = ap.parse_args()
    if args.table:
        write_table(ROOT / "benchmarks" / "out" / "defaults.jsonl")
        return
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    base = json.loads(args.base)
    print(machine())
    for name in args.sets:
        train, test = subsets(name, args.train, args.test)
        for cfg in GRIDS[args.grid]:
            params = {"image_size": None, **base, **cfg}
            det = PatchCore(progress=False, **params)
            t0 = time.perf_counter()
            det.fit(train)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores, maps = det.score_with_maps(test)
            score_ms = (time.perf_counter() - t0) / len(test) * 1000
            row = {
                "set": name,
                "grid": args.grid,
                **params,
                "train": len(train),
                "test": len(test),
                "bank": int(det.memory_bank_.shape[0]),
                "fit_s": round(fit_s, 2),
                "coreset_s": round(det.coreset_seconds_, 2),
                "ms_per_image": round(score_ms, 1),
                **{k: round(v, 4) for k, v in image_metrics(test, scores).items()},
                **{k: round(v, 4) for k, v in pixel_metrics(test, maps).items()},
            }
            print(json.dumps(row), flush=True)
            with open(out / "defaults.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


def write_table(jsonl: Path) -> None:
    """Render the measured grid rows as a markdown section of RESULTS.md."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    keys = ("image_size", "layers", "backbone", "coreset_ratio", "num_neighbors", "sampling")
    lines = [
        "## Choosing the defaults (`benchmarks/select_defaults.py`)",
        "",
        f"{machine()}; machine shared with other jobs (load average about 6 on 2 cores), so the "
        "seconds are inflated and only comparable within a row group. efficientnet-lite0, "
        "seeded subsets: 40 training images, 60-80 stratified test images per set; "
        "`image_size` None = native resolution. `sampling=random` rows use a random bank "
        "instead of the greedy coreset to keep the grid affordable.",
        "",
        "| grid | set | setting | bank | image AUROC | F1 | pixel AUROC | AUPRO | ms/image |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        setting = ", ".join(
            f"{k}={'+'.join(r[k]) if isinstance(r[k], list) else r[k]}" for k in keys if k in r
        )
        ms = r.get("ms_per_image", r.get("ms_per_image_x2", 0) / 2)
        pix = " | ".join(f"{r[k]:.3f}" if k in r else "—" for k in ("pixel_auroc", "aupro"))
        lines.append(
            f"| {r['grid']} | {r['set']} | {setting} | {r['bank']} | {r['image_auroc']:.3f} | "
            f"{r['f1_max']:.3f} | {pix} | {ms:.0f} |"
        )
    write_results_section("defaults", "\n".join(lines))


if __name__ == "__main__":
    main()
