"""Time the exact greedy coreset against the naive loop, and the nearest-neighbour search.

    python benchmarks/bench_coreset.py                           # synthetic, 20k/100k/204.8k rows
    python benchmarks/bench_coreset.py --images /work/shared/data/casting/train/good
    python benchmarks/bench_coreset.py --features bank.pt --sizes 51200
    python benchmarks/bench_coreset.py --images DIR --sizes 15680 --anomalib   # vs the peer

The naive loop (one full N x d matrix-vector product, minimum and argmax per selected feature)
is timed for ``--naive-iters`` steps and extrapolated to n = ratio * N steps; its per-step cost
does not change along the run. Its selections are compared with the first ones of
``greedy_coreset`` (they must agree; in float32 a genuine near-tie may legitimately flip).
Times are wall clock and process CPU time (the CPU time is the fairer number on a shared
machine). ``--anomalib`` also times anomalib's ``KCenterGreedy`` (benchmarks/.peer-venv, one
torch thread, in a subprocess) on the same features and compares the coverage radii (largest
distance from any feature to its nearest selected one, unprojected). ``--images`` extracts
EfficientNet-Lite0 stage3+stage5 patch features (D = 152, 32 x 32 patches per 256 px image) with
the package's own extractor and caches them under benchmarks/out/. ``--dtype float16`` hands
the features to ``greedy_coreset`` in float16, as ``PatchCore`` stores them by default.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import median_seconds

from patchcore.core.sampling import coreset_size, coverage_radius, greedy_coreset, random_projection
from patchcore.core.search import NearestNeighborIndex

OUT = Path(__file__).resolve().parent / "out"
PEER_PYTHON = Path(__file__).resolve().parent / ".peer-venv" / "bin" / "python"
PEER_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from anomalib.models.components.sampling import KCenterGreedy
feats = torch.load(sys.argv[1])
torch.manual_seed(int(sys.argv[3]))
sampler = KCenterGreedy(embedding=feats, sampling_ratio=float(sys.argv[2]))
wall, cpu = time.perf_counter(), time.process_time()
idx = sampler.select_coreset_idxs()
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
torch.save(torch.tensor(idx), sys.argv[4])
print(wall, cpu, sampler.features.shape[1])
"""


def synthetic_features(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Feature-like rows: ReLU of a random map of a 64-component, 12-d latent mixture."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(64, 12, generator=gen)
    latent = centres[torch.randint(64, (num,), generator=gen)] + torch.randn(num, 12, generator=gen)
    weights = torch.randn(12, dim, generator=gen) / math.sqrt(12)
    return torch.relu(latent @ weights) + 0.05 * torch.randn(num, dim, generator=gen)


def image_features(folder: Path, num: int) -> torch.Tensor:
    """EfficientNet-Lite0 stage3+stage5 embeddings of the first images of a folder (cached)."""
    import numpy as np
    from PIL import Image

    from patchcore.core.backbones import FeatureExtractor
    from patchcore.core.embedding import embed, flatten_patches

    count = -(-num // 1024)
    cache = OUT / f"features_{folder.parent.parent.name}_{folder.name}_{count}.pt"
    if cache.exists():
        return torch.load(cache)[:num]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if len(files) < count:
        raise SystemExit(f"{folder}: {len(files)} images, {count} needed for {num} rows")
    extractor = FeatureExtractor("efficientnet-lite0")
    mean = torch.tensor(extractor.mean).view(1, 3, 1, 1)
    std = torch.tensor(extractor.std).view(1, 3, 1, 1)
    chunks = []
    with torch.inference_mode():
        for lo in range(0, count, 16):
            ims = [
                np.asarray(Image.open(f).convert("RGB").resize((256, 256)))
                for f in files[lo : min(count, lo + 16)]
            ]
            x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255
            chunks.append(flatten_patches(embed(extractor((x - mean) / std))))
    feats = torch.cat(chunks)
    OUT.mkdir(exist_ok=True)
    torch.save(feats, cache)
    return feats[:num]


def naive_greedy(z: torch.Tensor, start: int, steps: int) -> tuple[list[int], float, float]:
    """The naive loop for ``steps`` steps: selections, wall and CPU seconds per step."""
    sq = (z * z).sum(1)
    u2 = torch.full((z.shape[0],), math.inf, dtype=z.dtype)
    d2 = torch.empty_like(u2)
    pos, picked = start, []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        picked.append(pos)
        torch.addmv(sq, z, z[pos], alpha=-2.0, out=d2)
        torch.minimum(u2, d2.add_(sq[pos]).clamp_(min=0.0), out=u2)
        u2[pos] = 0.0
        pos = int(u2.argmax())
    return picked, (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def bench_anomalib(feats: torch.Tensor, ratio: float, seed: int, ours: torch.Tensor) -> None:
    """anomalib's KCenterGreedy on the same features: time and coverage radius vs ours."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "feats.pt", Path(tmp) / "idx.pt"
        torch.save(feats.float().contiguous(), src)
        out = subprocess.run(
            [str(PEER_PYTHON), "-c", PEER_SCRIPT, str(src), str(ratio), str(seed), str(dst)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        wall, cpu, dim = out.stdout.split()[-3:]
        peer = torch.load(dst)
    r_ours, r_peer = coverage_radius(feats, ours), coverage_radius(feats, peer)
    print(
        f"  anomalib KCenterGreedy (projected to {dim} dims): {float(wall):6.1f}s wall"
        f" {float(cpu):6.1f}s cpu, n={len(peer)}  | coverage radius ours {r_ours:.3f}"
        f" anomalib {r_peer:.3f} (ours/anomalib {r_ours / r_peer:.3f})",
        flush=True,
    )


def bench_coreset(
    feats: torch.Tensor,
    ratio: float,
    naive_iters: int,
    seed: int,
    naive_threads: int,
    projection_dim: int | None = None,
    anomalib: bool = False,
) -> None:
    num = feats.shape[0]
    n = coreset_size(num, ratio)
    wall, cpu = time.perf_counter(), time.process_time()
    ours = greedy_coreset(feats, n, projection_dim=projection_dim, seed=seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gen = torch.Generator().manual_seed(seed)
    z = feats.float()
    if projection_dim is not None:
        z = random_projection(z, projection_dim, gen)
    start = int(torch.randint(num, (1,), generator=gen))
    steps = min(n, naive_iters)
    threads = torch.get_num_threads()
    torch.set_num_threads(naive_threads)
    try:
        naive, step_wall, step_cpu = naive_greedy(z, start, steps)
    finally:
        torch.set_num_threads(threads)
    same = next(
        (i for i, (a, b) in enumerate(zip(naive, ours.tolist(), strict=False)) if a != b), steps
    )
    print(
        f"N={num:>7} n={n:>6}  naive ~{step_wall * n:7.1f}s wall {step_cpu * n:7.1f}s cpu"
        f"  | ours {wall:6.1f}s wall {cpu:6.1f}s cpu  | speed-up {step_wall * n / wall:5.1f}x"
        f" wall {step_cpu * n / cpu:5.1f}x cpu  | first {same}/{steps} selections identical",
        flush=True,
    )
    if anomalib:
        bench_anomalib(feats, ratio, seed, ours)


def bench_search(queries: int, bank: int, dim: int, repeats: int = 5) -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(bank, dim, generator=gen)
    q = torch.randn(queries, dim, generator=gen)
    index = NearestNeighborIndex(b)

    def best(fn) -> float:
        return 1e3 * median_seconds(fn, repeats, warmup=1, stat=min)

    print(
        f"search Q={queries} M={bank} D={dim}: k=1 {best(lambda: index.search(q, 1)):.0f} ms,"
        f" k=3 {best(lambda: index.search(q, 3)):.0f} ms;"
        f" torch.cdist+min {best(lambda: torch.cdist(q, b).min(1)):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000, 204800])
    parser.add_argument("--dim", type=int, default=152, help="feature dimension (synthetic)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--naive-iters", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--projection-dim",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=None,
        help="greedy_coreset's projection_dim (default none, its default)",
    )
    parser.add_argument("--anomalib", action="store_true", help="also time anomalib's sampler")
    parser.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="feature storage"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (search)")
    parser.add_argument(
        "--naive-threads",
        type=int,
        default=1,
        help="torch threads of the naive loop (1, like greedy_coreset's loop: on a busy 2-core"
        " machine a second thread makes every small step many times slower)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--features", type=Path, help="a saved (N, D) tensor")
    source.add_argument("--images", type=Path, help="a folder of images to embed")
    parser.add_argument("--no-search", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.features:
        pool = torch.load(args.features)
    elif args.images:
        pool = image_features(args.images, max(args.sizes))
    else:
        pool = synthetic_features(max(args.sizes), args.dim, args.seed)
    print(f"features: {tuple(pool.shape)} {pool.dtype}")
    for num in args.sizes:
        bench_coreset(
            pool[:num].contiguous().to(getattr(torch, args.dtype)),
            args.ratio,
            args.naive_iters,
            args.seed,
            args.naive_threads,
            args.projection_dim,
            args.anomalib,
        )
    if not args.no_search:
        bench_search(1024, 20480, 152)


if __name__ == "__main__":
    main()
