"""Memory-bank subsampling: greedy k-center coresets and seeded random subsampling.

:func:`chunked_greedy_coreset` (the detector's default) selects in time linear in the number of
features for a capped bank: a greedy per chunk of rows, the exact greedy on the union of the
chunk selections, and a repair pass that measures every row's distance and lets the greedy take
the rows the union missed. :func:`greedy_coreset` below is the exact greedy on all rows.

The coreset is the greedy k-center (farthest-point) selection of Sener & Savarese used by
PatchCore: start from one seeded random feature, then repeatedly add the feature farthest from
everything selected so far. Distances are Euclidean, measured on the features themselves by
default (an optional seeded Gaussian random projection, as in the PatchCore paper, is available
for very wide features), and ties go to the lowest feature index.

Exact but fast: the naive loop costs one full ``N x d`` pass per selected feature (``N n d`` in all;
minutes for a 200-image bank on two cores). :func:`greedy_coreset` returns the same selection while
touching only the features a new centre can possibly move closer to. The features are rotated onto
their principal axes (no distance changes) and cut by a balanced kd-tree into leaves of ~16 rows,
grouped under two levels of nodes. Every node and leaf keeps the bounding box of its rows'
augmented vectors (leading principal coordinates plus the norm of the remaining ones, whose
distances lower-bound the true ones) and the largest current nearest-centre distance of its
rows. A new centre descends only into boxes closer to it than that largest distance, then bounds
each row of the surviving leaves cheaply and computes exact distances only where the bound does
not rule an update out. Skipped rows provably keep their nearest centre (bounds carry an explicit
rounding margin), so the result is the naive loop's, index for index.

Memory-lean: the features are never copied whole. The rotation is streamed block by block into
the per-row augmented vectors (33 numbers) kept in tree order; exact distances gather the few
rows they need from the caller's tensor (float16 storage included) and convert them per step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from patchcore.core.search import NearestNeighborIndex, resolve_precision

__all__ = [
    "CoresetSelection",
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
    work = _work_dtype(features.dtype)
    p = torch.randn(d_in, dim, generator=generator, device=generator.device, dtype=torch.float32)
    p = p.to(device=features.device, dtype=work) / math.sqrt(dim)
    if features.dtype == work:
        return features @ p
    out = torch.empty(num, dim, dtype=work, device=features.device)
    step = max(1, _CHUNK_BYTES // (8 * d_in))
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
    :func:`_greedy_kcenter`), e.g. a quarter of the float32 features at D = 152.

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
    _check_finite(x)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with _OneThread():
        if projection_dim is not None:
            x = random_projection(x, projection_dim, gen)
        start = int(torch.randint(num, (1,), generator=gen, device=gen.device).item())
        return _greedy_kcenter(x, n, start, progress=progress)


class CoresetSelection(NamedTuple):
    """Output of :func:`chunked_greedy_coreset`.

    indices: (n,) int64 into the features. radius: the coverage radius the selection reached
    (largest distance from any feature to its nearest selected one), certified by the repair
    pass (float32 to rounding; an upper bound in the rare case of too many doubtful rows).
    """

    indices: torch.Tensor
    radius: float


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
       updates (:func:`_greedy_batched`: one matrix product per round of certified picks).
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
        chunk_rows: rows per stage-1 chunk (2048 x 152 float32 rows stay in a 2 MiB L2 cache).
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
    _check_stages(chunk_rows, oversample, repair_fraction)
    x = features.detach()
    _check_finite(x)
    gen = torch.Generator().manual_seed(seed)
    keep = min(1.0, oversample * n / num)
    with _OneThread():
        if keep >= 1.0:
            union = torch.arange(num, device=x.device)
        else:
            union = _chunk_selections(x, keep, chunk_rows, gen, progress)
        n_repair = int(round(repair_fraction * n)) if union.numel() < num else 0
        n_repair = min(n_repair, num - n)
        start = int(torch.randint(union.numel(), (1,), generator=gen).item())
        if union.numel() == num:  # nothing was left out: the exact pruned search, as greedy_coreset
            picked = _greedy_kcenter(x, n, start, progress=progress)
    if union.numel() < num:  # multithreaded matrix products from here on
        picked = union[_greedy_batched(x[union], n - n_repair, start, progress=progress)]
    return _repair(x, picked, n_repair, progress)


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
    _check_stages(chunk_rows, oversample, repair_fraction)
    x = features.detach()
    _check_finite(x)
    _check_finite(bank.detach())
    init, upper = _bank_distances(x, bank, int(min(num, math.ceil(oversample * n))))
    keep = min(1.0, oversample * n / num)
    with _OneThread():
        if keep >= 1.0:
            union = torch.arange(num, device=x.device)
        else:
            union = _chunk_selections(x, keep, chunk_rows, None, progress, u2_init=init)
    n_repair = int(round(repair_fraction * n)) if union.numel() < num else 0
    n_repair = min(n_repair, num - n)
    u0 = init[union]
    local = _greedy_batched(x[union], n - n_repair, int(u0.argmax()), progress=progress, u2_init=u0)
    return _repair(x, union[local], n_repair, progress, u2_init=upper)


def _check_stages(chunk_rows: int, oversample: float, repair_fraction: float) -> None:
    """The stage arguments of :func:`chunked_greedy_coreset` and :func:`extend_coreset`."""
    if chunk_rows < 2:
        raise ValueError(f"chunk_rows must be >= 2, got {chunk_rows!r}")
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample!r}")
    if not (0 <= repair_fraction <= 0.5):
        raise ValueError(f"repair_fraction must be in [0, 0.5], got {repair_fraction!r}")


def _bank_distances(x: torch.Tensor, bank: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Squared distances of the rows of ``x`` to their nearest ``bank`` row: ``(d2, upper)``.

    One scan in bfloat16 where the CPU has it natively (float32 otherwise), with its error
    bound; every row that could be among the ``top`` farthest is re-computed in float32, so
    ``d2`` is exact (float32) there and within the bound elsewhere, and ``upper`` is exact
    there and an upper bound elsewhere (for a certified radius).
    """
    num = x.shape[0]
    b = bank.detach().float()
    index = NearestNeighborIndex(b, precision=resolve_precision("auto", b.device))
    d2, err = torch.empty(num), torch.empty(num)
    step = 16384
    for lo in range(0, num, step):
        part, e = index.min_sq_bounded(x[lo : lo + step])
        d2[lo : lo + step], err[lo : lo + step] = part.clamp_(min=0.0), e
    if index.precision == "float32":
        return d2, d2.clone()
    upper = d2 + err
    floor = torch.topk(d2 - err, max(1, min(num, top))).values[-1]
    check = (upper >= floor).nonzero().squeeze(1)
    for lo in range(0, check.numel(), step):
        rows = check[lo : lo + step]
        exact = index.exact_min_distances(x[rows]).double().square().float()
        d2[rows], upper[rows] = exact, exact
    return d2, upper


def _chunk_selections(
    x: torch.Tensor,
    keep: float,
    chunk_rows: int,
    gen: torch.Generator | None,
    progress: bool,
    u2_init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1: the greedy selection of ``ceil(keep * rows)`` rows of each chunk, as indices.

    With ``u2_init`` (N,) (squared distances to centres selected before), each chunk's greedy
    continues from them (its first pick is the chunk's farthest row; ``gen`` is not used).
    """
    num = x.shape[0]
    out = []
    bar = tqdm(total=num, desc="coreset: chunks", unit="row", disable=not progress, mininterval=0.5)
    for lo in range(0, num, chunk_rows):
        part = x[lo : lo + chunk_rows]
        m = max(1, math.ceil(part.shape[0] * keep))
        if u2_init is None:
            assert gen is not None
            start = int(torch.randint(part.shape[0], (1,), generator=gen).item())
            out.append(lo + _greedy_naive(part, m, start))
        else:
            init = u2_init[lo : lo + chunk_rows]
            out.append(lo + _greedy_naive(part, m, int(init.argmax()), u2_init=init))
        bar.update(part.shape[0])
    bar.close()
    return torch.cat(out)


def _greedy_batched(
    x: torch.Tensor,
    n: int,
    start: int,
    *,
    candidates: int = 512,
    progress: bool = False,
    u2_init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy k-center with its distance updates batched into matrix products.

    The greedy's next pick is the row farthest from the selection. Given the ``candidates + 1``
    largest current distances, every row outside the top ``candidates`` is at most as far as the
    last of them, so greedy steps taken among the candidates alone (their distances updated
    against each new pick, ``candidates`` x d work) are the greedy's own steps for as long as
    the farthest candidate stays at least that far. The whole set's distances are then updated
    against all picks of the round in one (N, picks) product. Same selection as the plain loop up
    to the rounding of the distance expansions (no tie rule is promised); a round costs one
    top-k and one product over N rows instead of one pass over N rows per pick.

    Args:
        x: (N, d) rows (any float dtype; converted to float32 once). n: picks. start: first pick.
        u2_init: optional (N,) squared distances of the rows to centres selected before (the
            greedy then continues from those centres); default: none selected (infinity).

    Returns:
        (n,) int64 row indices in selection order.
    """
    z = x.float()
    z = z - z.mean(0)
    sq = (z * z).sum(1)
    num = z.shape[0]
    u2 = torch.full((num,), math.inf) if u2_init is None else u2_init.float().clone()
    picked = [start]
    batch = [start]
    bar = tqdm(total=n, desc="coreset: union", unit="pt", disable=not progress, mininterval=0.5)
    while True:
        rows = torch.tensor(batch)
        centres, csq_row = z[rows].T.contiguous(), sq[rows].unsqueeze(0)
        step = max(1, _CHUNK_BYTES * 4 // (4 * len(batch)))  # bounded (rows, picks) blocks
        for lo in range(0, num, step):
            d2 = torch.addmm(csq_row, z[lo : lo + step], centres, alpha=-2.0)
            d2 += sq[lo : lo + step].unsqueeze(1)
            part = u2[lo : lo + step]
            torch.minimum(part, d2.amin(1).clamp_(min=0.0), out=part)
        u2[rows] = -1.0  # selected: never picked again
        bar.update(len(batch))
        if len(picked) >= n:
            break
        k = min(candidates + 1, num)
        vals, cand = torch.topk(u2, k)
        floor = float(vals[-1]) if k < num else -math.inf  # no row outside is farther
        m = k - 1 if k < num else k
        cu2, c = vals[:m].clone(), cand[:m]
        cz, csq = z[c], sq[c]
        batch = []
        with _OneThread():  # a chain of small steps
            _greedy_among(cu2, c, cz, csq, floor, n, picked, batch)
        if not batch:
            break
    bar.close()
    return torch.tensor(picked[:n])


def _greedy_among(
    cu2: torch.Tensor,
    c: torch.Tensor,
    cz: torch.Tensor,
    csq: torch.Tensor,
    floor: float,
    n: int,
    picked: list[int],
    batch: list[int],
) -> None:
    """Greedy steps among the candidates of :func:`_greedy_batched` while they are certified."""
    while len(picked) < n:
        j = int(cu2.argmax())
        if batch and not float(cu2[j]) > floor:  # outside rows could be as far: stop
            break
        if float(cu2[j]) < 0:  # every candidate is selected (tiny sets)
            break
        batch.append(int(c[j]))
        picked.append(int(c[j]))
        dc = torch.addmv(csq, cz, cz[j], alpha=-2.0).add_(csq[j]).clamp_(min=0.0)
        torch.minimum(cu2, dc, out=cu2)
        cu2[j] = -1.0


def _repair(
    x: torch.Tensor,
    picked: torch.Tensor,
    n_repair: int,
    progress: bool,
    u2_init: torch.Tensor | None = None,
) -> CoresetSelection:
    """Stage 3 of :func:`chunked_greedy_coreset`: continue the greedy among the farthest rows.

    Every row's squared distance to ``picked`` comes from the index scan (bfloat16 on CPUs with
    native bf16) with its error bound ``err``; the ``20 * n_repair`` rows with the largest upper
    bound ``d2 + err`` get exact distances and the last ``n_repair`` greedy picks. The reported
    radius is then certified: the rows left out whose upper bound still exceeds it are
    re-checked exactly against the final selection (at most ``_RECHECK_ROWS`` of them; beyond
    that their upper bound is reported). ``u2_init`` (N,): exact squared distances of the rows
    to centres selected before ``picked`` (they count as selected, for the picks and radius).
    """
    num = x.shape[0]
    if picked.numel() == num:
        return CoresetSelection(picked, 0.0)
    # bfloat16 where the CPU has it natively (emulated bf16 would be slower than float32)
    bank = x[picked].float()
    index = NearestNeighborIndex(bank, precision=resolve_precision("auto", bank.device))
    upper = torch.empty(num)
    step = 16384
    bar = tqdm(total=num, desc="coreset: repair", unit="row", disable=not progress, mininterval=1)
    for lo in range(0, num, step):
        d2, err = index.min_sq_bounded(x[lo : lo + step])
        upper[lo : lo + step] = d2.add_(err)
        bar.update(min(step, num - lo))
    bar.close()
    if u2_init is not None:  # exact already: the smaller bound of the two
        torch.minimum(upper, u2_init.float(), out=upper)
    size = min(num, max(1, 20 * n_repair))
    rows = torch.topk(upper, size).indices
    z = x[rows].float()
    u2 = index.exact_min_distances(z).double().square().float()
    if u2_init is not None:
        u2 = torch.minimum(u2, u2_init[rows].float())
    extra = _continue_greedy(z, u2, n_repair)
    indices = torch.cat([picked, rows[torch.tensor(extra, dtype=torch.long)]])
    radius2 = float(u2.max())
    upper[rows] = -1.0  # done exactly above
    doubt = (upper > radius2).nonzero().squeeze(1)
    if doubt.numel() > _RECHECK_ROWS:
        return CoresetSelection(indices, math.sqrt(max(radius2, float(upper.max()))))
    if doubt.numel():
        final = NearestNeighborIndex(x[indices].float())
        d2 = final.min_distances(x[doubt]).double().square()
        if u2_init is not None:
            d2 = torch.minimum(d2, u2_init[doubt].double())
        radius2 = max(radius2, float(d2.max()))
    return CoresetSelection(indices, math.sqrt(radius2))


_RECHECK_ROWS = 1 << 18  # rows re-checked exactly for the reported radius, at most


def _continue_greedy(z: torch.Tensor, u2: torch.Tensor, n: int) -> list[int]:
    """``n`` more greedy picks among the rows ``z`` (R, D) float32, given their squared
    distances ``u2`` (R,) to the selection so far (updated in place; picked rows end at 0).

    Returns:
        positions into ``z`` in selection order.
    """
    z = z - z.mean(0)
    sq = (z * z).sum(1)
    extra: list[int] = []
    d2 = torch.empty_like(sq)
    with _OneThread():
        for _ in range(n):
            pos = int(u2.argmax())
            extra.append(pos)
            torch.addmv(sq, z, z[pos], alpha=-2.0, out=d2)
            torch.minimum(u2, d2.add_(float(sq[pos])).clamp_(min=0.0), out=u2)
            u2[pos] = 0.0
    return extra


def _check_finite(x: torch.Tensor) -> None:
    """ValueError if ``x`` holds a NaN or an infinity (checked block by block, in float64)."""
    step = max(1, _CHUNK_BYTES // (8 * max(1, x.shape[1])))
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
    work = _work_dtype(x.dtype)
    centres = x[selected.to(x.device).long()].to(work)
    csq = (centres * centres).sum(1)
    worst = 0.0
    for lo in range(0, x.shape[0], chunk_size):
        q = x[lo : lo + chunk_size].to(work)
        d2 = torch.addmm(csq.unsqueeze(0), q, centres.T, alpha=-2.0)
        d2 += (q * q).sum(1, keepdim=True)
        worst = max(worst, float(d2.amin(1).max().clamp(min=0.0)))
    return math.sqrt(worst)


# --------------------------------------------------------------------------------------------
# Pruned greedy k-center.
#
# Layout: the (centred, projected) features are rotated onto their principal axes, which changes
# no distance. Only the augmented vectors below are stored (rotated in float64, rounded to the
# working dtype); exact distances use the unrotated centred rows gathered from the input.
# A balanced kd-tree on the leading `p` coordinates cuts them into leaves of about
# `_LEAF_SIZE` rows; leaves are grouped under `len(_BRANCHING)` levels of nodes. Every row also
# gets the augmented vector a = (first p coordinates, norm of the remaining ones); |a - a_c| is a
# lower bound on the distance to c (reverse triangle inequality on the remaining subspace) that
# costs p + 1 instead of d multiply-adds. Nodes and leaves keep the bounding box of their rows'
# augmented vectors (the top level with fewer coordinates) and the largest current squared
# nearest-centre distance `u2` of their rows.
#
# A new centre c descends only into boxes closer to a_c than their largest u2, computes the cheap
# bound for the rows of the surviving leaves, and the exact distance only for rows whose bound is
# below their own u2. Nothing skipped could have lowered any u2, so the selection is that of the
# naive loop.
#
# Rounding: every squared distance or bound is computed with an absolute error below
# `tol = (4 d + 16) eps max|x|^2` (norm expansion of a length-d dot product, box gaps of at most
# p + 1 coordinates); a row is skipped only when its bound exceeds its u2 by 2 tol, so the
# computed exact distance, had it been computed, would not have been smaller than u2. The stored
# augmented vectors are off by at most `rot = eps + d^1.5 eps64` of their norm, which moves a
# bound by less than 9 rot max|x|^2; that is added to the margin.
# --------------------------------------------------------------------------------------------

_NAIVE_MAX_BYTES = 16 << 20  # below this (N x d) size the plain loop wins: the rows stay in cache
_LEAF_SIZE = 16  # target rows per leaf
_BRANCHING = (8, 8)  # children per node below the top level, top to bottom (last: leaves)
_ROW_DIMS = 32  # principal coordinates in the row bound and the boxes below the top level
_TOP_DIMS = 16  # principal coordinates in the top-level boxes
_LEAF_BLOCK = 512  # leaves bounded per block within a step (bounds the gathered rows)
_CHUNK_BYTES = 2 << 20  # float64 bytes per streamed block of rows (no full-size temporaries)

# Row gathers go through the embedding kernel (a plain row gather).
_rows = torch.embedding


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for features stored as ``dtype``: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kd_order(table: torch.Tensor, num: int, dim: int, total: int, levels: int) -> torch.Tensor:
    """Balanced kd-tree order: ``2**levels`` equal runs of ids that are compact boxes.

    The points are ``table[:num, :dim]`` (``table`` contiguous, 2-D). Ids run over
    ``range(total)`` (``total >= num``, divisible by ``2**levels``); id ``j`` stands for point
    ``j % num`` (ids past the end pad the tree with repeated points). Each node is split at the
    median of its highest-variance coordinate (variance estimated on at most 256 points of the
    node, a bounded block of nodes at a time).

    Returns:
        (total,) permutation of ``range(total)``.
    """
    width = table.shape[1]
    flat = table.reshape(-1)
    order = torch.arange(total, device=table.device)
    for level in range(levels):
        groups = 2**level
        nodes = order.view(groups, -1)
        step = max(1, nodes.shape[1] // 256)
        block = max(1, 16384 // -(-nodes.shape[1] // step))  # nodes per variance block
        axis = torch.cat(
            [
                _rows(table, nodes[g : g + block, ::step].reshape(-1) % num)[:, :dim]
                .view(min(block, groups - g), -1, dim)
                .var(1)
                .argmax(1)
                for g in range(0, groups, block)
            ]
        )
        at = (order % num).mul_(width).add_(axis.repeat_interleave(nodes.shape[1]))
        key = flat.index_select(0, at).view(groups, -1)
        del at
        order = nodes.gather(1, key.argsort(dim=1, stable=True)).reshape(-1)
    return order


def _child_boxes(aug: torch.Tensor, parents: int, children: int) -> torch.Tensor:
    """(parents, 2 * children * q): per parent, [lo (children, q), hi (children, q)]."""
    runs = aug.view(parents, children, -1, aug.shape[1])
    return torch.stack([runs.amin(2), runs.amax(2)], 1).view(parents, -1)


def _tree_shape(num: int) -> tuple[int, list[int]]:
    """Leaves (a power of two near num / _LEAF_SIZE) and the branching below the top level."""
    levels = max(0, math.ceil(math.log2(max(1.0, num / _LEAF_SIZE))))
    branching: list[int] = []
    for b in reversed(_BRANCHING):  # bottom-up, while at least two top nodes remain
        used = sum(int(math.log2(x)) for x in branching)
        if levels - used - int(math.log2(b)) >= 1:
            branching.insert(0, b)
    return 2**levels, branching


class _OneThread:
    """Run a block on one torch thread (the previous count is restored afterwards).

    The greedy search is a long chain of small operations: a second thread only adds
    synchronisation, which is ruinous when the cores are shared with other work (on the 2-core
    development machine a second thread made the plain loop 10-20 times slower).
    """

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


def _greedy_naive(
    z: torch.Tensor,
    n: int,
    start: int,
    *,
    progress: bool = False,
    u2_init: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain loop (one full matrix-vector product per step), same semantics as the tree.

    ``u2_init`` (N,): squared distances to centres selected before (default: infinity).
    """
    z = z.to(_work_dtype(z.dtype))
    z = z - z.mean(0)
    sq = (z * z).sum(1)
    u2 = torch.full_like(sq, math.inf) if u2_init is None else u2_init.to(sq.dtype).clone()
    d2 = torch.empty_like(sq)
    pos = start
    picked = [pos]
    bar = tqdm(total=n, desc="coreset", unit="pt", disable=not progress, mininterval=0.5)
    for k in range(1, n):
        torch.addmv(sq, z, z[pos], alpha=-2.0, out=d2)
        torch.minimum(u2, d2.add_(float(sq[pos])).clamp_(min=0.0), out=u2)
        u2[pos] = 0.0
        pos = int(u2.argmax())
        picked.append(pos)
        if progress and k % 256 == 0:
            bar.update(256)
    bar.update(n - bar.n)
    bar.close()
    return torch.tensor(picked, device=z.device)


def _greedy_kcenter(x: torch.Tensor, n: int, start: int, *, progress: bool = False) -> torch.Tensor:
    """Greedy k-center on rows of ``x`` (N, d) from row ``start``; see :func:`greedy_coreset`.

    Semantics (the naive loop this reproduces): with ``v_i`` row i converted to the working
    dtype (float64 for float64 input, else float32) minus the mean row, ``u2[i]`` is the
    smallest computed squared distance ``|v_i|^2 - 2 v_i.v_c + |v_c|^2`` (clamped at 0) from
    row i to a selected centre, selected rows have ``u2 = 0``, and the next centre is the first
    argmax of ``u2`` (lowest row on ties).

    Memory: besides ``x`` itself (read in place, any float dtype, never copied whole), the
    search keeps per row its augmented vector (33 working-dtype numbers), squared norm, ``u2``
    and kd-tree position: 148 bytes per row in float32, a quarter of a float32 152-d feature
    row. Exact distances gather the few rows they need from ``x`` and convert them per step.
    """
    num, d = x.shape
    work = _work_dtype(x.dtype)
    if num * d * torch.finfo(work).bits // 8 <= _NAIVE_MAX_BYTES:
        return _greedy_naive(x, n, start, progress=progress)
    device = x.device
    eps = torch.finfo(work).eps
    chunk = max(256, _CHUNK_BYTES // (8 * d))  # rows per streamed block

    # Mean and principal axes (estimated on a subsample: any orthonormal basis keeps the result
    # exact, a good one only makes the leading coordinates informative), streamed in float64.
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for lo in range(0, num, chunk):
        total += x[lo : lo + chunk].sum(0, dtype=torch.float64)
    mean = (total / num).to(work)
    mean64 = mean.double()
    step = max(1, num // 32768)
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    for lo in range(0, num, chunk * step):
        sample = x[lo : lo + chunk * step : step].to(work).double() - mean64
        gram.addmm_(sample.T, sample)
    vecs = torch.linalg.eigh(gram)[1].flip(1)  # (d, d) float64, leading axes first

    def centred(ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``x`` as centred working-dtype rows (a fresh tensor)."""
        return _rows(x, ids).to(work).sub_(mean)

    p = min(_ROW_DIMS, d)
    q = p + 1  # augmented width of rows and of boxes below the top level
    t = min(_TOP_DIMS, d)  # principal coordinates in the top-level boxes
    nleaves, branching = _tree_shape(num)
    depth = len(branching)
    size = -(-num // nleaves)
    padded = nleaves * size
    counts = [nleaves // math.prod(branching)]  # counts[lev]: nodes at level lev (0 = top)
    for b in branching:
        counts.append(counts[-1] * b)

    # kd order from the leading principal coordinates (any order keeps the result exact).
    # Padding rows repeat real rows (so they do not distort the boxes) and are never selected:
    # their u2 is -inf. Their ids are >= num. Within a leaf rows are in ascending id order.
    # The leading coordinates are written into the buffer of the augmented vectors, which
    # the rotation pass below overwrites: no separate full-size allocation (and no large free
    # that would raise glibc's mmap threshold and leave the heap fragmented).
    aug = torch.empty(padded, q, dtype=work, device=device)
    rot_lead = vecs[:, :p].to(work)
    for lo in range(0, num, chunk):
        aug[lo : min(lo + chunk, num), :p] = (x[lo : lo + chunk].to(work) - mean) @ rot_lead
    order = _kd_order(aug, num, p, padded, int(math.log2(nleaves)))
    order = order.view(nleaves, size).sort(dim=1).values.reshape(-1)
    pad = order >= num
    pos = int((order == start).nonzero()[0, 0])
    src = order.remainder_(num)  # (P,) row of x at each tree position
    del order

    # Augmented vectors a = (first p principal coordinates, norm of the others) and squared
    # norms, in tree order, rotated in float64 block by block from x.
    xsq = torch.empty(padded, dtype=work, device=device)
    for lo in range(0, padded, chunk):
        v = centred(src[lo : lo + chunk]).double()
        y = v @ vecs
        aug[lo : lo + chunk, :p] = y[:, :p]
        aug[lo : lo + chunk, p] = torch.linalg.vector_norm(y[:, p:], dim=1)
        xsq[lo : lo + chunk] = v.mul_(v).sum(1)
        del v, y

    def top_aug(a: torch.Tensor) -> torch.Tensor:
        """Top-level augmented vectors: first t coordinates, norm of the rest of ``a``."""
        rest = torch.linalg.vector_norm(a[..., t:], dim=-1, keepdim=True)
        return torch.cat([a[..., :t], rest], dim=-1)

    run = padded // counts[0]
    top_lo = torch.empty(counts[0], t + 1, dtype=work, device=device)
    top_hi = torch.empty_like(top_lo)
    per = max(1, chunk // run)
    for g in range(0, counts[0], per):
        runs = top_aug(aug[g * run : (g + per) * run]).view(-1, run, t + 1)
        top_lo[g : g + per], top_hi[g : g + per] = runs.amin(1), runs.amax(1)
    del runs
    boxes = [_child_boxes(aug, counts[lev], b) for lev, b in enumerate(branching)]
    child_ids = [
        torch.arange(counts[lev + 1], device=device).view(counts[lev], b)
        for lev, b in enumerate(branching)
    ]
    aug_rows = aug.view(nleaves, size * q)
    xsq_rows = xsq.view(nleaves, size)
    in_leaf = torch.arange(size, device=device)
    # Rounding margin: norm expansion and box gaps (see the notes above), plus the error of the
    # stored augmented vectors (rounded to the working dtype from a float64 rotation).
    rot_err = eps + d * math.sqrt(d) * torch.finfo(torch.float64).eps
    tol2 = (2.0 * (4 * d + 16) * eps + 10.0 * rot_err) * float(xsq.max())

    u2 = torch.full((padded,), math.inf, dtype=work, device=device)
    u2.masked_fill_(pad, -math.inf)
    del pad
    u2_rows = u2.view(nleaves, size)

    def all_maxima() -> list[torch.Tensor]:
        out = [u2_rows.amax(1)]
        for lev in reversed(range(depth)):
            out.insert(0, out[0].view(counts[lev], branching[lev]).amax(1))
        return out

    maxima = all_maxima()  # maxima[lev]: largest u2 under each node of level lev
    fast_argmax = counts[0] >= 2 and all(b >= 2 for b in branching)

    picked = [pos]
    bar = tqdm(total=n, desc="coreset", unit="pt", disable=not progress, mininterval=0.5)
    for k in range(1, n):
        c = centred(src[pos : pos + 1])[0]
        a_c = aug[pos]
        a_top = top_aug(a_c)
        csq = float(xsq[pos])
        u2[pos] = 0.0
        # Descend into the nodes whose box comes closer to the centre than their largest u2.
        gap = torch.clamp(a_top, top_lo, top_hi).sub_(a_top)
        visited = [(gap.mul_(gap).sum(1) < maxima[0] + tol2).nonzero().squeeze(1)]
        dense = visited[0].numel() * 10 > counts[0] * 9  # nothing to prune: one full pass
        for lev, b in enumerate([] if dense else branching):
            ids = visited[-1]
            box = _rows(boxes[lev], ids).view(-1, 2, b, q)
            gap = torch.clamp(a_c, box[:, 0], box[:, 1]).sub_(a_c)
            limit = _rows(maxima[lev + 1].view(counts[lev], b), ids).add_(tol2)
            near = gap.mul_(gap).sum(2) < limit
            visited.append(_rows(child_ids[lev], ids).masked_select(near))
        leaves = visited[-1]
        if dense or leaves.numel() * 2 > nleaves:
            for lo in range(0, padded, chunk):
                d2 = torch.addmv(xsq[lo : lo + chunk], centred(src[lo : lo + chunk]), c, alpha=-2.0)
                part = u2[lo : lo + chunk]
                torch.minimum(part, d2.add_(csq).clamp_(min=0.0), out=part)
            maxima = all_maxima()
        else:
            # Rows of those leaves: cheap bound first, exact distance where it is below u2
            # (a bounded block of leaves at a time: early steps visit many).
            for b0 in range(0, leaves.numel(), _LEAF_BLOCK):
                blk = leaves[b0 : b0 + _LEAF_BLOCK]
                ub = _rows(u2_rows, blk)  # (L, S)
                xs = _rows(xsq_rows, blk)
                lb = torch.matmul(_rows(aug_rows, blk).view(-1, size, q), a_c)
                keep = torch.add(xs, lb, alpha=-2.0).sub_(ub) < tol2 - csq
                rows = (blk.unsqueeze(1) * size + in_leaf).masked_select(keep)
                d2 = torch.addmv(xs.masked_select(keep), centred(src[rows]), c, alpha=-2.0)
                d2 = torch.minimum(ub.masked_select(keep), d2.add_(csq).clamp_(min=0.0))
                ub.masked_scatter_(keep, d2)
                u2_rows.index_copy_(0, blk, ub)
                maxima[depth].index_copy_(0, blk, ub.amax(1))
            for lev in reversed(range(depth)):
                ids = visited[lev]
                sub = _rows(maxima[lev + 1].view(counts[lev], branching[lev]), ids)
                maxima[lev].index_copy_(0, ids, sub.amax(1))
        # Next centre: descend along the maxima while they are unique.
        pos = -1
        if fast_argmax:
            vals, top = torch.topk(maxima[0], 2)
            v = vals.tolist()
            node = int(top[0])
            for lev, b in enumerate(branching):
                if v[0] <= v[1]:
                    break
                vals, top = torch.topk(maxima[lev + 1][node * b : (node + 1) * b], 2)
                v = vals.tolist()
                node = node * b + int(top[0])
            else:
                if v[0] > v[1]:
                    pos = node * size + int(u2_rows[node].argmax())
        if pos < 0:  # a tie (or a tiny tree): lowest id among all maxima, as the naive loop
            tied = (u2 == u2.max()).nonzero().squeeze(1)  # real rows only (padding is -inf)
            pos = int(tied[src[tied].argmin()])
        picked.append(pos)
        if progress and k % 256 == 0:
            bar.update(256)
    bar.update(n - bar.n)
    bar.close()
    return src[torch.tensor(picked, device=device)]
