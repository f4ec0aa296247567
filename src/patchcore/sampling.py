"""Memory-bank subsampling: exact greedy k-center coreset and seeded random subsampling.

The coreset is the greedy k-center (farthest-point) selection of Sener & Savarese used by
PatchCore: start from one seeded random feature, then repeatedly add the feature farthest from
everything selected so far. Distances are Euclidean, measured after a seeded Gaussian random
projection (as in PatchCore) and ties go to the lowest feature index.

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
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

__all__ = [
    "coreset_size",
    "coverage_radius",
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
        (N, dim) = ``features @ P`` with ``P`` (D, dim) standard normal / sqrt(dim).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {dim!r}")
    d_in = features.shape[1]
    if dim >= d_in:
        return features
    p = torch.randn(d_in, dim, generator=generator, device=generator.device, dtype=torch.float32)
    p = p.to(device=features.device, dtype=features.dtype) / math.sqrt(dim)
    return features @ p


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
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Exact greedy k-center coreset (farthest-point selection), seeded.

    Args:
        features: (N, D) float tensor (float16/bfloat16 are computed in float32).
        n: number of features to select, 1 <= n <= N.
        projection_dim: random-projection dimension used for the distances (None: no
            projection; no projection either when >= D).
        seed: seeds the projection and the first centre.
        progress: show a tqdm progress bar.

    Runs on one torch thread (restored afterwards): the search is a long chain of small steps
    that a second thread only slows down, badly so on a busy machine.

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
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not math.isfinite(float(x.sum())):  # a single NaN or inf spoils the sum
        raise ValueError("features contain NaN or infinite values; clean them before sampling")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with _OneThread():
        if projection_dim is not None:
            x = random_projection(x, projection_dim, gen)
        start = int(torch.randint(num, (1,), generator=gen, device=gen.device).item())
        return _greedy_kcenter(x, n, start, progress=progress)


def coverage_radius(
    features: torch.Tensor, selected: torch.Tensor, *, chunk_size: int = 4096
) -> float:
    """Largest distance from any feature to its nearest selected feature.

    Args:
        features: (N, D).
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
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    centres = x[selected.to(x.device).long()]
    csq = (centres * centres).sum(1)
    worst = 0.0
    for lo in range(0, x.shape[0], chunk_size):
        q = x[lo : lo + chunk_size]
        d2 = torch.addmm(csq.unsqueeze(0), q, centres.T, alpha=-2.0)
        d2 += (q * q).sum(1, keepdim=True)
        worst = max(worst, float(d2.amin(1).max().clamp(min=0.0)))
    return math.sqrt(worst)


# --------------------------------------------------------------------------------------------
# Pruned greedy k-center.
#
# Layout: the (centred, projected) features are rotated onto their principal axes, which changes
# no distance. A balanced kd-tree on the leading `p` coordinates cuts them into leaves of about
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
# computed exact distance, had it been computed, would not have been smaller than u2.
# --------------------------------------------------------------------------------------------

_NAIVE_MAX_BYTES = 16 << 20  # below this (N x d) size the plain loop wins: the rows stay in cache
_LEAF_SIZE = 16  # target rows per leaf
_BRANCHING = (8, 8)  # children per node below the top level, top to bottom (last: leaves)
_ROW_DIMS = 32  # principal coordinates in the row bound and the boxes below the top level
_TOP_DIMS = 16  # principal coordinates in the top-level boxes

# Row gathers go through the embedding kernel (a plain row gather).
_rows = torch.embedding


def _kd_order(points: torch.Tensor, levels: int) -> torch.Tensor:
    """Balanced kd-tree order: ``2**levels`` equal runs of rows that are compact boxes.

    Each node is split at the median of its highest-variance coordinate (variance estimated on
    at most 256 rows of the node). ``len(points)`` must be divisible by ``2**levels``.

    Returns:
        (len(points),) permutation.
    """
    total, dim = points.shape
    flat = points.reshape(-1)
    order = torch.arange(total, device=points.device)
    for level in range(levels):
        groups = 2**level
        nodes = order.view(groups, -1)
        step = max(1, nodes.shape[1] // 256)
        sample = _rows(points, nodes[:, ::step].reshape(-1)).view(groups, -1, dim)
        axis = sample.var(1).argmax(1)
        key = flat.index_select(0, order * dim + axis.repeat_interleave(nodes.shape[1]))
        key = key.view(groups, -1)
        order = nodes.gather(1, key.argsort(dim=1, stable=True)).reshape(-1)
    return order


def _augmented(z: torch.Tensor, p: int) -> torch.Tensor:
    """(N, p + 1): the first ``p`` coordinates and the norm of the others."""
    rest = torch.linalg.vector_norm(z[:, p:], dim=1, keepdim=True)
    return torch.cat([z[:, :p], rest], dim=1)


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


def _greedy_naive(z: torch.Tensor, n: int, start: int, *, progress: bool = False) -> torch.Tensor:
    """The plain loop (one full matrix-vector product per step), same semantics as the tree."""
    z = z - z.mean(0)
    sq = (z * z).sum(1)
    u2 = torch.full_like(sq, math.inf)
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


def _greedy_kcenter(z: torch.Tensor, n: int, start: int, *, progress: bool = False) -> torch.Tensor:
    """Greedy k-center on rows of ``z`` (N, d) from row ``start``; see :func:`greedy_coreset`.

    Semantics (the naive loop this reproduces): ``u2[i]`` is the smallest computed squared
    distance ``|x_i|^2 - 2 x_i.c + |c|^2`` (clamped at 0) from row i to a selected centre,
    selected rows have ``u2 = 0``, and the next centre is the first argmax of ``u2`` (lowest
    row on ties).
    """
    num, d = z.shape
    if num * d * z.element_size() <= _NAIVE_MAX_BYTES:
        return _greedy_naive(z, n, start, progress=progress)
    dtype, device = z.dtype, z.device
    eps = torch.finfo(dtype).eps

    # Centre and rotate onto principal axes (estimated on a subsample: any orthonormal basis keeps
    # the result exact, a good one only makes the leading coordinates informative).
    z = z - z.mean(0)
    sample = z[:: max(1, num // 32768)].double()
    _, vecs = torch.linalg.eigh(sample.T @ sample)
    z = z @ vecs.flip(1).to(dtype)

    q = min(_ROW_DIMS, d) + 1  # augmented width of rows and of boxes below the top level
    nleaves, branching = _tree_shape(num)
    depth = len(branching)
    size = -(-num // nleaves)
    padded = nleaves * size
    counts = [nleaves // math.prod(branching)]  # counts[lev]: nodes at level lev (0 = top)
    for b in branching:
        counts.append(counts[-1] * b)
    # Padding rows copy real rows (so they do not distort the boxes) and are never selected:
    # their u2 is -inf. Their ids are >= num. Within a leaf rows are in ascending id order.
    ids = torch.arange(padded, device=device) % num
    order = _kd_order(_rows(z[:, : q - 1].contiguous(), ids), int(math.log2(nleaves)))
    order = order.view(nleaves, size).sort(dim=1).values
    order_flat = order.reshape(-1)
    zf = _rows(z, order_flat % num)  # (P, d)
    del z, ids
    xsq = (zf * zf).sum(1)
    aug = _augmented(zf, q - 1)  # (P, q)
    aug_top = _augmented(zf, min(_TOP_DIMS, d))
    runs = aug_top.view(counts[0], -1, aug_top.shape[1])
    top_lo, top_hi = runs.amin(1), runs.amax(1)
    del runs
    boxes = [_child_boxes(aug, counts[lev], b) for lev, b in enumerate(branching)]
    child_ids = [
        torch.arange(counts[lev + 1], device=device).view(counts[lev], b)
        for lev, b in enumerate(branching)
    ]
    aug_rows = aug.view(nleaves, size * q)
    xsq_rows = xsq.view(nleaves, size)
    row_ids = torch.arange(padded, device=device).view(nleaves, size)
    tol2 = 2.0 * (4 * d + 16) * eps * float(xsq.max())

    u2 = torch.full((padded,), math.inf, dtype=dtype, device=device)
    u2.masked_fill_(order_flat >= num, -math.inf)
    u2_rows = u2.view(nleaves, size)

    def all_maxima() -> list[torch.Tensor]:
        out = [u2_rows.amax(1)]
        for lev in reversed(range(depth)):
            out.insert(0, out[0].view(counts[lev], branching[lev]).amax(1))
        return out

    maxima = all_maxima()  # maxima[lev]: largest u2 under each node of level lev
    position = torch.empty(padded, dtype=torch.long, device=device)
    position[order_flat] = torch.arange(padded, device=device)
    fast_argmax = counts[0] >= 2 and all(b >= 2 for b in branching)

    pos = int(position[start])
    picked = [pos]
    bar = tqdm(total=n, desc="coreset", unit="pt", disable=not progress, mininterval=0.5)
    for k in range(1, n):
        c = zf[pos]
        a_c = aug[pos]
        a_top = aug_top[pos]
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
            d2 = torch.addmv(xsq, zf, c, alpha=-2.0).add_(csq).clamp_(min=0.0)
            torch.minimum(u2, d2, out=u2)
            maxima = all_maxima()
        else:
            # Rows of those leaves: cheap bound first, exact distance where it is below u2.
            ub = _rows(u2_rows, leaves)  # (L, S)
            xs = _rows(xsq_rows, leaves)
            lb = torch.matmul(_rows(aug_rows, leaves).view(-1, size, q), a_c)
            keep = torch.add(xs, lb, alpha=-2.0).sub_(ub) < tol2 - csq
            rows = _rows(row_ids, leaves).masked_select(keep)
            d2 = torch.addmv(xs.masked_select(keep), _rows(zf, rows), c, alpha=-2.0)
            d2 = torch.minimum(ub.masked_select(keep), d2.add_(csq).clamp_(min=0.0))
            ub.masked_scatter_(keep, d2)
            u2_rows.index_copy_(0, leaves, ub)
            maxima[depth].index_copy_(0, leaves, ub.amax(1))
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
            tied = (u2 == u2.max()).nonzero().squeeze(1)
            pos = int(tied[order_flat[tied].argmin()])
        picked.append(pos)
        if progress and k % 256 == 0:
            bar.update(256)
    bar.update(n - bar.n)
    bar.close()
    return order_flat[torch.tensor(picked, device=device)]
