"""The three stages of the linear-time coreset, as functions that can run apart.

:func:`~patchcore.core.sampling.chunked_greedy_coreset` is these stages in one process; a fit
across workers (:mod:`patchcore.scale`) runs the same functions with each worker holding a
shard of the rows, so the two agree (one worker gives the single-process bank):

1. **Chunk stage** (:func:`chunk_stage`): the greedy k-center of each chunk of
   :data:`CHUNK_ROWS` consecutive rows keeps ``ceil(keep * rows)`` of them
   (:func:`keep_fraction`); every chunk's random start comes from one seeded generator in chunk
   order (:func:`chunk_starts`). Per chunk, on one thread; needs only the chunk's rows.
2. **Union greedy** (:func:`union_greedy`): the greedy on the union of the chunk picks, with
   batched distance updates, for all but the last :func:`repair_size` picks.
3. **Repair stage** (:func:`repair_stage`): every row's distance to those picks
   (:func:`repair_bounds`, a bounded-error scan), the greedy's last picks among the farthest
   rows (:func:`repair_candidates`, :func:`exact_sq_distances`, :func:`continue_greedy`), and
   the certified coverage radius (:func:`doubtful_rows`, re-checked exactly up to
   :data:`RECHECK_ROWS` rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

import patchcore.core.sampling.kcenter as kcenter
from patchcore.core.sampling.kcenter import OneThread, greedy_naive, parallel_blocks
from patchcore.core.search import NearestNeighborIndex, resolve_precision

__all__ = [
    "CHUNK_ROWS",
    "OVERSAMPLE",
    "RECHECK_ROWS",
    "REPAIR_FRACTION",
    "REPAIR_POOL",
    "CoresetSelection",
    "bank_distances",
    "check_stages",
    "chunk_stage",
    "chunk_starts",
    "continue_greedy",
    "doubtful_rows",
    "exact_sq_distances",
    "keep_fraction",
    "repair_bounds",
    "repair_candidates",
    "repair_size",
    "repair_stage",
    "union_greedy",
]

#: Rows per stage-1 chunk (2048 float32 rows of 152-168 features stay in a 2 MiB L2 cache).
CHUNK_ROWS = 2048
#: Stage-1 union size over the bank size.
OVERSAMPLE = 10.0
#: Share of the bank picked by the repair stage.
REPAIR_FRACTION = 0.1
#: The repair's candidates: this many times its picks, the farthest rows by their bound.
REPAIR_POOL = 20
#: Rows re-checked exactly for the reported radius, at most (beyond: their bound is reported).
RECHECK_ROWS = 1 << 18
#: Rows per block of a distance scan.
SCAN_ROWS = 16384

#: The progress bars' words, stage by stage.
PASS_WORDS = "selecting the memory bank, pass {k} of 3"
RADIUS_WORDS = "measuring the memory bank's coverage"


class CoresetSelection(NamedTuple):
    """Output of :func:`~patchcore.core.sampling.chunked_greedy_coreset`.

    indices: (n,) int64 into the features. radius: the coverage radius the selection reached
    (largest distance from any feature to its nearest selected one), certified by the repair
    pass (float32 to rounding; an upper bound in the rare case of too many doubtful rows).
    stage_seconds: the time of each stage (chunks, union, repair), when they ran.
    """

    indices: torch.Tensor
    radius: float
    stage_seconds: tuple[float, ...] = ()


def check_stages(chunk_rows: int, oversample: float, repair_fraction: float) -> None:
    """ValueError unless the stage arguments are usable."""
    if chunk_rows < 2:
        raise ValueError(f"chunk_rows must be >= 2, got {chunk_rows!r}")
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample!r}")
    if not (0 <= repair_fraction <= 0.5):
        raise ValueError(f"repair_fraction must be in [0, 0.5], got {repair_fraction!r}")


def keep_fraction(num: int, n: int, oversample: float = OVERSAMPLE) -> float:
    """Share of each chunk's rows stage 1 keeps for a bank of ``n`` of ``num`` rows (1.0: the
    union is every row and the exact greedy runs instead)."""
    return min(1.0, oversample * n / num)


def repair_size(n: int, num: int, repair_fraction: float = REPAIR_FRACTION) -> int:
    """Picks left to the repair stage, for a bank of ``n`` of ``num`` rows."""
    return min(int(round(repair_fraction * n)), num - n)


def chunk_starts(num: int, chunk_rows: int, generator: torch.Generator) -> list[int]:
    """Each chunk's random start (a row within the chunk), drawn in chunk order."""
    return [
        int(torch.randint(min(chunk_rows, num - lo), (1,), generator=generator).item())
        for lo in range(0, num, chunk_rows)
    ]


def chunk_stage(
    x: torch.Tensor,
    keep: float,
    *,
    chunk_rows: int = CHUNK_ROWS,
    starts: Sequence[int] | None = None,
    u2_init: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Stage 1: the greedy selection of ``ceil(keep * rows)`` rows of each chunk.

    Args:
        x: (N, D) rows (float16 read in place, converted a chunk at a time).
        keep: share kept, in (0, 1] (:func:`keep_fraction`).
        chunk_rows: rows per chunk.
        starts: each chunk's first pick (:func:`chunk_starts`); or
        u2_init: (N,) squared distances to centres selected before: each chunk's greedy
            continues from them (its first pick is the chunk's farthest row).
        progress: show a progress bar.

    Returns:
        (K,) int64 row indices, chunk by chunk, each chunk's in selection order. Each chunk
        runs on one torch thread (a chain of small steps), chunks side by side
        (:func:`~patchcore.core.sampling.kcenter.parallel_blocks`).
    """
    num = x.shape[0]
    if (starts is None) == (u2_init is None):
        raise ValueError("give exactly one of starts and u2_init")
    desc = PASS_WORDS.format(k=1)
    bar = tqdm(total=num, desc=desc, unit="patch", disable=not progress, mininterval=0.5)

    def select(j: int) -> torch.Tensor:
        lo = j * chunk_rows
        part = x[lo : lo + chunk_rows]
        m = max(1, math.ceil(part.shape[0] * keep))
        if u2_init is None:
            assert starts is not None
            return lo + greedy_naive(part, m, int(starts[j]))
        init = u2_init[lo : lo + chunk_rows]
        return lo + greedy_naive(part, m, int(init.argmax()), u2_init=init)

    out = []
    for picks in parallel_blocks(select, range(-(-num // chunk_rows))):  # chunks side by side
        out.append(picks)
        bar.update(min(chunk_rows, num - bar.n))
    bar.close()
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def union_greedy(
    x: torch.Tensor,
    n: int,
    start: int,
    *,
    candidates: int = 512,
    progress: bool = False,
    u2_init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 2: greedy k-center with its distance updates batched into matrix products.

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
    desc = PASS_WORDS.format(k=2)
    bar = tqdm(total=n, desc=desc, unit="row", disable=not progress, mininterval=0.5)
    while True:
        rows = torch.tensor(batch)
        _lower(u2, z, sq, rows)
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
        with OneThread():  # a chain of small steps
            _greedy_among(cu2, c, cz, csq, floor, n, picked, batch)
        if not batch:
            break
    bar.close()
    return torch.tensor(picked[:n])


def _lower(u2: torch.Tensor, z: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor) -> None:
    """``u2`` (N,) lowered to every row's squared distance to the rows ``rows`` of ``z`` (N, d)
    (``sq``: their squared norms): one (N, picks) product in bounded blocks, in parallel."""
    centres, csq_row = z[rows].T.contiguous(), sq[rows].unsqueeze(0)
    step = max(1, kcenter.CHUNK_BYTES * 4 // (4 * rows.numel()))  # bounded (rows, picks) blocks

    def update(lo: int) -> None:
        d2 = torch.addmm(csq_row, z[lo : lo + step], centres, alpha=-2.0)
        d2 += sq[lo : lo + step].unsqueeze(1)
        part = u2[lo : lo + step]
        torch.minimum(part, d2.amin(1).clamp_(min=0.0), out=part)

    for _ in parallel_blocks(update, range(0, z.shape[0], step)):
        pass


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
    """Greedy steps among the candidates of :func:`union_greedy` while they are certified."""
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


def repair_bounds(
    x: torch.Tensor, bank: torch.Tensor, *, progress: bool = False, desc: str | None = None
) -> torch.Tensor:
    """(N,) upper bounds on each row's squared distance to its nearest ``bank`` row.

    One blockwise scan in the search's ``"auto"`` precision (:mod:`patchcore.core.search`,
    :meth:`~patchcore.core.search.NearestNeighborIndex.min_sq_upper`): int8 where the CPU has
    int8 dot products (the float32 distance to the row the scan found), else bfloat16 where it
    has those natively (the estimate plus its error bound; emulated bfloat16 would be slower
    than float32), else exact float32 distances.
    """
    num = x.shape[0]
    b = bank.detach().float()
    index = NearestNeighborIndex(b, precision=resolve_precision("auto", b.device))
    upper = torch.empty(num)
    desc = PASS_WORDS.format(k=3) if desc is None else desc
    bar = tqdm(total=num, desc=desc, unit="patch", disable=not progress, mininterval=1)

    def bound(lo: int) -> int:
        part = index.min_sq_upper(x[lo : lo + SCAN_ROWS])[1]
        upper[lo : lo + SCAN_ROWS] = part
        return part.numel()

    for done in parallel_blocks(bound, range(0, num, SCAN_ROWS)):
        bar.update(done)
    bar.close()
    return upper


def repair_candidates(upper: torch.Tensor, n_repair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The repair's candidate rows: the ``REPAIR_POOL * n_repair`` largest bounds.

    Returns:
        (values, rows), largest first.
    """
    size = min(upper.numel(), max(1, REPAIR_POOL * n_repair))
    return torch.topk(upper, size)


def exact_sq_distances(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(R,) float64 squared distances of ``rows`` to their nearest ``bank`` row (the distances
    computed in float32, then squared in float64)."""
    index = NearestNeighborIndex(bank.detach().float())
    starts = range(0, rows.shape[0], SCAN_ROWS)
    parts = parallel_blocks(lambda lo: index.exact_min_distances(rows[lo : lo + SCAN_ROWS]), starts)
    return torch.cat([torch.empty(0), *parts]).double().square()


def continue_greedy(z: torch.Tensor, u2: torch.Tensor, n: int) -> list[int]:
    """``n`` more greedy picks among the rows ``z`` (R, D) float32, given their squared
    distances ``u2`` (R,) to the selection so far (updated in place; picked rows end at 0).

    Returns:
        positions into ``z`` in selection order.
    """
    z = z - z.mean(0)
    sq = (z * z).sum(1)
    extra: list[int] = []
    d2 = torch.empty_like(sq)
    with OneThread():
        for _ in range(n):
            pos = int(u2.argmax())
            extra.append(pos)
            torch.addmv(sq, z, z[pos], alpha=-2.0, out=d2)
            torch.minimum(u2, d2.add_(float(sq[pos])).clamp_(min=0.0), out=u2)
            u2[pos] = 0.0
    return extra


def doubtful_rows(upper: torch.Tensor, radius2: float) -> torch.Tensor:
    """Rows whose bound exceeds ``radius2`` (the candidates set to -1 beforehand): only an
    exact distance tells whether they lie beyond the reported radius."""
    return (upper > radius2).nonzero().squeeze(1)


def repair_stage(
    x: torch.Tensor,
    picked: torch.Tensor,
    n_repair: int,
    *,
    progress: bool = False,
    u2_init: torch.Tensor | None = None,
    desc: str | None = None,
) -> CoresetSelection:
    """Stage 3: continue the greedy among the farthest rows, and certify the radius.

    Every row's squared distance to ``picked`` is bounded by :func:`repair_bounds`; the
    :func:`repair_candidates` get exact distances and the last ``n_repair`` greedy picks
    (:func:`continue_greedy`). The reported radius is then certified: the rows left out whose
    bound still exceeds it are re-checked exactly against the final selection (at most
    :data:`RECHECK_ROWS` of them; beyond that their bound is reported).

    Args:
        x: (N, D) all rows. picked: (k,) the picks so far. n_repair: picks to add.
        progress: show a progress bar (``desc``: its words).
        u2_init: (N,) exact squared distances of the rows to centres selected before
            ``picked`` (they count as selected, for the picks and the radius).

    Returns:
        :class:`CoresetSelection`: ``picked`` then the repair's picks, and the radius.
    """
    num = x.shape[0]
    if picked.numel() == num:
        return CoresetSelection(picked, 0.0)
    bank = x[picked].float()
    upper = repair_bounds(x, bank, progress=progress, desc=desc)
    if u2_init is not None:  # exact already: the smaller bound of the two
        torch.minimum(upper, u2_init.float(), out=upper)
    rows = repair_candidates(upper, n_repair)[1]
    z = x[rows].float()
    u2 = exact_sq_distances(z, bank).float()
    if u2_init is not None:
        u2 = torch.minimum(u2, u2_init[rows].float())
    extra = continue_greedy(z, u2, n_repair)
    indices = torch.cat([picked, rows[torch.tensor(extra, dtype=torch.long)]])
    radius2 = float(u2.max())
    upper[rows] = -1.0  # done exactly above
    doubt = doubtful_rows(upper, radius2)
    if doubt.numel() > RECHECK_ROWS:
        return CoresetSelection(indices, math.sqrt(max(radius2, float(upper.max()))))
    if doubt.numel():
        d2 = exact_sq_distances(x[doubt], x[indices])
        if u2_init is not None:
            d2 = torch.minimum(d2, u2_init[doubt].double())
        radius2 = max(radius2, float(d2.max()))
    return CoresetSelection(indices, math.sqrt(radius2))


def bank_distances(x: torch.Tensor, bank: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Squared distances of the rows of ``x`` to their nearest ``bank`` row: ``(d2, upper)``.

    One scan in bfloat16 where the CPU has it natively (float32 otherwise), with its error
    bound; every row that could be among the ``top`` farthest is re-computed in float32, so
    ``d2`` is exact (float32) there and within the bound elsewhere, and ``upper`` is exact
    there and an upper bound elsewhere (for a certified radius).
    """
    num = x.shape[0]
    b = bank.detach().float()
    index = NearestNeighborIndex(b, precision=resolve_precision("auto", b.device, upper_only=False))
    d2, err = torch.empty(num), torch.empty(num)

    def scan(lo: int) -> None:
        part, e = index.min_sq_bounded(x[lo : lo + SCAN_ROWS])
        d2[lo : lo + SCAN_ROWS], err[lo : lo + SCAN_ROWS] = part.clamp_(min=0.0), e

    for _ in parallel_blocks(scan, range(0, num, SCAN_ROWS)):
        pass
    if index.precision == "float32":
        return d2, d2.clone()
    upper = d2 + err
    floor = torch.topk(d2 - err, max(1, min(num, top))).values[-1]
    check = (upper >= floor).nonzero().squeeze(1)
    exact = exact_sq_distances(x[check], b).float()
    d2[check], upper[check] = exact, exact
    return d2, upper
