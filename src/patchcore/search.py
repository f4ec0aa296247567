"""Exact nearest-neighbour search in the memory bank by chunked matrix products.

Squared distances are expanded as ``|q|^2 - 2 q.b + |b|^2`` after centring on the bank's mean
(which keeps the cancellation error small), with the bank's squared norms cached once, so a block
of queries costs one matrix product (``addmm``, faster on CPU than ``torch.cdist``, which also
materialises the same ``Q x M`` block). Queries are processed in chunks so that the distance block
stays under a memory budget.
"""

from __future__ import annotations

import torch

__all__ = ["NearestNeighborIndex", "nearest_neighbors"]

DEFAULT_MAX_BLOCK_BYTES = 256 * 2**20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class NearestNeighborIndex:
    """Exact Euclidean k-nearest-neighbour index over a fixed bank.

    Args:
        bank: (M, D) float tensor. It is kept as given in ``bank``; half-precision banks
            (float16, bfloat16) are searched in float32 from a cached float32 copy.
        max_block_bytes: memory budget of one (queries x M) distance block.

    Attributes:
        bank: (M, D) the bank as given.
        dtype: the dtype distances are computed (and returned) in.
    """

    def __init__(self, bank: torch.Tensor, *, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES):
        if bank.ndim != 2:
            raise ValueError(f"bank must be 2-D (M, D), got shape {tuple(bank.shape)}")
        if bank.shape[0] < 1:
            raise ValueError("bank is empty: it needs at least one row")
        if not bank.is_floating_point():
            raise ValueError(f"bank must be a float tensor, got {bank.dtype}")
        if max_block_bytes < 1:
            raise ValueError(f"max_block_bytes must be >= 1, got {max_block_bytes!r}")
        self.bank = bank.detach()
        self.dtype = _compute_dtype(bank.dtype)
        work = self.bank.to(self.dtype)
        # Centring changes no distance but shrinks the norms, hence the cancellation error of
        # the expansion |q|^2 - 2 q.b + |b|^2 for near neighbours.
        self._mean = work.mean(0)
        self._bank = (work - self._mean).contiguous()
        self._bank_sq = (self._bank * self._bank).sum(1)
        self.max_block_bytes = int(max_block_bytes)

    def __len__(self) -> int:
        return self._bank.shape[0]

    def chunk_size(self) -> int:
        """Queries handled per distance block under ``max_block_bytes``."""
        per_query = len(self) * self._bank.element_size()
        return max(1, self.max_block_bytes // per_query)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query.

        Args:
            queries: (Q, D).
            k: neighbours per query, 1 <= k <= M.

        Returns:
            distances (Q, k) Euclidean, ascending, in ``self.dtype``; indices (Q, k) int64 into
            the bank. For k == 1 ties go to the lowest bank index.
        """
        m, d = self._bank.shape
        if queries.ndim != 2 or queries.shape[1] != d:
            raise ValueError(
                f"queries must be (Q, {d}) to match the bank, got {tuple(queries.shape)}"
            )
        if not (1 <= k <= m):
            raise ValueError(f"k must be in [1, {m}] (bank size), got {k!r}")
        q_all = queries.detach().to(device=self._bank.device, dtype=self.dtype) - self._mean
        num = q_all.shape[0]
        dist = torch.empty(num, k, dtype=self.dtype, device=q_all.device)
        index = torch.empty(num, k, dtype=torch.long, device=q_all.device)
        step = self.chunk_size()
        bank_t = self._bank.T
        for lo in range(0, num, step):
            q = q_all[lo : lo + step]
            # |b|^2 - 2 q.b per block; |q|^2 is constant along a row, so it is added after the
            # reduction (one pass over the block fewer).
            part = torch.addmm(self._bank_sq.unsqueeze(0), q, bank_t, alpha=-2.0)
            if k == 1:
                vals, idx = part.min(1, keepdim=True)
            else:
                vals, idx = torch.topk(part, k, dim=1, largest=False, sorted=True)
            vals += (q * q).sum(1, keepdim=True)
            dist[lo : lo + step] = vals.clamp_(min=0.0).sqrt_()
            index[lo : lo + step] = idx
        return dist, index


def nearest_neighbors(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
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
