"""The coreset's stages run apart (the fit across Ray workers runs them shard by shard) and
the barrier-free parallel blocks: both must give the single call's selection bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch

from patchcore.core.sampling import (
    chunked_greedy_coreset,
    coverage_radius,
    parallel_blocks,
    stages,
)


def rows(num: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Clustered float16 rows: neighbouring rows alike, as patches of one image are."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num // 100 + 1, dim, generator=g) * 4
    x = centres.repeat_interleave(100, 0)[:num] + torch.randn(num, dim, generator=g)
    return x.half()


def test_stages_compose_to_the_chunked_coreset():
    x, n, chunk, seed = rows(6000), 120, 512, 4
    sel = chunked_greedy_coreset(x, n, chunk_rows=chunk, seed=seed)
    assert len(sel.stage_seconds) == 3 and all(s >= 0 for s in sel.stage_seconds)
    gen = torch.Generator().manual_seed(seed)
    keep = stages.keep_fraction(x.shape[0], n)
    union = stages.chunk_stage(
        x, keep, chunk_rows=chunk, starts=stages.chunk_starts(6000, chunk, gen)
    )
    assert 0 < union.numel() < x.shape[0]
    n_repair = stages.repair_size(n, x.shape[0])
    start = int(torch.randint(union.numel(), (1,), generator=gen).item())
    picked = union[stages.union_greedy(x[union], n - n_repair, start)]
    again = stages.repair_stage(x, picked, n_repair)
    assert torch.equal(again.indices, sel.indices) and again.radius == sel.radius
    # the repair's certified radius is the true one
    assert sel.radius == pytest.approx(coverage_radius(x, sel.indices), rel=1e-4)


def test_chunk_starts_are_drawn_in_chunk_order():
    a = stages.chunk_starts(5000, 2048, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    b = [int(torch.randint(m, (1,), generator=g)) for m in (2048, 2048, 904)]
    assert a == b and all(0 <= s < m for s, m in zip(a, (2048, 2048, 904), strict=True))
    with pytest.raises(ValueError, match="exactly one of starts and u2_init"):
        stages.chunk_stage(rows(100), 0.5)


def test_repair_pieces_match_the_repair_stage():
    """What the distributed fit does with the pieces: candidates, exact distances, the last
    picks, the doubtful rows and their recheck give repair_stage's selection and radius."""
    x, n_repair = rows(4000, seed=2), 12
    picked = torch.arange(0, 4000, 67)[:60]
    whole = stages.repair_stage(x, picked, n_repair)
    bank = x[picked].float()
    upper = stages.repair_bounds(x, bank)
    cand = stages.repair_candidates(upper, n_repair)[1]
    assert cand.numel() == stages.REPAIR_POOL * n_repair
    z = x[cand].float()
    u2 = stages.exact_sq_distances(z, bank).float()
    extra = stages.continue_greedy(z, u2, n_repair)
    assert torch.equal(torch.cat([picked, cand[torch.tensor(extra)]]), whole.indices)
    radius2 = float(u2.max())
    upper[cand] = -1.0
    doubt = stages.doubtful_rows(upper, radius2)
    if doubt.numel():
        radius2 = max(radius2, float(stages.exact_sq_distances(x[doubt], x[whole.indices]).max()))
    assert radius2**0.5 == whole.radius


def test_parallel_blocks_keep_order_results_and_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0))
        b = torch.randn(64, 500, generator=torch.Generator().manual_seed(1))
        whole = a @ b  # one multithreaded product
        names: set[str] = set()

        def block(lo: int) -> torch.Tensor:
            names.add(threading.current_thread().name)
            assert torch.get_num_threads() == 1
            return a[lo : lo + 128] @ b

        parts = list(parallel_blocks(block, range(0, 3000, 128)))
        assert torch.equal(torch.cat(parts), whole)  # bit for bit, in order
        assert any(name.startswith("patchcore-blocks") for name in names)
        assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            list(parallel_blocks(lambda i: 1 // (i - 3), range(6)))
        assert torch.get_num_threads() == 2
        assert list(parallel_blocks(lambda i: i * i, range(5), workers=1)) == [0, 1, 4, 9, 16]
    finally:
        torch.set_num_threads(before)
