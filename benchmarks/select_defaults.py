"""Choose defaults (image size, layers, backbone, coreset ratio, smoothing) by measurement.

Runs a grid of configurations on every real set in ../shared/data with seeded subsets and
writes one JSON line per (set, configuration) to benchmarks/out/defaults.jsonl, then prints a
table. Usage: python benchmarks/select_defaults.py [--grid size|layers|backbone|ratio|sigma]
"""

from __future__ import annotations

import argparse
import json
import time

from common import ROOT, SETS, image_metrics, machine, pixel_metrics, subsets

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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
