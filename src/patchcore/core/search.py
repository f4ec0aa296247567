"""Exact nearest-neighbour search in the memory bank by chunked matrix products.

Squared distances are expanded as ``|q|^2 - 2 q.b + |b|^2`` after centring on the bank's mean
(which keeps the cancellation error small). The bank is cached once as ``[-2 b, |b|^2]`` and the
queries extended to ``[q, 1]``, so a block of queries costs one plain matrix product giving
``|b|^2 - 2 q.b`` (faster on CPU than ``torch.cdist``, which also materialises the same ``Q x M``
block, and than ``addmm``, which first copies the broadcast ``|b|^2`` into the block). ``|q|^2`` is
constant along a row, so it is added after the reduction. Queries are processed in chunks so that
the distance block stays under a memory budget: on CPU a small one (8 MiB), as blocks that fit the
caches are faster, on GPUs a large one.

``precision="int8"`` finds each query's nearest row with an int8 scan and then measures the
distance to the row it found exactly in float32 (:meth:`NearestNeighborIndex.min_sq_upper`): a
true distance to a bank row, so an upper bound of the nearest distance, equal to it wherever the
scan found the nearest row. Integer products are exact and the quantisation is fixed when the
index is built (one scale from the bank, the bias ``|b|^2`` carried by extra integer columns), so
a query's result never depends on the others in its batch. Int8 dot products run at twice the
bfloat16 rate on CPUs with VNNI or AMX (``vpdpbusd``, ``tdpbssd``).

``precision="bfloat16"`` runs the distance products in bfloat16 (a higher rate than float32 on CPUs
with AVX-512 bf16 or AMX, benchmarks/RESULTS.md) for :meth:`NearestNeighborIndex.min_distances`, and
comes with a rigorous bound on the error of each squared distance
(:meth:`~NearestNeighborIndex.min_sq_bounded`). :func:`patch_scores` uses the bound to re-check in
float32 every patch that could hold an image's maximum, so image scores stay exact while the
per-patch map values carry the bfloat16 error (measured in benchmarks/RESULTS.md). It re-checks
the int8 scan's patches the same way, from their upper bounds.
:meth:`~NearestNeighborIndex.search` is always float32.
"""

from __future__ import annotations

import functools
import math

import torch

from patchcore.core import params

__all__ = [
    "INT8_CHUNK",
    "PRECISIONS",
    "Int8Table",
    "NearestNeighborIndex",
    "bf16_error",
    "cpu_has_bf16",
    "cpu_has_int8",
    "first_minimum",
    "nearest_neighbors",
    "patch_scores",
    "patch_scores_groups",
    "resolve_precision",
]

PRECISIONS = params.PRECISIONS  # one definition, torch-free
_BF16_UNIT = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)

DEFAULT_MAX_BLOCK_BYTES = 256 * 2**20  # budget of one distance block on GPUs
CPU_MAX_BLOCK_BYTES = 8 * 2**20  # on CPU: cache-sized blocks are faster (and need no fresh pages)
MIN_CPU_BLOCK_ROWS = 64  # ... but with a big bank at least this many queries per block


INT8_CHUNK = 256  # columns per first-stage minimum of the int8 scan's nearest-row search


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX-512 BF16 or AMX), per cpuinfo."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8() -> bool:
    """Whether this CPU has native int8 dot products (AVX-512 VNNI, AVX-VNNI or AMX), per
    cpuinfo, and this torch has the int8 product (``torch._int_mm``)."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}) and hasattr(
        torch, "_int_mm"
    )


def resolve_precision(precision: str, device: torch.device, *, upper_only: bool = True) -> str:
    """``"auto"`` -> ``"int8"`` on CPUs with native int8 dot products (:func:`cpu_has_int8`),
    else ``"bfloat16"`` on CPUs with native bfloat16 (:func:`cpu_has_bf16`), else ``"float32"``
    (GPUs included: their float32 search is fast); other values pass through.
    ``upper_only=False``: for a caller that needs two-sided bounds
    (:meth:`NearestNeighborIndex.min_sq_bounded`), which the int8 scan does not give."""
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "float32"
    if upper_only and cpu_has_int8():
        return "int8"
    return "bfloat16" if cpu_has_bf16() else "float32"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class NearestNeighborIndex:
    """Exact Euclidean k-nearest-neighbour index over a fixed bank.

    Args:
        bank: (M, D) float tensor. It is kept as given in ``bank``; half-precision banks
            (float16, bfloat16) are searched in float32 from a cached float32 copy.
        max_block_bytes: memory budget of one (queries x M) distance block. Default (None):
            :data:`CPU_MAX_BLOCK_BYTES` for a CPU bank (but at least
            :data:`MIN_CPU_BLOCK_ROWS` queries), :data:`DEFAULT_MAX_BLOCK_BYTES` otherwise.

    Attributes:
        bank: (M, D) the bank as given.
        dtype: the dtype distances are computed (and returned) in.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        *,
        max_block_bytes: int | None = None,
        precision: str = "float32",
    ):
        if bank.ndim != 2:
            raise ValueError(f"bank must be 2-D (M, D), got shape {tuple(bank.shape)}")
        if bank.shape[0] < 1:
            raise ValueError("bank is empty: it needs at least one row")
        if not bank.is_floating_point():
            raise ValueError(f"bank must be a float tensor, got {bank.dtype}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if max_block_bytes is not None and max_block_bytes < 1:
            raise ValueError(f"max_block_bytes must be >= 1, got {max_block_bytes!r}")
        self.bank = bank.detach()
        self.dtype = _compute_dtype(bank.dtype)
        work = self.bank.to(self.dtype)
        # Centring changes no distance but shrinks the norms, hence the cancellation error of
        # the expansion |q|^2 - 2 q.b + |b|^2 for near neighbours.
        self._mean = work.mean(0)
        centred = work - self._mean
        # [-2 b, |b|^2]: one matrix product with [q, 1] gives |b|^2 - 2 q.b (-2 b is exact)
        self._bank_ext = torch.cat([-2.0 * centred, (centred * centred).sum(1, keepdim=True)], 1)
        self.precision = precision
        self._int8: Int8Table | None = None
        if precision == "int8":
            if self.bank.device.type != "cpu":
                raise ValueError("the int8 search runs on CPU only; use float32 on GPUs")
            self._int8 = Int8Table(centred)
        self._bank_bf16: torch.Tensor | None = None
        if precision == "bfloat16":
            # [-2 b, |b|^2] in bfloat16; the bound below covers the rounding of both parts.
            self._bank_bf16 = self._bank_ext.to(torch.bfloat16)
            self._max_norm = float(centred.norm(dim=1).max())
        self._auto_block = max_block_bytes is None
        if max_block_bytes is None:
            cpu = self.bank.device.type == "cpu"
            max_block_bytes = CPU_MAX_BLOCK_BYTES if cpu else DEFAULT_MAX_BLOCK_BYTES
        self.max_block_bytes = int(max_block_bytes)

    def __len__(self) -> int:
        return self._bank_ext.shape[0]

    def chunk_size(self) -> int:
        """Queries handled per distance block under ``max_block_bytes``."""
        per_query = len(self) * self._bank_ext.element_size()
        if self._int8 is not None:
            per_query = self._int8.table.shape[1] * 4  # int32 products
        rows = max(1, self.max_block_bytes // per_query)
        if self._auto_block and self._bank_ext.device.type == "cpu":
            rows = max(rows, MIN_CPU_BLOCK_ROWS)
        return rows

    def min_distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Distance from each query to its nearest bank row, without the index (faster).

        Args:
            queries: (Q, D).

        Returns:
            (Q,) Euclidean distances in ``self.dtype``. With ``precision="float32"`` equal to
            ``search(queries, 1)[0][:, 0]``; with ``"bfloat16"`` the bfloat16 scan's value
            (error bounded by :meth:`min_sq_bounded`); with ``"int8"`` the distance to the row
            the int8 scan found (:meth:`min_sq_upper`).
        """
        if self._int8 is not None:
            return self.min_sq_upper(queries)[0].sqrt_()
        if self._bank_bf16 is None:
            return self._scan(queries, 0)[0][:, 0]
        return self.min_sq_bounded(queries)[0].clamp_(min=0.0).sqrt_()

    def exact_min_distances(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q,) nearest distances computed in float32 whatever ``precision`` is."""
        return self._scan(queries, 0)[0][:, 0]

    def min_sq_bounded(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared nearest distances with a bound on their error.

        Returns:
            ``(d2, err)``, both (Q,) float32: ``|d2 - true squared distance| <= err``. In
            float32 precision ``d2`` is exact to float rounding and ``err`` is 0; in bfloat16
            ``err = 1.01 u (B^2 + 4 |q| B) + 1.02 u |m|`` with u = 2^-8, B the largest centred
            bank norm and m the scan's bfloat16 row minimum (:func:`bf16_error`). In int8
            precision ``d2 = err`` = :meth:`min_sq_upper`'s bound (two-sided bounds need
            ``resolve_precision(..., upper_only=False)``).
        """
        if self._int8 is not None:  # 0 <= true <= upper: a valid, loose bound
            upper = self.min_sq_upper(queries)[1]
            return upper, upper.clone()
        if self._bank_bf16 is None:
            d = self._scan(queries, 0)[0][:, 0]
            return d * d, torch.zeros_like(d)
        d = self._bank_ext.shape[1] - 1
        q = self._centred(queries)
        qsq = (q * q).sum(1)
        q_ext = torch.cat([q, torch.ones_like(q[:, :1])], 1).to(torch.bfloat16)
        m = len(self)
        step = max(1, self.max_block_bytes // (2 * m))
        if self._auto_block and self._bank_ext.device.type == "cpu":
            step = max(step, MIN_CPU_BLOCK_ROWS)
        block = torch.empty(min(step, q.shape[0]), m, dtype=torch.bfloat16, device=q.device)
        out = torch.empty(q.shape[0], dtype=self.dtype, device=q.device)
        bank_t = self._bank_bf16.T
        for lo in range(0, q.shape[0], step):
            part = torch.mm(q_ext[lo : lo + step], bank_t, out=block[: min(step, q.shape[0] - lo)])
            out[lo : lo + step] = part.amin(1)
        err = bf16_error(qsq, self._max_norm, d, out)  # out: the rounded row minima
        out += qsq
        return out, err

    def min_sq_upper(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared nearest distances and a rigorous upper bound of each.

        Args:
            queries: (Q, D).

        Returns:
            ``(estimate, upper)``, both (Q,) float32, ``true <= upper`` (the same tensor
            where they are equal: change neither in place before reading both): float32
            ``(d2, d2)``;
            bfloat16 ``(d2, d2 + err)`` (:meth:`min_sq_bounded`); int8 the squared float32
            distance to the row the int8 scan found, for both (the true distance where the
            scan found the nearest row, larger by the gap elsewhere).
        """
        if self._int8 is None:
            d2, err = self.min_sq_bounded(queries)
            return d2, (d2 + err if self._bank_bf16 is not None else d2)
        q = self._centred(queries)
        coded = self._int8.encode(q)
        out = torch.empty(q.shape[0], dtype=self.dtype, device=q.device)
        step = self.chunk_size()
        # one int32 block for every step: no fresh pages per block
        block = torch.empty(min(step, q.shape[0]), self._int8.table.shape[1], dtype=torch.int32)
        for lo in range(0, q.shape[0], step):
            rows = self._int8.nearest_rows(coded[lo : lo + step], block)
            diff = q[lo : lo + step] - self._int8.centred[rows]
            out[lo : lo + step] = diff.square_().sum(1)
        if self._int8.poison != 0.0:
            out.fill_(math.nan)
        return out, out

    def _centred(self, queries: torch.Tensor) -> torch.Tensor:
        d = self._bank_ext.shape[1] - 1
        if queries.ndim != 2 or queries.shape[1] != d:
            raise ValueError(
                f"queries must be (Q, {d}) to match the bank, got {tuple(queries.shape)}"
            )
        q = queries.detach().to(device=self._bank_ext.device, dtype=self.dtype)
        return q - self._mean

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query.

        Args:
            queries: (Q, D).
            k: neighbours per query, 1 <= k <= M.

        Returns:
            distances (Q, k) Euclidean, ascending, in ``self.dtype``; indices (Q, k) int64 into
            the bank. For k == 1 ties go to the lowest bank index.
        """
        if not (1 <= k <= len(self)):
            raise ValueError(f"k must be in [1, {len(self)}] (bank size), got {k!r}")
        dist, index = self._scan(queries, k)
        assert index is not None
        return dist, index

    def _scan(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blockwise scan; ``k == 0``: nearest distance only (a plain row minimum, cheaper
        than the minimum with its index)."""
        m, d = len(self), self._bank_ext.shape[1] - 1
        if queries.ndim != 2 or queries.shape[1] != d:
            raise ValueError(
                f"queries must be (Q, {d}) to match the bank, got {tuple(queries.shape)}"
            )
        device = self._bank_ext.device
        num = queries.shape[0]
        # [q - mean, 1]
        q_ext = torch.empty(num, d + 1, dtype=self.dtype, device=device)
        torch.sub(
            queries.detach().to(device=device, dtype=self.dtype), self._mean, out=q_ext[:, :d]
        )
        q_ext[:, d] = 1.0
        dist = torch.empty(num, max(k, 1), dtype=self.dtype, device=device)
        index = torch.empty(num, k, dtype=torch.long, device=device) if k else None
        step = self.chunk_size()
        step = -(-num // -(-num // step)) if num else 1  # equal blocks, no small last one
        block = torch.empty(min(step, num), m, dtype=self.dtype, device=device)
        bank_t = self._bank_ext.T
        for lo in range(0, num, step):
            q = q_ext[lo : lo + step]
            # |b|^2 - 2 q.b per block; |q|^2 is constant along a row, so it is added after the
            # reduction (one pass over the block fewer).
            part = torch.mm(q, bank_t, out=block[: q.shape[0]])
            idx = None
            if k == 0:
                vals = part.amin(1, keepdim=True)
            elif k == 1:
                vals, idx = part.min(1, keepdim=True)
            else:
                vals, idx = torch.topk(part, k, dim=1, largest=False, sorted=True)
            qc = q[:, :d]
            vals += (qc * qc).sum(1, keepdim=True)
            dist[lo : lo + step] = vals.clamp_(min=0.0).sqrt_()
            if index is not None:
                index[lo : lo + step] = idx
        return dist, index


class Int8Table:
    """The int8 scan of a centred bank (M, D): its quantisation, fixed when the index is built
    (the exported int8 graph, :mod:`patchcore.core.export_search`, uses the same table).

    Rows and queries share one scale ``s``, the bank's largest ``|element| / 127`` (query
    elements beyond it are clamped: the scan only proposes a row, whose distance is then
    measured in float32). For a query ``q`` the scan minimises over the rows
    ``c_b - round(q/s) . round(b/s)`` with ``c_b = |b|^2 / (2 s^2)`` less a constant (half the
    squared distance in units of ``s^2``, less the query's own term). ``c_b`` is rounded to an
    integer and carried in the same product: ``hi`` query columns of 127 against its high
    digits, one of 1 against its low digit. The exact int32 products then give every
    candidate's value in one matrix product; the nearest row is a minimum over chunks of
    :data:`INT8_CHUNK` columns, then within the best chunk (an index-returning minimum over
    the whole row is far slower on CPU than a plain one). The table's rows are padded to a
    multiple of the chunk with copies of its first rows, which never come first.

    Attributes:
        centred: (M, D) float32 the centred bank. table: (W, M') int8, the bank's columns.
    """

    def __init__(self, centred: torch.Tensor):
        m, d = centred.shape
        self.centred = centred
        self.rows = m
        # a non-finite bank makes every result NaN (as the float32 scan's minima would be),
        # never a finite distance to one of its other rows
        self.poison = float(centred.sum()) * 0.0
        finite = torch.nan_to_num(centred.double(), nan=0.0, posinf=0.0, neginf=0.0)
        amax = float(finite.abs().max())
        self.scale = amax / 127.0 if amax > 0 else 1.0
        bias = (finite**2).sum(1) / (2.0 * self.scale**2)
        bias = torch.round(bias - (float(bias.max()) + float(bias.min())) / 2)  # min unmoved
        high = torch.round(bias / 127.0)
        low = bias - 127.0 * high  # within [-64, 64]
        self.hi = max(1, math.ceil(float(high.abs().max()) / 127.0))
        width = -(-(d + self.hi + 1) // 8) * 8  # whole groups for the int8 dot products
        coded = torch.zeros(m, width, dtype=torch.float64)
        coded[:, :d] = -torch.round(finite / self.scale).clamp_(-127, 127)
        for t in range(self.hi):  # high digits, each within [-127, 127]
            digit = high.clamp(-127, 127)
            coded[:, d + t] = digit
            high = high - digit
        coded[:, d + self.hi] = low
        padded = -(-m // INT8_CHUNK) * INT8_CHUNK
        order = torch.arange(padded) % m
        self.table = coded.to(torch.int8)[order].T  # (W, M') view of row-major rows
        self.width, self.dim = width, d
        #: (W - D,) int8 the queries' constant columns: 127 x hi, 1, zeros
        self.constants = torch.zeros(width - d, dtype=torch.int8)
        self.constants[: self.hi] = 127
        self.constants[self.hi] = 1

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """(Q, D) float32 centred queries -> (Q, W) int8 ``[round(q/s), constants]``
        (non-finite elements as 0: their distances come out non-finite all the same)."""
        out = torch.empty(q.shape[0], self.width, dtype=torch.int8)
        scaled = torch.nan_to_num(q / self.scale, nan=0.0, posinf=127.0, neginf=-127.0)
        out[:, : self.dim] = torch.round(scaled).clamp_(-127, 127)
        out[:, self.dim :] = self.constants
        return out

    def nearest_rows(self, coded: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
        """(n, W) encoded queries -> (n,) int64 the row each scan found (lowest on ties);
        ``block``: (>= n, M') int32 room for the products."""
        n = coded.shape[0]
        values = torch._int_mm(coded, self.table, out=None if block is None else block[:n])
        return first_minimum(values)[1] % self.rows


def first_minimum(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N) values, N a multiple of :data:`INT8_CHUNK` -> ((n,) each row's minimum, (n,)
    int64 its first column): the minima of chunks of columns, the best chunk, then the best
    column within it (an index-returning minimum over the whole row is far slower on CPU)."""
    n = values.shape[0]
    chunks = values.view(n, -1, INT8_CHUNK)
    least = chunks.amin(2)
    best = least.argmin(1)
    rows = torch.arange(n, device=values.device)
    within = chunks[rows, best].argmin(1)
    return least[rows, best], best * INT8_CHUNK + within


def nearest_neighbors(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    max_block_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest bank rows of each query; see :meth:`NearestNeighborIndex.search`.

    Args:
        queries: (Q, D).
        bank: (M, D).
        k: neighbours per query.

    Returns:
        distances (Q, k) ascending and indices (Q, k) int64.
    """
    return NearestNeighborIndex(bank, max_block_bytes=max_block_bytes).search(queries, k)


def bf16_error(
    qsq: torch.Tensor,
    big: float,
    d: int,
    minimum: torch.Tensor | None = None,
    *,
    truncated: bool = False,
) -> torch.Tensor:
    """(Q,) bound on the error of a bfloat16 scan's squared distances, ``qsq`` (Q,) the centred
    queries' squared norms, ``big`` (B) the largest centred bank norm, ``d`` the features.

    Without ``minimum``: ``1.01 u (2 B^2 + 6 |q| B)`` with u = 2^-8 (rounding of q, b and
    |b|^2 to bfloat16, ``u (B^2 + 4 |q| B)``, and of each product's output,
    ``u (B^2 + 2 |q| B)``), plus the float32 accumulation over ``d + 2`` terms.

    With ``minimum`` (Q,) the scan's row minima ``m`` (the bfloat16 outputs, rounded to
    nearest): rounding is monotone, so the minimum of the rounded outputs is the rounded
    minimum and its own rounding is at most ``u |m| / (1 - u)``, known after the scan; the
    bound is then ``1.01 u (B^2 + 4 |q| B) + 1.02 u |m|`` plus the accumulation term (about
    half the first form on real banks, where ``|m|`` is far below ``B^2 + 2 |q| B``).
    ``truncated``: the outputs may have been truncated to bfloat16 instead (OpenVINO's
    conversions truncate; truncation is monotone too, its error below ``2 u |m|``): twice that
    term.
    """
    acc = (d + 2) * 2.0**-22 * (big * big + qsq)
    if minimum is None:
        return (2 * big * big + 6 * big * qsq.sqrt()) * (1.01 * _BF16_UNIT) + acc
    rest = (big * big + 4 * big * qsq.sqrt()) * (1.01 * _BF16_UNIT)
    return rest + minimum.abs() * ((2.04 if truncated else 1.02) * _BF16_UNIT) + acc


def patch_scores(
    index: NearestNeighborIndex, patches: torch.Tensor, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch nearest distances and each image's exact maximum (and exact top ``k``).

    Args:
        index: the memory bank's index.
        patches: (B, P, D) patch features of B images.
        k: how many of each image's largest distances must be exact.

    Returns:
        ``(scores, image_max, arg)``: (B, P) per-patch distances (the index's precision),
        (B,) the largest nearest distance of each image and (B,) int64 the patch holding it.
        In bfloat16 and int8 precision each image's ``2 k`` best estimates are re-checked in
        float32; the ``k``-th largest of those exact distances bounds the image's true
        ``k``-th largest from below, and every other patch whose upper bound
        (:meth:`NearestNeighborIndex.min_sq_upper`) reaches it is re-checked too.
        The patches left lie below the bound (true distance and estimate), so ``image_max``,
        ``arg`` and ``scores.topk(k)`` are those of the float32 search (to float rounding).
    """
    return patch_scores_groups(index, [patches], k)[0]


def patch_scores_groups(
    index: NearestNeighborIndex, groups: list[torch.Tensor], k: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`patch_scores` of several (B_i, P_i, D) groups (images of different sizes) with
    one scan and two float32 re-check calls for them all (fewer, fuller matrix products than
    one call per group); the result of each group as :func:`patch_scores` gives it."""
    parts = [g.reshape(-1, g.shape[-1]) for g in groups]
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)  # one group: its own layout
    spans, lo = [], 0  # (images, patches per image, first flat row) of each group
    for g in groups:
        spans.append((int(g.shape[0]), int(g.shape[1]), lo))
        lo += int(g.shape[0]) * int(g.shape[1])
    d2, upper = index.min_sq_upper(flat)
    if index.precision == "float32":
        out = []
        for b, p, lo in spans:
            scores = d2[lo : lo + b * p].sqrt().view(b, p)
            out.append((scores, *scores.max(dim=1)))
        return out
    d2 = d2.clamp_(min=0.0)
    # 1. each image's 2k best estimates, exactly: their k-th largest exact distance is a lower
    #    bound of the image's true k-th largest
    firsts = []  # per group: (B, m) positions within its images, (B m,) flat rows, its k
    for b, p, lo in spans:
        kk = max(1, min(int(k), p))
        first = d2[lo : lo + b * p].view(b, p).topk(min(2 * kk, p), dim=1).indices
        rows = torch.arange(b, device=d2.device)[:, None]
        firsts.append((first, (lo + rows * p + first).view(-1), kk))
    first_flat = torch.cat([f[1] for f in firsts])
    exact1 = index.exact_min_distances(flat[first_flat]).to(d2.dtype)
    # 2. every other patch whose error interval reaches that bound, exactly; the rest lie below
    #    it (true distance and estimate alike), so they cannot be among the k largest
    seconds, at = [], 0
    for (b, p, lo), (first, _, kk) in zip(spans, firsts, strict=True):
        floor = exact1[at : at + first.numel()].view(b, -1).topk(kk, dim=1)
        at += first.numel()
        part = slice(lo, lo + b * p)
        # the slack covers sqrt/square rounding
        reach = upper[part].view(b, p) >= floor.values[:, -1:].square() * (1 - 1e-6)
        reach.scatter_(1, first, False)  # done in step 1
        seconds.append(lo + reach.view(-1).nonzero().squeeze(1))
    second = torch.cat(seconds)
    scores = d2.sqrt_()
    scores[first_flat] = exact1
    if second.numel():
        scores[second] = index.exact_min_distances(flat[second]).to(scores.dtype)
    masked = torch.full_like(scores, -1.0)
    masked[first_flat] = scores[first_flat]
    masked[second] = scores[second]
    out = []
    for b, p, lo in spans:
        image_max, arg = masked[lo : lo + b * p].view(b, p).max(dim=1)
        out.append((scores[lo : lo + b * p].view(b, p), image_max, arg))
    return out
