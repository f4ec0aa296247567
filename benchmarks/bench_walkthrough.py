"""The walkthrough of docs/matlab-example.md on a real set, through the CLI as a user runs it:
MATLAB's reference settings (scale 0.4, 20 % of the training images, compression ratio 0.1,
the largest patch distance as the image score) against this project's defaults (native
resolution, every training image, a 1 % bank, the mean of the 10 largest distances); both
calibrated at max F1 on half of the test images and evaluated on the other half.

    nice -n 19 env PYTHONPATH=src python benchmarks/bench_walkthrough.py \\
        --data ../shared/data/deeppcb --out /tmp/walkthrough [--backbone resnet18 --weights F]

Prints, per setting and step, the seconds and every stderr line that is a warning, then one
JSON line per setting (image AUROC, F1, FPR, FNR, threshold, bank rows, fit and scoring time)
with the machine's load, CPU and date. The backbone is the default (efficientnet-lite2;
efficientnet-lite0 before 2026-12-07) unless given (ResNet-18's ImageNet weights are not
reachable on the project's machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

SETTINGS = {
    "reference": [
        "--scale", "0.4", "--train-fraction", "0.2", "--coreset-ratio", "0.1",
        "--max-bank-size", "0", "--top-k", "1",
    ],
    "recommended": [],  # the defaults: native, every image, 1 % bank, top-10 score
}  # fmt: skip


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def patchcore(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``patchcore ARGS`` in a fresh process (this checkout's sources); (result, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-c", "from patchcore.apps.cli import app; app()", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return done, time.perf_counter() - t0


def run_setting(name: str, data: Path, out: Path, backbone: list[str]) -> dict:
    """fit, calibrate, evaluate (with report) for one setting; its figures and warnings."""
    model = out / f"{name}.pt"
    steps = [
        ("fit", ["fit", str(data), "--out", str(model), "-q", "--force", *backbone,
                 *SETTINGS[name]]),
        ("calibrate", ["calibrate", str(model), str(data), "--method", "max_f1", "-q"]),
        ("evaluate", ["evaluate", str(model), str(data), "--report", str(out / f"{name}-report"),
                      "--force", "--json", "-q"]),
    ]  # fmt: skip
    row: dict = {"setting": name, "args": SETTINGS[name], "warnings": [], "seconds": {}}
    for step, args in steps:
        done, seconds = patchcore(*args)
        row["seconds"][step] = round(seconds, 1)
        warned = [ln for ln in done.stderr.splitlines() if "warning" in ln.lower()]
        row["warnings"] += [f"{step}: {w}" for w in warned]
        print(f"[{name}] {step}: exit {done.returncode}, {seconds:.1f} s", flush=True)
        for w in warned:
            print(f"[{name}]   {w}", flush=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", flush=True)
            raise SystemExit(f"{name}: {step} failed")
        if step == "evaluate":
            ev = json.loads(done.stdout)
            m = ev["metrics"]
            row.update(
                image_auroc=m.get("AUROC"),
                f1=m.get("F1Score"),
                fpr=m.get("FalsePositiveRate"),
                fnr=m.get("FalseNegativeRate"),
                threshold=ev.get("threshold"),
                test_images=ev.get("num_scored"),
                bank_rows=ev["model"].get("memory bank"),
                ms_per_image=round(ev.get("ms_per_image", 0.0), 1),
            )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA / "deeppcb")
    parser.add_argument("--out", type=Path, default=Path("/tmp/patchcore-walkthrough"))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--backbone", default=None, help="e.g. resnet18 (default: the default)")
    parser.add_argument("--weights", default=None, help="a local weights file for --backbone")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    backbone = [] if args.backbone is None else ["--backbone", args.backbone]
    if args.weights:
        backbone += ["--weights", args.weights]
    context = {
        "date": dt.date.today().isoformat(),
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "data": str(args.data),
    }
    for name in args.settings:
        load = os.getloadavg()[0]
        row = run_setting(name, args.data, args.out, backbone)
        row.update(context, load_before=round(load, 1), load_after=round(os.getloadavg()[0], 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
