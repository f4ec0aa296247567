"""Accuracy and speed of the default detector on every real set: fit on train/good, score test/.

Writes benchmarks/out/evaluate_<set>.json and the table between the ``accuracy`` markers of
benchmarks/RESULTS.md. Usage:

    python benchmarks/evaluate_sets.py [--sets deeppcb casting] [--train N] [--test N] \
        [--params '{"coreset_ratio": 0.01}']
"""

from __future__ import annotations

import argparse
import json
import time

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

from patchcore import PatchCore


def run(name: str, n_train: int | None, n_test: int | None, params: dict) -> dict:
    train, test = subsets(name, n_train, n_test)
    det = PatchCore(progress=True, **params)
    det.fit(train)
    t0 = time.perf_counter()
    scores, maps = det.score_with_maps(test)
    ms = (time.perf_counter() - t0) / len(test) * 1000
    row = {
        "set": name,
        "train": len(train),
        "test": len(test),
        "params": params,
        "bank": int(det.memory_bank_.shape[0]),
        "feature_s": round(det.feature_seconds_, 1),
        "coreset_s": round(det.coreset_seconds_, 1),
        "ms_per_image": round(ms, 1),
        "peak_rss_mb": round(peak_rss_mb()),
        **{k: round(v, 4) for k, v in image_metrics(test, scores).items()},
        **{k: round(v, 4) for k, v in pixel_metrics(test, maps).items()},
    }
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / f"evaluate_{name}.json").write_text(json.dumps(row, indent=1))
    return row


def table(rows: list[dict], header: str) -> str:
    cols = [
        ("set", "set"),
        ("train", "train imgs"),
        ("test", "test imgs"),
        ("params", "settings"),
        ("bank", "bank"),
        ("image_auroc", "image AUROC"),
        ("f1_max", "F1 (max-F1 thr.)"),
        ("pixel_auroc", "pixel AUROC"),
        ("aupro", "AUPRO"),
        ("feature_s", "features s"),
        ("coreset_s", "coreset s"),
        ("ms_per_image", "ms/image"),
        ("peak_rss_mb", "peak RSS MiB"),
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
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--train", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--test", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--params", default="{}", help="JSON of PatchCore settings, per set or shared")
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
        rows = [json.loads((out / f"evaluate_{n}.json").read_text()) for n in args.sets]
    for name in [] if args.table_only else args.sets:
        p = params.get(name, params) if isinstance(params.get(name), dict) else params
        p = {k: v for k, v in p.items() if k not in SETS}
        row = run(name, args.train, args.test, p)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.no_write:
        return
    header = (
        "## Accuracy of the defaults on the real sets (`benchmarks/evaluate_sets.py`)\n\n"
        f"Machine: {machine()}. Fit on train/good, score test/ (all images unless a count is "
        "given); F1 is at the max-F1 threshold chosen on the same scores (an upper bound, not a "
        "held-out figure); pixel metrics over images with masks, 2,000 thresholds. Training images "
        "are seeded random subsets of train/good. Seconds were measured while other jobs shared "
        "the 2 cores (load average 5-7): they are inflated, not a speed claim."
    )
    write_results_section("accuracy", table(rows, header))


if __name__ == "__main__":
    main()
