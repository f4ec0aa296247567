"""The default region cut: how many images judged anomalous have no region of their own.

An anomalous record always shows a region (:func:`patchcore.lean.record.verdict_regions` falls
back to the map's peak region); this counts how often that fallback is needed, at the old
default cut (the image threshold, on the score's scale) and at the map-scale cut chosen at
calibration (``threshold x map_scale_``, :mod:`patchcore.core.calibration`).

Per set: fit the defaults on ``--train`` normal images, split the test images per label in
halves (seed 0), calibrate (max F1) on one half, inspect the other. Usage:

    python benchmarks/bench_region_cut.py [--sets casting magnetic_tile] [--train 30]
        [--sizes native 224]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import DATA, ROOT, append_row, machine, write_results_section

from patchcore import PatchCore
from patchcore.core.datasets import load_folder, sample_fraction, split_each_label
from patchcore.lean.record import ANOMALOUS
from patchcore.lean.regions import DEFAULT_MIN_AREA, label_regions

OUT = ROOT / "benchmarks" / "results" / "region_cut.jsonl"


def run(name: str, n_train: int, size: int | None) -> dict:
    train = load_folder(DATA / name, "train")
    train = sample_fraction(train, min(1.0, n_train / len(train)), seed=0)
    calib, test = split_each_label(load_folder(DATA / name, "test"), 0.5, seed=0)
    det = PatchCore(image_size=size, progress=False).fit(train)
    t0 = time.perf_counter()
    det.calibrate(calib.images, calib.labels)
    records = det.inspect(test.images)
    seconds = time.perf_counter() - t0
    flagged = [r for r in records if r.verdict == ANOMALOUS]

    def fallbacks(cut: float) -> int:
        return sum(
            not label_regions(r.anomaly_map, cut, min_area=DEFAULT_MIN_AREA) for r in flagged
        )

    return {
        "set": name,
        "size": "native" if size is None else size,
        "train": len(train),
        "calibration": len(calib),
        "test": len(test),
        "flagged": len(flagged),
        "threshold": det.threshold_,
        "map_scale": det.map_scale_,
        "cut": det.region_cut(),
        "fallback_at_threshold": fallbacks(float(det.threshold_)),
        "fallback_at_cut": fallbacks(det.region_cut()),
        "flagged_without_region": sum(not r.regions for r in flagged),
        "normal_with_region": sum(bool(r.regions) for r in records if r.verdict == "normal"),
        "seconds": round(seconds, 1),
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["casting", "magnetic_tile"])
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--sizes", nargs="+", default=["native", "224"])
    args = ap.parse_args()
    for name in args.sets:
        for size in args.sizes:
            row = append_row(OUT, run(name, args.train, None if size == "native" else int(size)))
            print(row, flush=True)
    latest = {}  # the newest row of every (set, size, train) measured so far
    for line in OUT.read_text().splitlines():
        row = json.loads(line)
        latest[(row["set"], str(row["size"]), row["train"])] = row
    rows = list(latest.values())
    lines = [
        "Flagged test images that need the peak-region fallback (no region of >= 16 pixels at "
        "the cut), at the image threshold (the old default cut) and at the calibrated map-scale "
        "cut `threshold x map_scale_`. `python benchmarks/bench_region_cut.py`.",
        "",
        "| set | size | train / calib / test | flagged | fallback at threshold | fallback at "
        "cut | map_scale | load | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['size']} | {r['train']} / {r['calibration']} / {r['test']} | "
            f"{r['flagged']} | {r['fallback_at_threshold']} | {r['fallback_at_cut']} | "
            f"{r['map_scale']:.4f} | {r['load']} | {r['date']} |"
        )
    lines.append(f"\nMachine: {rows[0]['machine']}." if rows else "")
    write_results_section("region-cut", "\n".join(lines))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
