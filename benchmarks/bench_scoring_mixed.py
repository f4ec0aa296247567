"""Batched scoring at native resolution, this checkout against a baseline revision: ms per image
on every test image of casting, magnetic_tile and deeppcb, and how far the scores and maps moved.

The default detector is fitted once per set on every image of ``train/good`` (``--train N``:
N of them, evenly spaced in sorted order, which gives a smaller bank) with the baseline's code
(fitting is not what is compared), cached under ``--cache``. Then, per set,
``score(files, maps="native")`` (the default path; ``--size-buckets``: with ``size_buckets=True``
where the checkout has it) runs over
the whole test set (file paths, so decoding is timed)
in fresh processes, alternating baseline / this checkout ``--repeats`` times; each child warms
up on 4 images first. The baseline's ``src/`` is exported with ``git archive`` (default ``main``).
Exactness: the largest absolute difference of scores and of maps between the two (0 = bit for
bit), from the first repeat. One JSON line per set, with the CPU, the load before and after, and
the batch counts.

    nice -n 19 python benchmarks/bench_scoring_mixed.py [--baseline main] [--repeats 1] \\
        [--sets casting magnetic_tile deeppcb] [--train N] [--device cpu] [--size-buckets]

``--overlap N`` measures instead whether decoding overlaps computing (this checkout only): per
image on the first N test images, decoding alone, scoring the paths, scoring the same images
already decoded; ``decode_hidden_share`` = (decode + in-memory - paths) / decode (1 = fully
hidden behind the computing).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ("casting", "magnetic_tile", "deeppcb")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
import torch
from patchcore.core.detector import PatchCore
model, listing, out, device, buckets = sys.argv[1:6]
files = [line for line in open(listing).read().splitlines() if line]
det = PatchCore.load(model, device=device)
det.progress = False
det.score(files[:4], maps="native")  # warm-up
batches = []
if hasattr(det, "_score_batches"):  # batches searched together (sixth stop on)
    real = det._score_batches
    def counted(group, maps):
        batches.extend(len(b.indices) for b in group)
        return real(group, maps)
    det._score_batches = counted
else:
    real = det._score_batch
    def counted(batch, maps):
        batches.append(len(batch.indices))
        return real(batch, maps)
    det._score_batch = counted
t0, c0 = time.perf_counter(), time.process_time()
import inspect
has = "size_buckets" in inspect.signature(det.score).parameters
kw = {"size_buckets": True} if buckets == "1" and has else {}
r = det.score(files, maps="native", **kw)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
np.savez(out, scores=r.scores, **{f"m{i}": m for i, m in enumerate(r.maps)})
print(json.dumps({"ms_per_image": 1e3 * wall / len(files), "cpu_ms_per_image":
    1e3 * cpu / len(files), "batches": len(batches), "mean_batch": float(np.mean(batches)),
    "threads": torch.get_num_threads(), "size_buckets": bool(kw)}))
"""


OVERLAP = r"""
import json, sys, time
import numpy as np
from patchcore.core.detector import PatchCore
from patchcore.lean.inputs import decode_input
model, listing, device, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
files = [line for line in open(listing).read().splitlines() if line][:n]
det = PatchCore.load(model, device=device)
det.progress = False
det.score(files[:4], maps="native")  # warm-up
def timed(fn):
    t0 = time.perf_counter(); fn(); return 1e3 * (time.perf_counter() - t0) / len(files)
decode = timed(lambda: [decode_input(f) for f in files])
arrays = [(decode_input(f).transpose(1, 2, 0) * 255).round().astype(np.uint8) for f in files]
paths = timed(lambda: det.score(files, maps="native"))
memory = timed(lambda: det.score(arrays, maps="native"))
print(json.dumps({"decode_ms": decode, "score_paths_ms": paths, "score_in_memory_ms": memory}))
"""


def _files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _export(rev: str, dest: Path) -> Path:
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True,
                         check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return dest / "src"


def _python(src: Path, code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout


def _fit(src: Path, data: Path, model: Path, train: int, device: str) -> None:
    if model.exists():
        return
    model.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys; from patchcore.core.detector import PatchCore\n"
        "files = [l for l in open(sys.argv[1]).read().splitlines() if l]\n"
        "PatchCore(device=sys.argv[3], progress=False).fit(files).save(sys.argv[2])\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        files = _files(data / "train" / "good")
        step = max(1, len(files) // train) if train else 1
        f.write("\n".join(files[::step][: train or None]))
    try:
        _python(src, code, f.name, str(model), device)
    finally:
        os.unlink(f.name)


def _max_diff(a: Path, b: Path) -> tuple[float, float]:
    with np.load(a) as x, np.load(b) as y:
        scores = float(np.max(np.abs(x["scores"] - y["scores"])))
        maps = max(float(np.max(np.abs(x[k] - y[k]))) for k in x.files if k != "scores")
    return scores, maps


def run_set(name: str, before: Path, after: Path, tmp: Path, args: argparse.Namespace) -> dict:
    train, device = args.train, args.device
    buckets = "1" if args.size_buckets else "0"
    where = "" if device == "cpu" else f"-{device}"
    model = args.cache / f"{name}-train{train or 'all'}{where}.pt"
    _fit(before, args.data / name, model, train, device)
    files = _files(args.data / name / "test")
    if args.limit:  # evenly spaced over the sorted test set (every label represented)
        files = files[:: max(1, len(files) // args.limit)][: args.limit]
    listing = tmp / f"{name}.txt"
    listing.write_text("\n".join(files))
    load0 = _load()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for rep in range(args.repeats):
        for label, src in (("before", before), ("after", after)):
            out = tmp / f"{name}-{label}-{rep}.npz"
            child = _python(src, CHILD, str(model), str(listing), str(out), device, buckets)
            runs[label].append(json.loads(child))
    score_diff, map_diff = _max_diff(tmp / f"{name}-before-0.npz", tmp / f"{name}-after-0.npz")
    for p in tmp.glob(f"{name}-*.npz"):
        p.unlink()

    def med(label: str, key: str) -> float:
        return float(np.median([r[key] for r in runs[label]]))

    return {
        "set": name,
        "images": len(files),
        "train_images": train or "all",
        "ms_per_image_before": round(med("before", "ms_per_image"), 1),
        "ms_per_image_after": round(med("after", "ms_per_image"), 1),
        "ratio_after_before": round(
            med("after", "ms_per_image") / med("before", "ms_per_image"), 3
        ),  # fmt: skip
        "cpu_ms_per_image_before": round(med("before", "cpu_ms_per_image"), 1),
        "cpu_ms_per_image_after": round(med("after", "cpu_ms_per_image"), 1),
        "batches_before": runs["before"][0]["batches"],
        "batches_after": runs["after"][0]["batches"],
        "max_abs_score_diff": score_diff,
        "max_abs_map_diff": map_diff,
        "repeats": args.repeats,
        "size_buckets": args.size_buckets,
        "device": device,
        "threads": runs["after"][0]["threads"],
        "cpu": _cpu(),
        "load_before": load0,
        "load_after": _load(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run_overlap(name: str, tmp: Path, args: argparse.Namespace) -> dict:
    """Is decoding hidden behind computing? Per image on the first ``--overlap`` test images:
    decoding alone (one thread), scoring the file paths (decoded in the pipeline's threads
    while batches compute) and scoring the same images already decoded (this checkout)."""
    where = "" if args.device == "cpu" else f"-{args.device}"
    model = args.cache / f"{name}-train{args.train or 'all'}{where}.pt"
    _fit(ROOT / "src", args.data / name, model, args.train, args.device)
    listing = tmp / f"{name}-overlap.txt"
    listing.write_text("\n".join(_files(args.data / name / "test")))
    load0 = _load()
    out = json.loads(
        _python(ROOT / "src", OVERLAP, str(model), str(listing), args.device, str(args.overlap))
    )
    hidden = (out["decode_ms"] + out["score_in_memory_ms"] - out["score_paths_ms"]) / max(
        out["decode_ms"], 1e-9
    )
    return {
        "set": name,
        "overlap_images": args.overlap,
        **{k: round(v, 1) for k, v in out.items()},
        "decode_hidden_share": round(hidden, 2),
        "cpu": _cpu(),
        "load_before": load0,
        "load_after": _load(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git revision to compare against")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    ap.add_argument("--train", type=int, default=0, help="training images (0: all)")
    ap.add_argument("--limit", type=int, default=0, help="test images (0: all)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding the three sets")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "out" / "scoring_mixed")
    ap.add_argument("--size-buckets", action="store_true", help="score with size_buckets=True")
    ap.add_argument(
        "--overlap", type=int, default=0, help="instead: is decoding hidden? (N test images)"
    )
    args = ap.parse_args()
    if args.overlap:
        with tempfile.TemporaryDirectory(prefix="bench_scoring_overlap-") as tmp:
            for name in args.sets:
                print(json.dumps(run_overlap(name, Path(tmp), args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench_scoring_mixed-") as tmp:
        before = _export(args.baseline, Path(tmp) / "baseline")
        for name in args.sets:
            row = run_set(name, before, ROOT / "src", Path(tmp), args)
            print(json.dumps({"baseline": args.baseline, **row}), flush=True)


if __name__ == "__main__":
    main()
