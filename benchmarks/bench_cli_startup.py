"""Start-up of the ``patchcore`` command, this checkout against a baseline revision: whole-process
wall and CPU seconds of ``patchcore --help`` and ``patchcore info MODEL``, runs alternating
(baseline, this checkout, ...) after one warm-up each, medians and the median of the per-pair
ratios. The baseline's ``src/`` is exported with ``git archive`` (default ``main``). Without
``--model`` a small model is fitted once (10 casting training images at 128 px) into ``--cache``.

    nice -n 19 python benchmarks/bench_cli_startup.py [--baseline main] [--runs 5] [--model M]

Prints one JSON line per command, with the CPU and the load before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASTING = ROOT.parents[1] / "shared" / "data" / "casting" / "train" / "good"
CLI = "from patchcore.apps.cli import app; app(prog_name='patchcore')"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _once(src: Path, args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one ``patchcore ARGS`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, *args], env={**os.environ, "PYTHONPATH": str(src)},
                   check=True, capture_output=True)  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _model(cache: Path) -> Path:
    model = cache / "startup-model.pt"
    if not model.exists():
        cache.mkdir(parents=True, exist_ok=True)
        files = sorted(str(p) for p in CASTING.iterdir())[:10]
        code = (
            "import sys; from patchcore import PatchCore\n"
            "PatchCore(image_size=128, device='cpu', progress=False)"
            ".fit(sys.argv[2:]).save(sys.argv[1])\n"
        )
        subprocess.run([sys.executable, "-c", code, str(model), *files], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "out" / "cli_startup")
    args = ap.parse_args()
    model = args.model or _model(args.cache)
    with tempfile.TemporaryDirectory(prefix="bench_cli_startup-") as tmp:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"],
                             capture_output=True, check=True).stdout  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(tmp, filter="data")
        sides = {"before": Path(tmp) / "src", "after": ROOT / "src"}
        for cmd in (["--help"], ["info", str(model)]):
            load0 = _load()
            for src in sides.values():
                _once(src, cmd)  # warm-up
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
            for _ in range(args.runs):
                for label, src in sides.items():
                    runs[label].append(_once(src, cmd))
            ratios = [a[0] / b[0] for a, b in zip(runs["after"], runs["before"], strict=True)]
            row = {"command": "patchcore " + " ".join(cmd[:1]), "baseline": args.baseline}
            for label in sides:
                row[f"wall_s_{label}"] = round(statistics.median(w for w, _ in runs[label]), 2)
                row[f"cpu_s_{label}"] = round(statistics.median(c for _, c in runs[label]), 2)
            row |= {"wall_ratio_after_before": round(statistics.median(ratios), 3),
                    "runs": args.runs, "cpu": _cpu(), "load_before": load0,
                    "load_after": _load(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                 time.gmtime())}  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
