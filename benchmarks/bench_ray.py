"""Ray scale-out: batch-scoring throughput with 1 and 2 workers against single-process predict,
a run with a worker killed mid-way, and the distributed fit against the single-process fit.

Scoring: a model fitted on every casting training image (defaults: native 300 x 300, coreset
0.01) scores the casting test images repeated to ``--images`` distinct paths (symbolic links in
a temporary folder, nothing copied into the repository) with

- ``patchcore predict MODEL DIR --format csv -q`` in a fresh process (its default threads),
- ``patchcore.scale.batch_score`` with 1 and 2 workers (one torch thread each) on a
  local Ray started by the call (its start and the actors' model load are in the wall time;
  the steady rate is measured between the first and the last finished block),
- 2 workers again with one actor killed (SIGKILL by its pid) after the first finished block:
  rows written against inputs.

The actors' peak resident memory (VmHWM, sampled after every block) is recorded too.

Fit: ``PatchCore.fit`` and ``fit_distributed`` with 1 and 2 workers on the casting training
images; banks compared, the coverage radius certified by the coreset, and image AUROC on the
casting test images. Appends JSON lines to ``benchmarks/results/ray.jsonl`` (with the load
average) and prints a markdown summary.

    python benchmarks/bench_ray.py [--images 2000] [--block-size 256] [--skip-fit]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import DATA, ROOT, append_row, machine, subsets

import patchcore.scale as D
from patchcore.core.detector import PatchCore
from patchcore.core.metrics import auroc

RESULTS = ROOT / "benchmarks" / "results" / "ray.jsonl"


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def casting_links(n: int, folder: Path) -> list[str]:
    """``n`` distinct paths (symbolic links) cycling over the casting test images."""
    src = sorted(p for p in (DATA / "casting" / "test").rglob("*.jpeg"))
    out = []
    for i in range(n):
        link = folder / f"{i:05d}_{src[i % len(src)].name}"
        link.symlink_to(src[i % len(src)])
        out.append(str(link))
    return out


def _predict(model: Path, folder: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cli = [sys.executable, "-c", "from patchcore.apps.cli import app; app()"]
    cmd = [*cli, "predict", str(model), str(folder)]
    load0 = _load()
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, "--format", "csv", "-q"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"predict failed: {res.stderr[-2000:]}")
    rows = [ln for ln in res.stdout.splitlines()[1:] if ln.strip()]
    assert len(rows) == n, (len(rows), n)
    scores = {}
    for ln in rows:
        path, _, score = ln.split(",")[:3]
        scores[os.path.abspath(path)] = float(score)
    return {
        "run": "predict (single process)",
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "load_start": load0,
        "scores": scores,
    }


def _batch(model: Path, paths: list[str], out: Path, workers: int, block: int, kill: bool):
    stamps: list[tuple[float, int]] = []
    killed: list[int] = []

    peak: dict[int, int] = {}  # actor pid -> its peak resident memory so far, KiB

    def progress(k: int) -> None:
        stamps.append((time.perf_counter(), k))
        for w in set(D.read_results(out, ["worker"]).column("worker").to_pylist()):
            pid = int(w.rsplit(":", 1)[1])
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # finished or killed
                continue
            hwm = next(ln for ln in status.splitlines() if ln.startswith("VmHWM"))
            peak[pid] = max(peak.get(pid, 0), int(hwm.split()[1]))
        if kill and not killed:
            worker = D.read_results(out).column("worker")[0].as_py()
            pid = int(worker.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    load0 = _load()
    t0 = time.perf_counter()
    s = D.batch_score(
        model, paths, out, workers=workers, block_size=block, progress=progress, device="cpu"
    )
    wall = time.perf_counter() - t0
    table = D.read_results(out)
    keys = table.column("image").to_pylist()
    steady_images = sum(k for _, k in stamps[1:])
    steady_s = stamps[-1][0] - stamps[0][0] if len(stamps) > 1 else float("nan")
    return {
        "run": f"batch, {workers} worker(s)" + (", one killed" if kill else ""),
        "workers": workers,
        "images": len(paths),
        "rows": table.num_rows,
        "distinct_rows": len(set(keys)),
        "errors": s.errors,
        "seconds": wall,
        "images_per_s": len(paths) / wall,
        "steady_images_per_s": steady_images / steady_s if steady_s > 0 else float("nan"),
        "first_block_s": stamps[0][0] - t0 if stamps else float("nan"),
        "killed_pid": killed[0] if killed else None,
        "actor_peak_rss_mib": round(max(peak.values()) / 1024) if peak else None,
        "load_start": load0,
        "scores": dict(zip(keys, table.column("score").to_pylist(), strict=True)),
    }


def _compare(a: dict, b: dict) -> dict:
    keys = sorted(a)
    x = np.array([a[k] for k in keys])
    y = np.array([b[k] for k in keys])
    rel = np.abs(x - y) / np.abs(y)
    return {"bit_equal": float(np.mean(x == y)), "max_rel_diff": float(rel.max())}


def scoring(args: argparse.Namespace, work: Path) -> list[dict]:
    train, _ = subsets("casting", None, None)
    t0 = time.perf_counter()
    det = PatchCore(progress=False).fit(train)
    det.set_threshold(float(np.median(det.score(train.images[:50], progress=False).scores)))
    model = det.save(work / "model.pt")
    print(
        f"model: {len(train)} images, bank {tuple(det.memory_bank_.shape)}, "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    folder = work / "images"
    folder.mkdir()
    paths = casting_links(args.images, folder)
    rows = []
    single = _predict(model, folder, len(paths))
    rows.append(single)
    print(f"predict: {single['images_per_s']:.1f} img/s (load {single['load_start']})", flush=True)
    for workers, kill in ((1, False), (2, False), (2, True)):
        r = _batch(model, paths, work / f"out-{workers}-{kill}", workers, args.block_size, kill)
        r.update(_compare(r["scores"], single["scores"]))
        rows.append(r)
        print(
            f"{r['run']}: {r['images_per_s']:.1f} img/s wall, "
            f"{r['steady_images_per_s']:.1f} steady, rows {r['rows']}/{r['images']}, "
            f"bit-equal {r['bit_equal']:.3f}, max rel {r['max_rel_diff']:.2e} "
            f"(load {r['load_start']})",
            flush=True,
        )
    return rows


def fitting(args: argparse.Namespace) -> list[dict]:
    train, test = subsets("casting", None, None)
    rows = []
    load0 = _load()
    t0 = time.perf_counter()
    single = PatchCore(progress=False).fit(train)
    seconds = time.perf_counter() - t0
    scores = single.score(test.images, progress=False).scores
    ref_bank = single.memory_bank_
    rows.append(
        {
            "run": "fit (single process)",
            "seconds": seconds,
            "load_start": load0,
            "bank_rows": int(ref_bank.shape[0]),
            "image_auroc": auroc(test.labels, scores),
        }
    )
    print(rows[-1], flush=True)
    for workers in (1, 2):
        load0 = _load()
        fit = D.fit_distributed(train.images, workers=workers)
        s = fit.detector.score(test.images, progress=False).scores
        same = fit.detector.memory_bank_.shape == ref_bank.shape and torch.equal(
            fit.detector.memory_bank_, ref_bank
        )
        rows.append(
            {
                "run": f"fit_distributed, {workers} worker(s)",
                "seconds": fit.seconds,
                "load_start": load0,
                "bank_rows": int(fit.detector.memory_bank_.shape[0]),
                "coverage_radius": fit.coverage_radius,
                "bank_equal_single": bool(same),
                "image_auroc": auroc(test.labels, s),
                "shard_patches": fit.shard_rows,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--skip-scoring", action="store_true")
    args = ap.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        rows = [] if args.skip_scoring else scoring(args, Path(tmp))
    if not args.skip_fit:
        rows += fitting(args)
    for r in rows:
        r.pop("scores", None)
        append_row(RESULTS, {"bench": "ray", "machine": machine(), **r})
    print("\n| run | images/s | notes |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r.get('images_per_s', float('nan')):.1f} | {r} |")


if __name__ == "__main__":
    main()
