"""Exact nearest-neighbour search: equality with brute force, chunking, dtypes, errors."""

from __future__ import annotations

import pytest
import torch

from patchcore.core.search import (
    NearestNeighborIndex,
    bf16_error,
    nearest_neighbors,
    patch_scores,
    patch_scores_groups,
)


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int):
    diff = queries.double()[:, None, :] - bank.double()[None, :, :]
    dist, idx = diff.norm(dim=2).sort(dim=1)  # direct differences: no expansion, no cancellation
    return dist[:, :k], idx[:, :k]


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    queries = torch.randn(57, 12, generator=gen, dtype=torch.float64)
    return queries, bank


@pytest.mark.parametrize("k", [1, 3])
def test_equals_brute_force(data, k):
    queries, bank = data
    dist, idx = NearestNeighborIndex(bank).search(queries, k=k)
    ref_dist, ref_idx = brute_force(queries, bank, k)
    assert dist.shape == (57, k) and idx.shape == (57, k)
    assert idx.dtype == torch.long and dist.dtype == torch.float64
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-10, atol=1e-10)
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


@pytest.mark.parametrize("k", [1, 3])
def test_float32_equals_brute_force(data, k):
    queries, bank = data
    dist, idx = NearestNeighborIndex(bank.float()).search(queries.float(), k=k)
    ref_dist, ref_idx = brute_force(queries, bank, k)
    assert dist.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_rows", [1, 7, 56, 57, 58])
@pytest.mark.parametrize("k", [1, 3])
def test_chunk_boundaries(data, block_rows, k):
    queries, bank = data
    index = NearestNeighborIndex(bank, max_block_bytes=block_rows * bank.shape[0] * 8)
    assert index.chunk_size() == block_rows
    dist, idx = index.search(queries, k=k)
    ref_dist, ref_idx = NearestNeighborIndex(bank).search(queries, k=k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=0, atol=1e-12)


def test_chunk_size_respects_budget():
    bank = torch.zeros(1000, 4)
    index = NearestNeighborIndex(bank, max_block_bytes=10_000)
    assert index.chunk_size() == 2  # 2 * 1000 * 4 bytes <= 10_000 < 3 * 4000
    assert NearestNeighborIndex(bank, max_block_bytes=1).chunk_size() == 1


def test_float16_bank_computed_in_float32(data):
    queries, bank = data
    bank16 = bank.half()
    index = NearestNeighborIndex(bank16)
    assert index.bank.dtype == torch.float16 and index.dtype == torch.float32
    dist, idx = index.search(queries.half(), k=3)
    ref_dist, ref_idx = brute_force(queries.half().float(), bank16.float(), 3)
    assert dist.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-4)


def test_k1_tie_goes_to_lowest_index():
    # Small integers: every product and sum is exact in float32, so the tie is exact.
    bank = torch.tensor([[3.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 5.0]])
    queries = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 0.0]])
    dist, idx = NearestNeighborIndex(bank).search(queries, k=1)
    assert idx[:, 0].tolist() == [1, 1, 1]
    torch.testing.assert_close(dist[:, 0], torch.tensor([0.0, 2**0.5, 1.0]))


def test_self_search_distance_zero_not_negative():
    gen = torch.Generator().manual_seed(1)
    bank = 100.0 + torch.randn(64, 8, generator=gen)  # large norms: cancellation in the expansion
    dist, idx = NearestNeighborIndex(bank).search(bank, k=1)
    assert torch.equal(idx[:, 0], torch.arange(64))
    assert torch.all(dist >= 0)
    assert torch.all(dist < 0.01)
    assert torch.all(torch.isfinite(dist))


def test_nearest_neighbors_wrapper(data):
    queries, bank = data
    d1, i1 = nearest_neighbors(queries, bank, k=2)
    d2, i2 = NearestNeighborIndex(bank).search(queries, k=2)
    assert torch.equal(i1, i2) and torch.equal(d1, d2)


def test_k_equal_to_bank_size(data):
    queries, bank = data
    dist, idx = NearestNeighborIndex(bank[:5]).search(queries, k=5)
    assert torch.equal(idx.sort(1).values, torch.arange(5).expand(57, 5))


def test_errors(data):
    queries, bank = data
    index = NearestNeighborIndex(bank)
    with pytest.raises(ValueError, match=r"k must be in \[1, 300\].*got 301"):
        index.search(queries, k=301)
    with pytest.raises(ValueError, match=r"got 0"):
        index.search(queries, k=0)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 12\).*\(57, 5\)"):
        index.search(queries[:, :5])
    with pytest.raises(ValueError, match="2-D"):
        NearestNeighborIndex(bank[0])
    with pytest.raises(ValueError, match="empty"):
        NearestNeighborIndex(bank[:0])
    with pytest.raises(ValueError, match="float"):
        NearestNeighborIndex(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_block_bytes"):
        NearestNeighborIndex(bank, max_block_bytes=0)


def test_min_distances_equal_search_k1() -> None:
    gen = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(700, 24, generator=gen), torch.randn(300, 24, generator=gen)
    index = NearestNeighborIndex(bank, max_block_bytes=40 * 700 * 4)  # several blocks
    dist = index.min_distances(queries)
    assert dist.shape == (300,)
    torch.testing.assert_close(dist, index.search(queries, k=1)[0][:, 0], rtol=0, atol=0)
    naive = torch.cdist(queries.double(), bank.double()).amin(1).float()
    torch.testing.assert_close(dist, naive, rtol=1e-5, atol=1e-5)


def _clustered(seed: int, n: int, d: int = 24, offset: float = 5.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=gen) * 4 + offset
    pick = torch.randint(8, (n,), generator=gen)
    return centres[pick] + torch.randn(n, d, generator=gen) * 0.5


def test_bfloat16_error_bound_holds():
    bank, queries = _clustered(1, 900), _clustered(2, 700)
    index = NearestNeighborIndex(bank, precision="bfloat16")
    d2, err = index.min_sq_bounded(queries)
    exact = brute_force(queries, bank, 1)[0][:, 0] ** 2
    assert torch.all((d2.double() - exact).abs() <= err.double())
    assert float(((d2.double() - exact).abs() > 0).float().mean()) > 0.1  # really approximate
    dist = index.min_distances(queries)
    assert torch.allclose(dist.double(), exact.sqrt(), rtol=0.2, atol=0.3)
    # float32 index: the bound is zero and the values exact
    d2_32, err_32 = NearestNeighborIndex(bank).min_sq_bounded(queries)
    assert torch.all(err_32 == 0)
    torch.testing.assert_close(d2_32.double(), exact, rtol=1e-4, atol=1e-3)


def test_bfloat16_error_bound_holds_where_every_rounding_adds_up():
    """Components just under half a bfloat16 step, the nearest row the query itself: the
    roundings of q and -2 b add up to about 4 u |q| |b|, most of the a-posteriori bound
    (which the worst case respects and the first form exceeds by far)."""
    d, u = 128, 2.0**-8
    v = torch.full((d,), 1 + 0.99 * u)  # rounds down to 1 (relative error 0.99 u)
    bank = torch.stack([v, -v, 2 * v, -2 * v])  # centred: the mean is 0
    queries = torch.stack([v, -v, 2 * v])
    index = NearestNeighborIndex(bank, precision="bfloat16")
    d2, err = index.min_sq_bounded(queries)
    exact = brute_force(queries, bank, 1)[0][:, 0].double() ** 2
    gap = (d2.double() - exact).abs()
    assert torch.all(gap <= err.double())
    assert float((gap / err.double()).max()) > 0.4  # a tight bound, not a loose one
    qsq = (queries * queries).sum(1)
    worst = bf16_error(qsq, float(bank.norm(dim=1).max()), d)
    assert torch.all(err < worst)


def test_bfloat16_error_bound_allows_for_truncated_outputs():
    """OpenVINO may truncate the products to bfloat16 instead of rounding them: the bound with
    ``truncated=True`` holds for a scan whose outputs are truncated toward zero."""
    bank, queries = _clustered(1, 900), _clustered(2, 700)
    index = NearestNeighborIndex(bank, precision="bfloat16")
    q = queries - bank.mean(0)
    qsq = (q * q).sum(1)
    q_ext = torch.cat([q, torch.ones_like(q[:, :1])], 1).to(torch.bfloat16).float()
    product = q_ext @ index._bank_bf16.float().T  # bfloat16 products are exact in float32
    truncated = (product.view(torch.int32) & ~0xFFFF).view(torch.float32).amin(1)
    gap = (truncated.double() + qsq.double() - brute_force(queries, bank, 1)[0][:, 0] ** 2).abs()
    err = bf16_error(qsq, index._max_norm, bank.shape[1], truncated, truncated=True)
    assert torch.all(gap <= err.double())
    assert torch.all(err > bf16_error(qsq, index._max_norm, bank.shape[1], truncated))


def test_patch_scores_bfloat16_image_max_is_exact():
    bank = _clustered(3, 1200)
    patches = _clustered(4, 6 * 150).view(6, 150, -1)
    patches[2, 17] += 3.0  # one clear outlier patch
    ref_scores, ref_max, ref_arg = patch_scores(NearestNeighborIndex(bank), patches)
    brute = brute_force(patches.reshape(-1, patches.shape[-1]), bank, 1)[0][:, 0].view(6, 150)
    torch.testing.assert_close(ref_scores.double(), brute, rtol=1e-4, atol=1e-4)
    scores, image_max, arg = patch_scores(NearestNeighborIndex(bank, precision="bfloat16"), patches)
    assert torch.equal(arg, ref_arg)
    torch.testing.assert_close(image_max, ref_max, rtol=1e-5, atol=1e-5)
    assert int(arg[2]) == 17
    torch.testing.assert_close(scores, ref_scores, rtol=0.1, atol=0.2)


@pytest.mark.parametrize("k", [3, 10, 150])
def test_patch_scores_bfloat16_top_k_are_exact(k: int):
    """With ``k`` the k largest distances of every image are the float32 ones, although the
    bfloat16 estimates of the other patches differ from them (near-ties included)."""
    bank = _clustered(3, 1200)
    patches = _clustered(4, 6 * 150).view(6, 150, -1)
    ref = patch_scores(NearestNeighborIndex(bank), patches)[0].topk(k, dim=1).values
    scores, image_max, _ = patch_scores(
        NearestNeighborIndex(bank, precision="bfloat16"), patches, k
    )
    torch.testing.assert_close(scores.topk(k, dim=1).values, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_max, ref[:, 0], rtol=1e-5, atol=1e-5)
    # without k only the maximum is guaranteed: the other estimates are visibly off
    plain = patch_scores(NearestNeighborIndex(bank, precision="bfloat16"), patches)[0]
    full = patch_scores(NearestNeighborIndex(bank), patches)[0]
    assert (plain - full).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["bfloat16", "float32", "int8"])
def test_groups_searched_together_get_the_results_they_get_alone(precision: str):
    """Images of different sizes in one scan and one re-check: each group's exact top k, its
    maximum and where it lies are those of the group alone (a group smaller than 2 k too)."""
    bank = _clustered(3, 1200)
    groups = [
        _clustered(4, 2 * 150).view(2, 150, -1),
        _clustered(5, 97).view(1, 97, -1),
        _clustered(6, 5).view(1, 5, -1),
        _clustered(7, 3 * 40).view(3, 40, -1),
    ]
    groups[1][0, 11] += 3.0
    index = NearestNeighborIndex(bank, precision=precision)
    k = 10
    together = patch_scores_groups(index, groups, k)
    for g, (scores, image_max, arg) in zip(groups, together, strict=True):
        alone, alone_max, alone_arg = patch_scores(index, g, k)
        kk = min(k, g.shape[1])
        want = patch_scores(NearestNeighborIndex(bank), g)[0].topk(kk, dim=1).values
        torch.testing.assert_close(scores.topk(kk, dim=1).values, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(image_max, alone_max, rtol=1e-6, atol=1e-6)
        assert torch.equal(arg, alone_arg) and scores.shape == alone.shape
        torch.testing.assert_close(scores, alone, rtol=0.1, atol=0.2)
    assert int(together[1][2][0]) == 11


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        NearestNeighborIndex(torch.randn(4, 3), precision="int4")


def _naive_int8_rows(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The int8 scan as the module describes it, in float64 with no chunks, padding or digit
    columns: the lowest row minimising ``round(|b|^2 / 2 s^2 - C) - round(q/s) . round(b/s)``."""
    mean = bank.double().mean(0)
    b, q = bank.double() - mean, queries.double() - mean
    s = float(b.abs().max()) / 127
    c = (b * b).sum(1) / (2 * s * s)
    c = torch.round(c - (float(c.max()) + float(c.min())) / 2)
    value = c - torch.round(q / s).clamp(-127, 127) @ torch.round(b / s).clamp(-127, 127).T
    return value.argmin(1)  # torch's argmin: the first minimum


@pytest.mark.parametrize("rows", [300, 256, 1037])
def test_int8_scan_finds_the_rows_of_the_naive_scan(rows: int):
    """Chunks, padding, digit columns and blocks change nothing: the rows found are those of
    the naive scan, and each value is the float32 squared distance to that row."""
    bank = _clustered(8, rows, d=40)
    queries = torch.cat([_clustered(9, 450, d=40), bank[:20] + 0.01])
    index = NearestNeighborIndex(bank, precision="int8", max_block_bytes=4 * 1280 * 40)
    assert index.chunk_size() < queries.shape[0]  # several blocks
    estimate, upper = index.min_sq_upper(queries)
    assert estimate is upper or torch.equal(estimate, upper)
    want = _naive_int8_rows(queries, bank)
    to_found = (queries.double() - bank.double()[want]).square().sum(1)
    torch.testing.assert_close(upper.double(), to_found, rtol=1e-5, atol=1e-4)
    exact = brute_force(queries, bank, 1)[0][:, 0].double() ** 2
    assert torch.all(upper.double() >= exact * (1 - 1e-5) - 1e-4)  # an upper bound
    found = (upper.double() - exact).abs() <= 1e-5 * exact + 1e-4
    assert float(found.float().mean()) > 0.6  # and mostly the nearest row itself
    assert not bool(found.all())  # but an approximate scan: this test sees its misses


def test_int8_results_do_not_depend_on_the_batch():
    bank, queries = _clustered(1, 900), _clustered(2, 300)
    index = NearestNeighborIndex(bank, precision="int8")
    together = index.min_distances(queries)
    alone = torch.cat([index.min_distances(queries[i : i + 1]) for i in range(0, 300, 37)])
    assert torch.equal(together[::37], alone)


def test_int8_queries_beyond_the_bank_range_still_get_upper_bounds():
    bank = _clustered(1, 500)
    far = _clustered(2, 50) * 40.0  # elements far outside the bank's range: clamped
    index = NearestNeighborIndex(bank, precision="int8")
    upper = index.min_sq_upper(far)[1].double()
    exact = brute_force(far, bank, 1)[0][:, 0].double() ** 2
    assert torch.all(torch.isfinite(upper)) and torch.all(upper >= exact * (1 - 1e-5))
    # min_sq_bounded's two-sided form of it: 0 <= true <= d2 + err
    d2, err = index.min_sq_bounded(far)
    assert torch.all((d2.double() - exact).abs() <= err.double() * (1 + 1e-6))


@pytest.mark.parametrize("k", [1, 10])
def test_patch_scores_int8_top_k_are_exact(k: int):
    """int8 scan: each image's k largest distances are float32's; the other patches carry
    distances to real bank rows, never below the nearest one."""
    bank = _clustered(3, 1200)
    patches = _clustered(4, 6 * 150).view(6, 150, -1)
    patches[2, 17] += 3.0
    ref_scores, ref_max, ref_arg = patch_scores(NearestNeighborIndex(bank), patches, k)
    scores, image_max, arg = patch_scores(NearestNeighborIndex(bank, precision="int8"), patches, k)
    torch.testing.assert_close(scores.topk(k, dim=1).values, ref_scores.topk(k, dim=1).values)
    torch.testing.assert_close(image_max, ref_max)
    assert torch.equal(arg, ref_arg) and int(arg[2]) == 17
    assert torch.all(scores >= ref_scores * (1 - 1e-5))


def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch):
    from patchcore.core import search

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cases = {
        frozenset({"avx512_vnni", "avx512_bf16"}): ("int8", "bfloat16"),
        frozenset({"amx_int8", "amx_bf16"}): ("int8", "bfloat16"),
        frozenset({"avx_vnni"}): ("int8", "float32"),
        frozenset({"avx512_bf16"}): ("bfloat16", "bfloat16"),
        frozenset({"avx2"}): ("float32", "float32"),
    }
    for flags, (scoring, two_sided) in cases.items():
        monkeypatch.setattr(search, "_cpu_flags", lambda flags=flags: flags)
        assert search.resolve_precision("auto", cpu) == scoring
        assert search.resolve_precision("auto", cpu, upper_only=False) == two_sided
        assert search.resolve_precision("auto", gpu) == "float32"
        assert search.resolve_precision("bfloat16", cpu) == "bfloat16"


def test_int8_non_finite_values_are_never_hidden():
    """A NaN in the bank makes every distance NaN (the scan would otherwise find other rows);
    a NaN or infinite query element gives that query a non-finite distance, the others not."""
    bank, queries = _clustered(1, 400), _clustered(2, 30)
    bad = bank.clone()
    bad[7, 3] = float("nan")
    assert torch.isnan(NearestNeighborIndex(bad, precision="int8").min_distances(queries)).all()
    queries[4, 0], queries[9, 2] = float("nan"), float("inf")
    dist = NearestNeighborIndex(bank, precision="int8").min_distances(queries)
    assert not torch.isfinite(dist[[4, 9]]).any()
    assert torch.isfinite(dist[[i for i in range(30) if i not in (4, 9)]]).all()
