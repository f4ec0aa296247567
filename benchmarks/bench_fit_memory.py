"""Peak memory of ``PatchCore.fit`` relative to the training features it holds (issue #4).

    python benchmarks/bench_fit_memory.py                      # 1000 images, both sets
    python benchmarks/bench_fit_memory.py --images 300 --sets casting
    python benchmarks/bench_fit_memory.py --auroc              # float16 vs float32 storage

Every configuration runs in a fresh subprocess on one torch thread. The child first fits on two
images (imports, thread pools and the backbone's first allocations out of the way), then resets
the peak RSS (``VmHWM``, by writing "5" to ``/proc/self/clear_refs``; where that is refused the
``ru_maxrss`` delta is used, which can only under-report) and fits on N images of the set's
``train/good`` folder, repeated cyclically when the folder has fewer. Reported: N x D x 4 bytes
(the float32 training features), the peak RSS above the RSS just before that fit, their ratio,
and the fit's feature-extraction and coreset seconds.

``--auroc`` fits casting on 40 training images and scores ~100 test images (stratified good /
defective) once per ``feature_dtype`` and prints the image AUROC of each.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path("/work/shared/data")
SETS = {"casting": 120, "deeppcb": 256}  # set -> image_size
EXTS = {".png", ".jpg", ".jpeg", ".bmp"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTS)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") <= _rss_kib("VmRSS") + 64


def _dtype_kwargs(dtype: str | None) -> dict:
    from patchcore import PatchCore

    if dtype is None:
        return {}
    if "feature_dtype" not in inspect.signature(PatchCore).parameters:
        raise SystemExit("this PatchCore has no feature_dtype argument")
    return {"feature_dtype": dtype}


def child_memory(set_name: str, num: int, dtype: str | None) -> dict:
    import torch

    from patchcore import PatchCore

    torch.set_num_threads(1)
    files = _images(DATA / set_name / "train" / "good")
    items = [files[i % len(files)] for i in range(num)]
    params = dict(
        image_size=SETS[set_name], coreset_ratio=0.1, progress=False, **_dtype_kwargs(dtype)
    )
    PatchCore(**params).fit(items[:2])  # warm-up
    import gc

    gc.collect()
    rss0 = _rss_kib("VmRSS")
    exact = _reset_peak()
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    det = PatchCore(**params).fit(items)
    wall = time.perf_counter() - t
    if exact:
        peak = _rss_kib("VmHWM") - rss0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max0
    dim = int(det.memory_bank_.shape[1])
    feat_bytes = det.n_train_patches_ * dim * 4
    return {
        "set": set_name,
        "images": num,
        "image_size": SETS[set_name],
        "feature_dtype": dtype or "default",
        "patches": det.n_train_patches_,
        "dim": dim,
        "float32_feature_mib": feat_bytes / 2**20,
        "peak_above_start_mib": peak / 1024,
        "ratio": peak * 1024 / feat_bytes,
        "peak_method": "VmHWM reset" if exact else "ru_maxrss delta",
        "feature_s": det.feature_seconds_,
        "coreset_s": det.coreset_seconds_,
        "fit_wall_s": wall,
        "bank_rows": int(det.memory_bank_.shape[0]),
    }


def child_auroc(dtype: str | None, train: int, test: int, size: int) -> dict:
    import random

    import torch

    from patchcore import PatchCore
    from patchcore.core.metrics import auroc

    torch.set_num_threads(1)
    root = DATA / "casting"
    train_files = _images(root / "train" / "good")[:train]
    rng = random.Random(0)
    good = rng.sample(_images(root / "test" / "good"), test // 2)
    bad = rng.sample(_images(root / "test" / "defective"), test - test // 2)
    det = PatchCore(image_size=size, progress=False, **_dtype_kwargs(dtype)).fit(train_files)
    scores = det.score_samples(good + bad)
    labels = [0] * len(good) + [1] * len(bad)
    return {
        "feature_dtype": dtype or "default",
        "image_auroc": auroc(labels, scores),
        "coreset_s": det.coreset_seconds_,
        "bank": list(det.memory_bank_.shape),
    }


def _spawn(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["casting", "deeppcb"])
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        help="feature_dtype values to compare (default: the constructor's default only)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration")
    parser.add_argument("--auroc", action="store_true", help="float16 vs float32 AUROC check")
    parser.add_argument("--auroc-train", type=int, default=40)
    parser.add_argument("--auroc-test", type=int, default=100)
    parser.add_argument("--auroc-size", type=int, default=224)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        dtype = None if rest[-1] == "default" else rest[-1]
        if kind == "memory":
            row = child_memory(rest[0], int(rest[1]), dtype)
        else:
            row = child_auroc(dtype, args.auroc_train, args.auroc_test, args.auroc_size)
        print(json.dumps(row))
        return

    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    rows = []
    dtypes = args.dtypes or ["default"]
    if args.auroc:
        for dtype in dtypes:
            extra = [
                f"--auroc-train={args.auroc_train}",
                f"--auroc-test={args.auroc_test}",
                f"--auroc-size={args.auroc_size}",
            ]
            row = _spawn([*extra, "--child", "auroc", dtype])
            rows.append(row)
            print(json.dumps(row), flush=True)
    else:
        for set_name in args.sets:
            for dtype in dtypes:
                for _ in range(args.repeats):
                    row = _spawn(["--child", "memory", set_name, str(args.images), dtype])
                    rows.append(row)
                    print(
                        f"{set_name:8s} {dtype:8s} N={row['images']} patches={row['patches']}"
                        f" x {row['dim']}: float32 features {row['float32_feature_mib']:.0f} MiB,"
                        f" peak +{row['peak_above_start_mib']:.0f} MiB = {row['ratio']:.2f}x"
                        f" ({row['peak_method']}); features {row['feature_s']:.1f} s,"
                        f" coreset {row['coreset_s']:.1f} s",
                        flush=True,
                    )
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
