"""Paired cost of configurations on the user's path: fit s, ms per image, fit peak memory.

Each configuration runs ``evaluate_sets.py`` (``PatchCore`` fitted on the training images, the
test images scored with native-size maps) in its own process, so peak RSS is its own; the
configurations alternate round by round (A B C, B C A, ...) so that each ratio to the first
configuration compares runs made under the same load. On a shared machine the seconds are
inflated, the ratios much less: each row carries the load average at its end. Rows go to
``benchmarks/out/cost_rows.jsonl``; ``--table`` writes the RESULTS.md section. Usage::

    python benchmarks/bench_cost.py --sets casting deeppcb --train 100 --test 60 --rounds 2 \\
        --configs '{"name": "lite0"}' '{"name": "lite2", "backbone": "efficientnet-lite2"}'
    python benchmarks/bench_cost.py --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
from common import ROOT, append_row, machine, write_results_section

OUT = ROOT / "benchmarks" / "out"
ROWS = OUT / "cost_rows.jsonl"


def run(name: str, config: dict, train: int | None, test: int | None, tag: str) -> dict:
    params = {k: v for k, v in config.items() if k != "name"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "evaluate_sets.py"), "--sets", name]
    cmd += ["--params", json.dumps(params), "--tag", tag, "--no-write"]
    cmd += ["--train", str(train)] if train else []
    cmd += ["--test", str(test)] if test else []
    subprocess.run(cmd, check=True, cwd=ROOT / "benchmarks", stdout=subprocess.DEVNULL)
    row = json.loads((OUT / f"evaluate_{tag}_{name}_s0.json").read_text())
    keep = ("train", "test", "bank", "fit_s", "feature_s", "coreset_s", "ms_per_image")
    return {
        "set": name,
        "config": config["name"],
        "params": params,
        **{k: row[k] for k in keep},
        "fit_peak_rss_mb": row["fit_peak_rss_mb"],
        "image_auroc": row["image_auroc"],
    }


def table() -> str:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    base = rows[0]["config"]
    lines = [
        "## Paired cost of the leads (`benchmarks/bench_cost.py`)",
        "",
        f"Machine: {machine()}; rows {rows[0]['date']} to {rows[-1]['date']} UTC, 1-min load "
        f"{min(float(r['load'].split()[0]) for r in rows):.1f}-"
        f"{max(float(r['load'].split()[0]) for r in rows):.1f} (2 cores shared with other "
        "sessions: seconds inflated; the ratios compare runs alternated under the same load). "
        "Each run: one process, `PatchCore` fitted on the training images, test images scored "
        "with native-size maps (`evaluate_sets.py`); medians over rounds; x = the median of the "
        f"round-by-round ratios to `{base}`.",
        "",
        "| set | config | train / test | rounds | fit s (x) | ms/image (x) | fit peak RSS MiB "
        "(x) | image AUROC |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        ref = {r["round"]: r for r in mine if r["config"] == base}
        for config in dict.fromkeys(r["config"] for r in mine):
            rs = [r for r in mine if r["config"] == config]

            def cell(key: str, rs=rs, ref=ref) -> str:
                ratio = [r[key] / ref[r["round"]][key] for r in rs if r["round"] in ref]
                return f"{np.median([r[key] for r in rs]):.1f} ({np.median(ratio):.2f})"

            lines.append(
                f"| {name} | {config} | {rs[0]['train']} / {rs[0]['test']} | {len(rs)} | "
                f"{cell('fit_s')} | {cell('ms_per_image')} | {cell('fit_peak_rss_mb')} | "
                f"{rs[0]['image_auroc']:.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=["casting"])
    ap.add_argument("--configs", nargs="*", default=[], help="JSON: name + PatchCore params")
    ap.add_argument("--train", type=int, default=None)
    ap.add_argument("--test", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        write_results_section("accuracy-cost", table())
        return
    configs = [json.loads(c) for c in args.configs]
    for k in range(args.rounds):
        order = configs[k % len(configs) :] + configs[: k % len(configs)]
        for name in args.sets:
            for config in order:
                row = run(name, config, args.train, args.test, tag=f"cost-{config['name']}")
                row["round"] = k
                print(json.dumps(append_row(ROWS, row)), flush=True)


if __name__ == "__main__":
    main()
