"""The arithmetic lower bound on scoring time: FLOPs / the machine's measured matmul rate.

A score needs the backbone up to its last tapped layer plus the exact nearest-neighbour search,
``2 x query patches x bank size x feature dimension`` multiply-adds counted as 2 FLOPs each.
Dividing by the rate of a large float32 matrix product on this machine gives the time the
arithmetic alone would take if every operation ran at matmul speed (depthwise convolutions,
pooling, upsampling, blur and Python never do, so real code stays above it).

    python benchmarks/lower_bound.py [--backbone efficientnet-lite0] [--size 224] [--bank 3136]
    python benchmarks/lower_bound.py --models benchmarks/out/models   # each set's fitted model

With ``--models DIR`` the bound is that of each set's fitted model ``DIR/{set}-all.pt`` (the
models ``bench_export.py`` fits) over every test image at its own size, the search priced at
the rate of the precision the model's search runs in (int8 products by ``torch._int_mm``,
counted as 2 operations per multiply-add like the others; bfloat16; float32); the rates are the
best of three medians (the machine's, not the moment's load).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from patchcore.core.backbones import FeatureExtractor
from patchcore.core.embedding import embed


def matmul_gflops(
    n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32
) -> list[float]:
    """GFLOP/s of ``n x n @ n x n`` products in ``dtype``, one value per timed repeat (after
    warm-up). Uses torch's current thread count (``torch.get_num_threads()``).
    """
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.int8:  # exact int32 products (the int8 search's torch._int_mm)
        a = torch.randint(-127, 128, (n, n), generator=gen, dtype=torch.int8)
        b = torch.randint(-127, 128, (n, n), generator=gen, dtype=torch.int8)

        def product() -> None:
            torch._int_mm(a, b)
    else:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        out = torch.empty(n, n, dtype=dtype)

        def product() -> None:
            torch.mm(a, b, out=out)

    product()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        product()
        rates.append(2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


@torch.inference_mode()
def backbone_flops(
    backbone: str, layers: list[str] | None, size: tuple[int, int]
) -> tuple[int, tuple[int, int], int]:
    """FLOPs of one image through the truncated extractor (random weights: same arithmetic).

    Returns:
        (FLOPs counted by ``torch.utils.flop_counter``, patch grid (h, w), feature dimension D).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the arithmetic is the same
        ext = FeatureExtractor(backbone, layers, weights=None)
    x = torch.zeros(1, 3, *size)
    counter = FlopCounterMode(display=False)
    with counter:
        # The plain modules: the fused inference plan calls oneDNN ops the counter cannot see.
        feats = ext.reference_forward(x)
    emb = embed(feats)
    flop = int(counter.get_total_flops())
    if flop < 1_000_000:
        raise RuntimeError(f"counted only {flop} backbone FLOPs for {backbone}: counter broken?")
    return flop, (int(emb.shape[2]), int(emb.shape[3])), int(emb.shape[1])


def bound_ms(
    backbone_flop: int,
    queries: int,
    bank: int,
    dim: int,
    gflops: float,
    search_gflops: float | None = None,
) -> dict:
    """Lower bound on ms per image for a configuration.

    Args:
        backbone_flop: FLOPs of one image through the backbone.
        queries: patches per image (Q).
        bank: memory-bank rows (M).
        dim: feature dimension (D).
        gflops: machine matmul rate, GFLOP/s (float32: the backbone's precision).
        search_gflops: the rate of the search's products (e.g. bfloat16's, when the search runs
            in bfloat16); default ``gflops``.
    """
    search = 2 * queries * bank * dim
    total = backbone_flop + search
    search_rate = gflops if search_gflops is None else search_gflops
    ms = (backbone_flop / gflops + search / search_rate) / 1e9 * 1e3
    return {
        "backbone_gflop": backbone_flop / 1e9,
        "search_gflop": search / 1e9,
        "total_gflop": total / 1e9,
        "matmul_gflops": gflops,
        "search_gflops": search_rate,
        "bound_ms": ms,
    }


def detector_bounds(det, sizes: list[tuple[int, int]], rates: dict[str, float]) -> list[dict]:  # noqa: ANN001
    """:func:`bound_ms` of a fitted detector for each (H, W) in ``sizes``.

    Backbone FLOPs are counted once at 224 x 224 and scaled by each image's pixel count
    (convolution FLOPs are proportional to it); the backbone is priced at the float32 rate
    ``rates["float32"]``, the search at the rate of the precision it runs in (``rates`` by
    precision name: ``"float32"``, ``"bfloat16"``, ``"int8"``).
    """
    flop, grid, dim = backbone_flops(det.backbone, list(det.layers_), (224, 224))
    per_pixel, stride = flop / 224**2, 224 // grid[0]
    fp32, rate = rates["float32"], rates[det._index.precision]
    bank = int(det.memory_bank_.shape[0])
    return [
        bound_ms(int(per_pixel * h * w), -(-h // stride) * -(-w // stride), bank, dim, fp32, rate)
        for h, w in sizes
    ]


def precision_rates(best_of: int = 1) -> dict[str, float]:
    """The machine's product rate per search precision name (``"float32"``, ``"bfloat16"``,
    ``"int8"``): the best of ``best_of`` medians of :func:`matmul_gflops`."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
    return {
        name: max(float(np.median(matmul_gflops(dtype=dtype))) for _ in range(best_of))
        for name, dtype in dtypes.items()
    }


def model_bounds(models: str, sets: list[str]) -> None:
    """One JSON line per set: the mean bound over its test images for ``models/{set}-all.pt``."""
    from common import subsets
    from PIL import Image

    from patchcore import PatchCore

    rates = precision_rates(best_of=3)
    print(json.dumps({f"{k}_gflops": round(v, 1) for k, v in rates.items()}), flush=True)
    for name in sets:
        _, test = subsets(name, None, None)
        sizes = []
        for path in test.images:
            with Image.open(path) as im:
                sizes.append((im.height, im.width))
        det = PatchCore.load(f"{models}/{name}-all.pt")
        ms = detector_bounds(det, sizes, rates)
        row = {"set": name, "backbone": det.backbone, "bank": int(det.memory_bank_.shape[0])}
        row["search_precision"] = det._index.precision
        row["bound_ms"] = round(float(np.mean([m["bound_ms"] for m in ms])), 1)
        row["search_share"] = round(
            float(
                np.mean([m["search_gflop"] / m["search_gflops"] / m["bound_ms"] * 1e3 for m in ms])
            ),
            3,
        )
        print(json.dumps(row), flush=True)


def main() -> None:
    """Print the bound for one configuration as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--layers", nargs="*", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument(
        "--bank",
        type=int,
        required=False,
        default=None,
        help="memory-bank rows (default: 10%% of 60 images' patches)",
    )
    ap.add_argument("--models", default=None, help="folder of {set}-all.pt fitted models")
    ap.add_argument("--sets", nargs="+", default=["casting", "magnetic_tile", "deeppcb"])
    args = ap.parse_args()
    if args.models is not None:
        model_bounds(args.models, args.sets)
        return
    flop, grid, dim = backbone_flops(args.backbone, args.layers, (args.size, args.size))
    q = grid[0] * grid[1]
    bank = args.bank if args.bank is not None else round(60 * q * 0.1)
    rates = matmul_gflops()
    out = bound_ms(flop, q, bank, dim, float(np.median(rates)))
    out.update(grid=list(grid), dim=dim, bank=bank, rates=[round(r, 1) for r in rates])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
