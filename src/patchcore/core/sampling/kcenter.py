"""The exact greedy k-center kernel: the plain loop and the pruned search that reproduces it.

The greedy k-center (farthest-point) selection of Sener & Savarese used by PatchCore: start from
one given row, then repeatedly add the row farthest from everything selected so far (Euclidean
distances, ties to the lowest row index).

Exact but fast: the naive loop (:func:`greedy_naive`) costs one full ``N x d`` pass per selected
row (``N n d`` in all; minutes for a 200-image bank on two cores). :func:`greedy_kcenter`
returns the same selection while touching only the rows a new centre can possibly move closer
to. The rows are rotated onto their principal axes (no distance changes) and cut by a balanced
kd-tree into leaves of ~16 rows, grouped under two levels of nodes. Every node and leaf keeps the
bounding box of its rows' augmented vectors (leading principal coordinates plus the norm of the
remaining ones, whose distances lower-bound the true ones) and the largest current
nearest-centre distance of its rows. A new centre descends only into boxes closer to it than
that largest distance, then bounds each row of the surviving leaves cheaply and computes exact
distances only where the bound does not rule an update out. Skipped rows provably keep their
nearest centre (bounds carry an explicit rounding margin), so the result is the naive loop's,
index for index.

Memory-lean: the rows are never copied whole. The rotation is streamed block by block into the
per-row augmented vectors (33 numbers) kept in tree order; exact distances gather the few rows
they need from the caller's tensor (float16 storage included) and convert them per step.

The module constants tune speed only (tests shrink them to exercise every branch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from patchcore.lean.util import bounded_map

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "CHUNK_BYTES",
    "OneThread",
    "greedy_kcenter",
    "greedy_naive",
    "parallel_blocks",
    "work_dtype",
]

# --------------------------------------------------------------------------------------------
# Pruned greedy k-center.
#
# Layout: the (centred, projected) features are rotated onto their principal axes, which changes
# no distance. Only the augmented vectors below are stored (rotated in float64, rounded to the
# working dtype); exact distances use the unrotated centred rows gathered from the input.
# A balanced kd-tree on the leading `p` coordinates cuts them into leaves of about
# `LEAF_SIZE` rows; leaves are grouped under `len(BRANCHING)` levels of nodes. Every row also
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

NAIVE_MAX_BYTES = 16 << 20  # below this (N x d) size the plain loop wins: the rows stay in cache
LEAF_SIZE = 16  # target rows per leaf
BRANCHING = (8, 8)  # children per node below the top level, top to bottom (last: leaves)
ROW_DIMS = 32  # principal coordinates in the row bound and the boxes below the top level
TOP_DIMS = 16  # principal coordinates in the top-level boxes
LEAF_BLOCK = 512  # leaves bounded per block within a step (bounds the gathered rows)
CHUNK_BYTES = 2 << 20  # float64 bytes per streamed block of rows (no full-size temporaries)

# Row gathers go through the embedding kernel (a plain row gather).
_rows = torch.embedding


def work_dtype(dtype: torch.dtype) -> torch.dtype:
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
    """Leaves (a power of two near num / LEAF_SIZE) and the branching below the top level."""
    levels = max(0, math.ceil(math.log2(max(1.0, num / LEAF_SIZE))))
    branching: list[int] = []
    for b in reversed(BRANCHING):  # bottom-up, while at least two top nodes remain
        used = sum(int(math.log2(x)) for x in branching)
        if levels - used - int(math.log2(b)) >= 1:
            branching.insert(0, b)
    return 2**levels, branching


class OneThread:
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


def parallel_blocks(
    fn: Callable[[T], R], items: Iterable[T], workers: int | None = None
) -> Iterator[R]:
    """``fn(item)`` for each item, in order, on ``workers`` threads (default: torch's thread
    count) that each run torch on one thread.

    Independent blocks instead of one multithreaded operation: OpenMP's threads meet at a
    barrier after every operation, and when the cores are shared with other work one
    descheduled thread stalls the rest (on the 2-core development machine under load a
    2-thread convolution or matrix product ran 2-7 times slower than on one thread). Each
    block's result is the one-thread result, which equals the multithreaded one bit for bit
    for the products and convolutions used here (tests/test_sampling.py checks the products).
    At most ``workers`` blocks are in flight.
    """
    workers = torch.get_num_threads() if workers is None else int(workers)
    with OneThread():
        if workers <= 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="patchcore-blocks") as pool:
            yield from bounded_map(pool, fn, items, workers)


def greedy_naive(
    z: torch.Tensor,
    n: int,
    start: int,
    *,
    progress: bool = False,
    u2_init: torch.Tensor | None = None,
    desc: str = "selecting the memory bank",
) -> torch.Tensor:
    """The plain loop (one full matrix-vector product per step), same semantics as the tree.

    ``u2_init`` (N,): squared distances to centres selected before (default: infinity).
    """
    z = z.to(work_dtype(z.dtype))
    z = z - z.mean(0)
    sq = (z * z).sum(1)
    u2 = torch.full_like(sq, math.inf) if u2_init is None else u2_init.to(sq.dtype).clone()
    d2 = torch.empty_like(sq)
    pos = start
    picked = [pos]
    bar = tqdm(total=n, desc=desc, unit="row", disable=not progress, mininterval=0.5)
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


def greedy_kcenter(
    x: torch.Tensor,
    n: int,
    start: int,
    *,
    progress: bool = False,
    desc: str = "selecting the memory bank",
) -> torch.Tensor:
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
    work = work_dtype(x.dtype)
    if num * d * torch.finfo(work).bits // 8 <= NAIVE_MAX_BYTES:
        return greedy_naive(x, n, start, progress=progress, desc=desc)
    device = x.device
    eps = torch.finfo(work).eps
    chunk = max(256, CHUNK_BYTES // (8 * d))  # rows per streamed block

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

    p = min(ROW_DIMS, d)
    q = p + 1  # augmented width of rows and of boxes below the top level
    t = min(TOP_DIMS, d)  # principal coordinates in the top-level boxes
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
    bar = tqdm(total=n, desc=desc, unit="row", disable=not progress, mininterval=0.5)
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
            for b0 in range(0, leaves.numel(), LEAF_BLOCK):
                blk = leaves[b0 : b0 + LEAF_BLOCK]
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
