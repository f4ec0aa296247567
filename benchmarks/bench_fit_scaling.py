"""Fit time and memory against the number of training images, at the defaults.

Each configuration fits in a fresh process (peak RSS = that process's ``ru_maxrss``): seeded
shares of train/good at native resolution, the default detector. Usage:

    python benchmarks/bench_fit_scaling.py --sets magnetic_tile deeppcb --fractions 0.25 0.5 1

Rows go to benchmarks/out/fit_scaling.jsonl; --table writes the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import ROOT, append_row, machine, write_results_section

ROWS = ROOT / "benchmarks" / "out" / "fit_scaling.jsonl"
CHILD = """
import json, sys, time, resource
sys.path.insert(0, {bench!r})
from common import subsets
from patchcore import PatchCore
train, _ = subsets({name!r}, None, None)
from patchcore.core.datasets import sample_fraction
if {fraction} < 1:
    train = sample_fraction(train, {fraction}, seed=0)
t0 = time.perf_counter()
det = PatchCore(progress=False).fit(train)
print(json.dumps(dict(images=len(train), patches=det.n_train_patches_,
    bank=int(det.memory_bank_.shape[0]), fit_s=round(time.perf_counter() - t0, 1),
    feature_s=round(det.feature_seconds_, 1), coreset_s=round(det.coreset_seconds_, 1),
    peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))))
"""


def run(name: str, fraction: float) -> dict:
    code = CHILD.format(bench=str(ROOT / "benchmarks"), name=name, fraction=fraction)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    row = {"set": name, "fraction": fraction, **json.loads(out.strip().splitlines()[-1])}
    return append_row(ROWS, row)


def table() -> str:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    lines = [
        "## Fit time against training images (`benchmarks/bench_fit_scaling.py`)",
        "",
        f"Machine: {machine()}. The defaults at native resolution; one fresh process per row.",
        "",
        "| set | images | patches | bank | fit s | features s | coreset s | s per 100 images "
        "| peak RSS MiB | load after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        per = 100 * r["fit_s"] / r["images"]
        lines.append(
            f"| {r['set']} | {r['images']} | {r['patches']:,} | {r['bank']:,} | {r['fit_s']} "
            f"| {r['feature_s']} | {r['coreset_s']} | {per:.1f} | {r['peak_rss_mb']:,} "
            f"| {r['load']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=["magnetic_tile", "deeppcb"])
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    ap.add_argument("--table", action="store_true", help="write RESULTS.md from the saved rows")
    args = ap.parse_args()
    if args.table:
        write_results_section("fit-scaling", table())
        return
    for name in args.sets:
        for f in args.fractions:
            print(json.dumps(run(name, f)), flush=True)


if __name__ == "__main__":
    main()
