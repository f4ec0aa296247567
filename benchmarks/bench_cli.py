"""What the CLI package costs around the work itself: start-up (``patchcore --help``, which
imports the estimator to derive ``fit``'s options) and the guards of ``patchcore update`` (the
lock and the two SHA-256 digests of the model file).

    PYTHONPATH=src python benchmarks/bench_cli.py [--repeat 5]

Prints one JSON line per measurement (median seconds) with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import median_seconds


def startup(repeat: int) -> dict:
    main = "from patchcore.apps.cli import app; app(prog_name='patchcore')"
    cmd = [sys.executable, "-c", main, "--help"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}

    def once() -> None:
        subprocess.run(cmd, env=env, check=True, capture_output=True)

    seconds = median_seconds(once, repeat, warmup=0)
    return {"what": "patchcore --help (process start to exit)", "s": seconds}


def update_guards(repeat: int) -> dict:
    """The lock and compare-and-swap around a save (the file is mostly the backbone weights)."""
    import numpy as np

    from patchcore.apps.workflow import model_transaction
    from patchcore.core.detector import PatchCore

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    det = PatchCore(weights=None, image_size=64, coreset_ratio=1.0, progress=False).fit(images)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pt"
        det.save(path)
        size = path.stat().st_size

        def plain() -> None:
            det.save(path)

        def guarded() -> None:
            with model_transaction(path) as t:
                t.save(det)

        base = median_seconds(plain, repeat, warmup=0)
        with_guards = median_seconds(guarded, repeat, warmup=0)
    return {
        "what": "update's save: plain vs lock + digests",
        "model_bytes": size,
        "plain_s": base,
        "guarded_s": with_guards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    context = {
        "cpu": platform.processor() or platform.machine(),
        "load": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }
    for row in (startup(args.repeat), update_guards(args.repeat)):
        print(json.dumps({**row, **context}))


if __name__ == "__main__":
    main()
