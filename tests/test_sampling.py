"""Coreset sampling: equality with a naive greedy k-center, determinism, properties, errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore.core.sampling import (
    chunked_greedy_coreset,
    coreset_size,
    coverage_radius,
    greedy_coreset,
    kcenter,
    random_projection,
    random_subsample,
)


def naive_greedy(z: torch.Tensor, n: int, start: int) -> list[int]:
    """Textbook greedy k-center in float64 by direct differences, lowest index on ties."""
    z = z.double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps: a second thread only adds synchronisation
    try:
        selected = [start]
        dist = (z - z[start]).norm(dim=1)
        for _ in range(n - 1):
            nxt = int(dist.argmax())
            selected.append(nxt)
            dist = torch.minimum(dist, (z - z[nxt]).norm(dim=1))
    finally:
        torch.set_num_threads(threads)
    return selected


def reference(features: torch.Tensor, n: int, projection_dim: int | None, seed: int) -> list[int]:
    """What greedy_coreset promises: seeded projection, then a seeded start, then naive greedy."""
    gen = torch.Generator().manual_seed(seed)
    z = features if projection_dim is None else random_projection(features, projection_dim, gen)
    start = int(torch.randint(features.shape[0], (1,), generator=gen))
    return naive_greedy(z, n, start)


@contextmanager
def forced(path: str) -> Iterator[None]:
    """Force the pruned tree search ("tree") or the plain loop ("naive") whatever the size."""
    old = kcenter.NAIVE_MAX_BYTES
    kcenter.NAIVE_MAX_BYTES = -1 if path == "tree" else 1 << 62
    try:
        yield
    finally:
        kcenter.NAIVE_MAX_BYTES = old


PATHS = ["tree", "naive"]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def manifold(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Points near a curved 3-d manifold in ``dim`` dimensions (what the pruning exploits)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(num, 3, generator=gen, dtype=torch.float64) * 6
    freq = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    noise = 0.01 * torch.randn(num, dim, generator=gen, dtype=torch.float64)
    return torch.sin(t @ freq) + noise


# ---------------------------------------------------------------- equality with the reference


@pytest.mark.parametrize(
    ("num", "dim", "n", "projection_dim"),
    [
        (1, 3, 1, None),
        (2, 3, 2, None),
        (40, 5, 17, None),
        (300, 8, 300, None),  # everything, down to the last point
        (500, 40, 60, 16),  # with random projection
        (2500, 20, 250, None),  # several tree nodes: the pruned search and its fast argmax
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_equals_naive_greedy_float64(num, dim, n, projection_dim, path):
    x = randn(num, dim, seed=num)
    with forced(path):
        got = greedy_coreset(x, n, projection_dim=projection_dim, seed=3)
    assert got.tolist() == reference(x, n, projection_dim, seed=3)


def test_equals_naive_greedy_on_low_dimensional_structure():
    x = manifold(4000, 24)
    with forced("tree"):
        got = greedy_coreset(x, 400, projection_dim=None, seed=1)
    assert got.tolist() == reference(x, 400, None, seed=1)


@pytest.mark.parametrize("path", PATHS)
def test_equals_naive_greedy_float32_well_separated(path):
    # 48 tight clusters far apart: every greedy step is decided by a wide margin, so float32
    # rounding cannot change the selection. One centre per cluster first, then the second round.
    gen = torch.Generator().manual_seed(5)
    centres = 20.0 * torch.randn(48, 12, generator=gen)
    x = centres.repeat_interleave(25, 0) + 0.2 * torch.randn(48 * 25, 12, generator=gen)
    with forced(path):
        got = greedy_coreset(x, 60, projection_dim=None, seed=0)
    assert got.tolist() == reference(x.double(), 60, None, seed=0)
    assert len(set((got[:48] // 25).tolist())) == 48


@settings(max_examples=40, deadline=None)
@given(
    num=st.integers(1, 80),
    dim=st.integers(1, 6),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_equals_naive_greedy(num, dim, frac, seed):
    n = max(1, round(frac * num))
    x = randn(num, dim, seed=seed)
    expected = reference(x, n, None, seed=seed)
    for path in PATHS:
        with forced(path):
            assert greedy_coreset(x, n, projection_dim=None, seed=seed).tolist() == expected


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("path", PATHS)
def test_size_uniqueness_bounds_dtype(path):
    x = randn(700, 10, dtype=torch.float32)
    with forced(path):
        idx = greedy_coreset(x, 123)
    assert idx.shape == (123,) and idx.dtype == torch.long
    assert len(set(idx.tolist())) == 123
    assert int(idx.min()) >= 0 and int(idx.max()) < 700


@pytest.mark.parametrize("path", PATHS)
def test_same_seed_same_result_bit_for_bit(path):
    x = manifold(3000, 32).float()
    with forced(path):
        a = greedy_coreset(x, 300, projection_dim=16, seed=7)
        b = greedy_coreset(x.clone(), 300, projection_dim=16, seed=7)
    assert torch.equal(a, b)


def test_different_seed_different_start():
    x = randn(1000, 6)
    starts = {int(greedy_coreset(x, 2, seed=s)[0]) for s in range(5)}
    assert len(starts) > 1


def test_first_centre_is_seeded_not_global_rng():
    x = randn(1000, 6)
    torch.manual_seed(123)
    a = greedy_coreset(x, 5, seed=2)
    torch.manual_seed(456)
    b = greedy_coreset(x, 5, seed=2)
    assert torch.equal(a, b)


def test_greedy_covers_better_than_random():
    x = manifold(2000, 16)
    greedy = greedy_coreset(x, 100, projection_dim=None)
    rand = random_subsample(2000, 100, seed=0)
    assert coverage_radius(x, greedy) < 0.8 * coverage_radius(x, rand)


@pytest.mark.parametrize("path", PATHS)
def test_duplicates_are_covered_exactly(path):
    distinct = randn(30, 5, seed=4)
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    x = torch.cat([distinct, distinct, distinct[:10]])[perm]
    with forced(path):
        idx = greedy_coreset(x, 30, projection_dim=None)
    assert len(set(idx.tolist())) == 30
    assert coverage_radius(x, idx) < 1e-6


@pytest.mark.parametrize("path", PATHS)
def test_half_precision_and_progress_accepted(path):
    x = randn(300, 8, dtype=torch.float16)
    with forced(path):
        idx = greedy_coreset(x, 30, projection_dim=None, progress=True)
    assert idx.tolist() == reference(x.float(), 30, None, seed=0)


def test_projection_seeded_shape_and_identity():
    x = randn(10, 20)
    a = random_projection(x, 5, torch.Generator().manual_seed(1))
    b = random_projection(x, 5, torch.Generator().manual_seed(1))
    c = random_projection(x, 5, torch.Generator().manual_seed(2))
    assert a.shape == (10, 5) and torch.equal(a, b) and not torch.equal(a, c)
    assert random_projection(x, 20, torch.Generator()) is x
    assert random_projection(x, 64, torch.Generator()) is x


def test_projection_roughly_preserves_distances():
    x = randn(50, 400)
    z = random_projection(x, 200, torch.Generator().manual_seed(0))
    ratio = torch.pdist(z) / torch.pdist(x)
    assert float(ratio.min()) > 0.75 and float(ratio.max()) < 1.25


# ---------------------------------------------------------------- random_subsample, sizes


@settings(max_examples=30, deadline=None)
@given(num=st.integers(1, 500), frac=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_random_subsample_properties(num, frac, seed):
    n = max(1, round(frac * num))
    idx = random_subsample(num, n, seed=seed)
    assert idx.shape == (n,) and idx.dtype == torch.long
    assert len(set(idx.tolist())) == n
    assert int(idx.min()) >= 0 and int(idx.max()) < num
    assert torch.equal(idx, random_subsample(num, n, seed=seed))


def test_random_subsample_seed_changes_result():
    assert not torch.equal(random_subsample(1000, 50, seed=0), random_subsample(1000, 50, seed=1))


@pytest.mark.parametrize(
    ("num", "ratio", "expected"),
    [(1000, 0.1, 100), (1000, 1.0, 1000), (10, 0.01, 1), (7, 0.5, 4), (204800, 0.1, 20480)],
)
def test_coreset_size(num, ratio, expected):
    assert coreset_size(num, ratio) == expected


# ---------------------------------------------------------------- coverage_radius


def test_coverage_radius_matches_brute_force():
    x = randn(333, 7)
    sel = torch.tensor([0, 5, 17, 200])
    brute = float(torch.cdist(x, x[sel]).min(1).values.max())
    assert math.isclose(coverage_radius(x, sel, chunk_size=50), brute, rel_tol=1e-9)
    assert coverage_radius(x, torch.arange(333)) < 1e-6


def test_coverage_radius_float32_close():
    x = randn(200, 5, dtype=torch.float32)
    sel = torch.arange(0, 200, 9)
    brute = float(torch.cdist(x.double(), x[sel].double()).min(1).values.max())
    assert math.isclose(coverage_radius(x, sel), brute, rel_tol=1e-4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_coreset_size_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=rf"coreset ratio must be in \(0, 1\], got {ratio}"):
        coreset_size(100, ratio)


def test_greedy_errors():
    x = randn(20, 3)
    with pytest.raises(ValueError, match=r"n must be in \[1, N=20\].*got 21"):
        greedy_coreset(x, 21)
    with pytest.raises(ValueError, match=r"got 0"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match="2-D"):
        greedy_coreset(x[0], 1)
    with pytest.raises(ValueError, match="float"):
        greedy_coreset(torch.ones(4, 2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="finite"):
        greedy_coreset(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 1)
    with pytest.raises(ValueError, match=r"projection dim must be >= 1, got 0"):
        greedy_coreset(x, 3, projection_dim=0)


def test_random_subsample_and_coverage_errors():
    with pytest.raises(ValueError, match=r"n must be in \[1, num_features=5\], got 6"):
        random_subsample(5, 6)
    with pytest.raises(ValueError, match="at least one"):
        coverage_radius(randn(5, 2), torch.tensor([], dtype=torch.long))


def test_loops_leave_thread_count_alone():
    before = torch.get_num_threads()
    for path in PATHS:
        with forced(path):
            greedy_coreset(randn(200, 4), 20)
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- memory-lean path, dtypes, policy


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tree_equals_naive_loop_in_both_storage_dtypes(dtype):
    # The tree reads the stored rows in place (no working copy) and converts the gathered ones
    # per step: the selection is the naive loop's on the stored values, whatever their dtype.
    gen = torch.Generator().manual_seed(11)
    centres = 8.0 * torch.randn(64, 20, generator=gen)
    x = (centres.repeat_interleave(50, 0) + torch.randn(64 * 50, 20, generator=gen)).to(dtype)
    with forced("tree"):
        got = greedy_coreset(x, 300, seed=2)
    assert got.tolist() == reference(x.double(), 300, None, seed=2)
    with forced("naive"):
        assert greedy_coreset(x, 300, seed=2).tolist() == got.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_is_left_untouched(dtype):
    x = manifold(3000, 24).to(dtype)
    before = x.clone()
    with forced("tree"):
        greedy_coreset(x, 100)
        greedy_coreset(x, 100, projection_dim=8)
    assert torch.equal(x, before) and x.dtype == dtype


def test_default_selects_on_the_features_themselves():
    # projection_dim=None is the default: no projection (best coverage on 152-d features).
    x = randn(2500, 20, seed=8)
    with forced("tree"):
        assert greedy_coreset(x, 200, seed=4).tolist() == reference(x, 200, None, seed=4)
    projected = greedy_coreset(x, 200, projection_dim=8, seed=4)
    assert projected.tolist() == reference(x, 200, 8, seed=4)
    assert projected.tolist() != reference(x, 200, None, seed=4)


def test_random_projection_of_half_features_is_float32_and_blockwise():
    x = randn(1000, 40, seed=3, dtype=torch.float16)
    old = kcenter.CHUNK_BYTES
    kcenter.CHUNK_BYTES = 8 * 40 * 64  # 64 rows per block
    try:
        z = random_projection(x, 16, torch.Generator().manual_seed(5))
    finally:
        kcenter.CHUNK_BYTES = old
    whole = random_projection(x.float(), 16, torch.Generator().manual_seed(5))
    assert z.dtype == torch.float32 and torch.allclose(z, whole, rtol=1e-5, atol=1e-5)


def test_half_precision_nan_and_large_values():
    x = randn(100, 4, dtype=torch.float16)
    x[7, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        greedy_coreset(x, 3)
    # values near float16's maximum do not overflow the float64 finiteness check
    big = torch.full((5000, 4), 60000.0, dtype=torch.float16)
    big[::2] = -60000.0
    assert greedy_coreset(big, 2).tolist()[1] in range(5000)
    assert coverage_radius(big, torch.tensor([0, 1])) == 0.0


def test_tree_streams_in_small_blocks():
    # Block size does not change the result (mean, rotation and dense passes are streamed).
    x = manifold(4000, 24).float()
    with forced("tree"):
        a = greedy_coreset(x, 300, seed=1)
        old = kcenter.CHUNK_BYTES
        kcenter.CHUNK_BYTES = 8 * 24 * 300  # 300 rows per block
        try:
            b = greedy_coreset(x, 300, seed=1)
        finally:
            kcenter.CHUNK_BYTES = old
    assert torch.equal(a, b)


def test_leaves_bounded_in_blocks_give_the_same_selection():
    x = manifold(4000, 24)
    with forced("tree"):
        a = greedy_coreset(x, 400, seed=1)
        old = kcenter.LEAF_BLOCK
        kcenter.LEAF_BLOCK = 3
        try:
            b = greedy_coreset(x, 400, seed=1)
        finally:
            kcenter.LEAF_BLOCK = old
    assert torch.equal(a, b) and a.tolist() == reference(x, 400, None, seed=1)


# ---------------------------------------------------------------- chunked greedy (the default)


def clusters(num: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows in image-like runs of alike rows around 40 centres, with a heavy-tailed spread."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, dim, generator=gen) * 3
    run = torch.arange(num) // 97 % 40
    scale = torch.exp(0.6 * torch.randn(num, 1, generator=gen))
    return centres[run] + 0.3 * scale * torch.randn(num, dim, generator=gen)


def test_chunked_equals_exact_greedy_when_the_union_is_everything():
    x = clusters(3000)
    sel = chunked_greedy_coreset(x, 100, oversample=30.0, seed=5)  # 30 * 100 >= 3000
    assert sel.indices.tolist() == greedy_coreset(x, 100, seed=5).tolist()
    assert sel.radius == pytest.approx(coverage_radius(x, sel.indices), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_covers_almost_as_well_as_exact(dtype):
    x = clusters(40000).to(dtype)
    n = 400
    exact = coverage_radius(x, greedy_coreset(x, n, seed=0))
    sel = chunked_greedy_coreset(x, n, chunk_rows=2048, seed=0)
    assert sel.indices.shape == (n,) and sel.indices.dtype == torch.long
    assert sel.indices.unique().numel() == n
    radius = coverage_radius(x, sel.indices)
    assert radius <= 1.10 * exact  # the bound: within 10 % of the exact greedy
    assert sel.radius == pytest.approx(radius, rel=1e-4)  # certified by the repair pass
    random_radius = coverage_radius(x, random_subsample(x.shape[0], n, seed=0))
    assert radius < 0.8 * random_radius


def test_repair_recovers_what_a_starved_union_missed():
    x = clusters(40000)
    # oversample=1: the union is only about n rows, so stage 2 alone covers badly
    starved = chunked_greedy_coreset(x, 400, oversample=1.0, repair_fraction=0.0)
    repaired = chunked_greedy_coreset(x, 400, oversample=1.0, repair_fraction=0.2)
    assert coverage_radius(x, repaired.indices) < 0.8 * coverage_radius(x, starved.indices)


def test_chunked_is_seeded_and_checks_arguments():
    x = clusters(9000)
    a = chunked_greedy_coreset(x, 90, seed=1).indices
    assert torch.equal(a, chunked_greedy_coreset(x, 90, seed=1).indices)
    assert not torch.equal(a, chunked_greedy_coreset(x, 90, seed=2).indices)
    with pytest.raises(ValueError, match="n must be in"):
        chunked_greedy_coreset(x, 0)
    with pytest.raises(ValueError, match="repair_fraction"):
        chunked_greedy_coreset(x, 10, repair_fraction=0.9)
    with pytest.raises(ValueError, match="oversample"):
        chunked_greedy_coreset(x, 10, oversample=0.5)
    bad = x.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        chunked_greedy_coreset(bad, 10)
