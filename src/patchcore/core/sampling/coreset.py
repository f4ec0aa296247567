"""Memory-bank subsampling: greedy k-center coresets and seeded random subsampling.

:func:`chunked_greedy_coreset` (the detector's default) selects in time linear in the number of
features for a capped bank, in three stages (:mod:`patchcore.core.sampling.stages`, which a fit
across workers runs apart): a greedy per chunk of rows, the exact greedy on the union of the
chunk selections, and a repair pass that measures every row's distance and lets the greedy take
the rows the union missed. :func:`greedy_coreset` is the exact greedy on all rows
(:mod:`patchcore.core.sampling.kcenter`).

The coreset is the greedy k-center (farthest-point) selection of Sener & Savarese used by
PatchCore: start from one seeded random feature, then repeatedly add the feature farthest from
everything selected so far. Distances are Euclidean, measured on the features themselves by
default (an optional seeded Gaussian random projection, as in the PatchCore paper, is available
for very wide features), and ties go to the lowest feature index.
"""

from __future__ import annotations

import math
import time

import torch

import patchcore.core.sampling.kcenter as kcenter
from patchcore.core.sampling.kcenter import OneThread, greedy_kcenter, work_dtype
from patchcore.core.sampling.stages import (
    PASS_WORDS,
    RADIUS_WORDS,
    CoresetSelection,
    bank_distances,
    check_stages,
    chunk_stage,
    chunk_starts,
    keep_fraction,
    repair_size,
    repair_stage,
    union_greedy,
)

__all__ = [
    "CoresetSelection",
    "check_finite",
    "chunked_greedy_coreset",
    "coreset_size",
    "coverage_radius",
    "extend_coreset",
    "greedy_coreset",
    "random_projection",
    "random_subsample",
]


def coreset_size(num_features: int, ratio: float) -> int:
    """Number of features kept for a coreset ratio.

    Args:
        num_features: size of the full bank, >= 1.
        ratio: fraction to keep, in (0, 1].

    Returns:
        ``max(1, round(num_features * ratio))``.
    """
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features!r}")
    return max(1, min(num_features, int(round(num_features * ratio))))


def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded Gaussian random projection (Johnson-Lindenstrauss).

    Args:
        features: (N, D).
        dim: target dimension; when ``dim >= D`` the features are returned unchanged.
        generator: source of the projection matrix (drawn in float32 on the generator's device,
            so the matrix does not depend on the features' dtype).

    Returns:
        (N, dim) = ``features @ P`` with ``P`` (D, dim) standard normal / sqrt(dim), in float64
        for float64 features and float32 otherwise (half-precision features are converted
        block by block, never as a whole).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {dim!r}")
    num, d_in = features.shape
    if dim >= d_in:
        return features
    work = work_dtype(features.dtype)
    p = torch.randn(d_in, dim, generator=generator, device=generator.device, dtype=torch.float32)
    p = p.to(device=features.device, dtype=work) / math.sqrt(dim)
    if features.dtype == work:
        return features @ p
    out = torch.empty(num, dim, dtype=work, device=features.device)
    step = max(1, kcenter.CHUNK_BYTES // (8 * d_in))
    for lo in range(0, num, step):
        out[lo : lo + step] = features[lo : lo + step].to(work) @ p
    return out


def random_subsample(num_features: int, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` distinct indices drawn uniformly from ``range(num_features)``, seeded.

    Returns:
        (n,) int64, in random order.
    """
    if not (1 <= n <= num_features):
        raise ValueError(f"n must be in [1, num_features={num_features}], got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_features, generator=gen)[:n]


def greedy_coreset(
    features: torch.Tensor,
    n: int,
    *,
    projection_dim: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Exact greedy k-center coreset (farthest-point selection), seeded.

    Args:
        features: (N, D) float tensor. float16/bfloat16 features are read in place and
            converted to float32 a block of rows at a time (no full-size copy); float64 is
            computed in float64.
        n: number of features to select, 1 <= n <= N.
        projection_dim: random-projection dimension used for the distances. ``None`` (the
            default): no projection, the greedy runs on the features themselves, which gives
            the best coverage; no projection either when >= D. Measured on EfficientNet-Lite0
            features (D = 152, benchmarks/RESULTS.md): projecting to 128 made the coverage
            radius 2-10 % worse at no speed gain. A projection only pays for very wide features
            (e.g. 1536-d wide_resnet50_2 layer2+3), where it cuts the time of every exact
            distance; it also costs an (N, projection_dim) float32 copy.
        seed: seeds the projection and the first centre.
        progress: show a tqdm progress bar.

    Runs on one torch thread (restored afterwards): the search is a long chain of small steps
    that a second thread only slows down, badly so on a busy machine. Memory besides
    ``features`` (and the projected copy, if any): about 148 bytes per row (see
    :func:`greedy_kcenter`), e.g. a quarter of the float32 features at D = 152.

    Returns:
        (n,) int64 indices into ``features``, in selection order (the first one is the seeded
        random start, each next one the feature farthest from all previous ones).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    num = features.shape[0]
    if not (1 <= n <= num):
        raise ValueError(f"n must be in [1, N={num}] (number of features), got {n!r}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a float tensor, got {features.dtype}")
    x = features.detach()
    check_finite(x)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with OneThread():
        if projection_dim is not None:
            x = random_projection(x, projection_dim, gen)
        start = int(torch.randint(num, (1,), generator=gen, device=gen.device).item())
        return greedy_kcenter(x, n, start, progress=progress)


def chunked_greedy_coreset(
    features: torch.Tensor,
    n: int,
    *,
    chunk_rows: int = 2048,
    oversample: float = 10.0,
    repair_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> CoresetSelection:
    """Greedy k-center coreset in time about linear in the number of features.

    Three stages (a composable coreset, then a repair of its worst misses):

    1. The rows are cut into consecutive chunks of ``chunk_rows`` (neighbouring rows come from
       the same image and are alike). Each chunk keeps its greedy k-center selection of
       ``ceil(oversample * n / N)`` of its rows: a plain in-cache loop per chunk, cost
       ``N * chunk_rows * oversample * n / N * d`` -- linear in N.
    2. The exact greedy on the union of the chunk selections (about ``oversample * n`` rows)
       picks ``n - n_repair`` rows, ``n_repair = round(repair_fraction * n)``, with batched
       updates (:func:`~patchcore.core.sampling.stages.union_greedy`: one matrix product per
       round of certified picks).
    3. Repair: the distance of every row to those picks (one blockwise scan, bfloat16 where
       the CPU has it natively, with its error bound, see :mod:`patchcore.core.search`), then the
       greedy continues among the
       ``20 * n_repair`` rows farthest by the bound, with exact distances, for the last
       ``n_repair`` picks -- the rows the union missed are the ones a greedy step would take.

    Stages 2 and 3 cost about ``oversample * n^2 * d`` and ``N * n * d`` multiply-adds as
    matrix products: linear in N for a capped bank size. When ``oversample * n >= N`` stage 1
    keeps every row and the result is :func:`greedy_coreset`'s. Measured against the exact
    greedy on all training images of the shared sets (benchmarks/RESULTS.md): coverage radius
    within 1 %, image AUROC within 0.003.

    Args:
        features: (N, D) float tensor (float16 read in place, converted a chunk at a time).
        n: rows to select, 1 <= n <= N.
        chunk_rows: rows per stage-1 chunk (2048 float32 rows of 152-168 features fit 2 MiB of L2).
        oversample: stage-1 union size over ``n``.
        repair_fraction: share of ``n`` picked by the repair stage, in [0, 0.5].
        seed: seeds every chunk's and the union's start.
        progress: show progress bars.

    Returns:
        :class:`CoresetSelection` (indices in selection order, reached coverage radius).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    num = features.shape[0]
    if not (1 <= n <= num):
        raise ValueError(f"n must be in [1, N={num}] (number of features), got {n!r}")
    check_stages(chunk_rows, oversample, repair_fraction)
    x = features.detach()
    check_finite(x)
    gen = torch.Generator().manual_seed(seed)
    keep = keep_fraction(num, n, oversample)
    if keep >= 1.0:  # nothing would be left out: the exact pruned search, as greedy_coreset
        start = int(torch.randint(num, (1,), generator=gen).item())
        with OneThread():
            picked = greedy_kcenter(x, n, start, progress=progress)
        return repair_stage(x, picked, 0, progress=progress, desc=RADIUS_WORDS)
    t0 = time.perf_counter()
    starts = chunk_starts(num, chunk_rows, gen)
    union = chunk_stage(x, keep, chunk_rows=chunk_rows, starts=starts, progress=progress)
    n_repair = repair_size(n, num, repair_fraction) if union.numel() < num else 0
    start = int(torch.randint(union.numel(), (1,), generator=gen).item())
    t1 = time.perf_counter()
    if union.numel() == num:  # every chunk kept every row: the exact search
        with OneThread():
            picked = greedy_kcenter(x, n, start, progress=progress, desc=PASS_WORDS.format(k=2))
    else:  # multithreaded matrix products from here on
        picked = union[union_greedy(x[union], n - n_repair, start, progress=progress)]
    t2 = time.perf_counter()
    sel = repair_stage(x, picked, n_repair, progress=progress)
    return sel._replace(stage_seconds=(t1 - t0, t2 - t1, time.perf_counter() - t2))


def extend_coreset(
    features: torch.Tensor,
    n: int,
    *,
    bank: torch.Tensor,
    chunk_rows: int = 2048,
    oversample: float = 10.0,
    repair_fraction: float = 0.1,
    progress: bool = False,
) -> CoresetSelection:
    """Continue the greedy k-center from an existing selection ``bank`` into new ``features``.

    The greedy as if ``bank``'s rows had been selected first: every new row starts at its
    squared distance to the nearest bank row (one scan, bfloat16 where the CPU has it natively,
    with its error bound; exact float32 for every row that could be among the
    ``oversample * n`` farthest), and the picks are the new rows
    the greedy would take next, in the three stages of :func:`chunked_greedy_coreset` (each
    chunk's greedy and the union's start from those distances; no random start is needed: the
    first pick is the farthest row). Time: one (N, M) distance scan against the bank plus the
    coreset's own cost, both linear in the new rows N. When ``oversample * n >= N`` every row
    is in the union and the picks are the plain continued greedy's (to the rounding of the
    distance expansions).

    Args:
        features: (N, D) new rows (float16 read in place, converted a block at a time).
        n: new rows to select, 1 <= n <= N.
        bank: (M, D) the rows selected before (any float dtype).
        chunk_rows, oversample, repair_fraction, progress: as :func:`chunked_greedy_coreset`.

    Returns:
        :class:`CoresetSelection`: indices (n,) into ``features`` in selection order, and the
        coverage radius of ``bank`` plus the picks over ``features``.
    """
    if features.ndim != 2 or bank.ndim != 2 or features.shape[1] != bank.shape[1]:
        raise ValueError(
            f"features (N, D) and bank (M, D) must be 2-D with the same D, got "
            f"{tuple(features.shape)} and {tuple(bank.shape)}"
        )
    num = features.shape[0]
    if not (1 <= n <= num):
        raise ValueError(f"n must be in [1, N={num}] (number of new features), got {n!r}")
    if bank.shape[0] < 1:
        raise ValueError("bank is empty: use chunked_greedy_coreset for a first selection")
    check_stages(chunk_rows, oversample, repair_fraction)
    x = features.detach()
    check_finite(x)
    check_finite(bank.detach())
    init, upper = bank_distances(x, bank, int(min(num, math.ceil(oversample * n))))
    keep = keep_fraction(num, n, oversample)
    if keep >= 1.0:
        union = torch.arange(num, device=x.device)
    else:
        union = chunk_stage(x, keep, chunk_rows=chunk_rows, u2_init=init, progress=progress)
    n_repair = repair_size(n, num, repair_fraction) if union.numel() < num else 0
    u0 = init[union]
    local = union_greedy(x[union], n - n_repair, int(u0.argmax()), progress=progress, u2_init=u0)
    return repair_stage(x, union[local], n_repair, progress=progress, u2_init=upper)


def check_finite(x: torch.Tensor) -> None:
    """ValueError if ``x`` holds a NaN or an infinity (checked block by block, in float64)."""
    step = max(1, kcenter.CHUNK_BYTES // (8 * max(1, x.shape[1])))
    for lo in range(0, x.shape[0], step):
        if not math.isfinite(float(x[lo : lo + step].sum(dtype=torch.float64))):
            raise ValueError("features contain NaN or infinite values; clean them before sampling")


def coverage_radius(
    features: torch.Tensor, selected: torch.Tensor, *, chunk_size: int = 4096
) -> float:
    """Largest distance from any feature to its nearest selected feature.

    Args:
        features: (N, D); half precision is converted a block at a time.
        selected: (n,) indices into ``features``.
        chunk_size: features handled per distance block.

    Returns:
        ``max_i min_j ||features[i] - features[selected[j]]||`` (Euclidean, unprojected).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if selected.numel() == 0:
        raise ValueError("selected must hold at least one index")
    x = features.detach()
    work = work_dtype(x.dtype)
    centres = x[selected.to(x.device).long()].to(work)
    csq = (centres * centres).sum(1)
    worst = 0.0
    for lo in range(0, x.shape[0], chunk_size):
        q = x[lo : lo + chunk_size].to(work)
        d2 = torch.addmm(csq.unsqueeze(0), q, centres.T, alpha=-2.0)
        d2 += (q * q).sum(1, keepdim=True)
        worst = max(worst, float(d2.amin(1).max().clamp(min=0.0)))
    return math.sqrt(worst)
