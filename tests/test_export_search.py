"""The exported graph's int8 and bfloat16 searches with their exact float32 re-check (issue #24).

On the toy detector (``_service_models``): patches drawn next to bank rows, plus one far
outlier per batch (beyond the table's fixed scale: clamped). The int8 graph's scan finds the
rows the torch path's int8 scan finds (the same table, several scan blocks). Each image's
``top_k`` largest
distances must equal the float32 search's (the re-check), every other value must be an upper
bound of the true distance, and the scan must actually have erred somewhere (else the test
proves nothing). The bfloat16 graph (eager: the deployed bfloat16 arithmetic) the same way,
its other values within the scan's error bound. The whole exported graphs on real images,
and the OpenVINO model's bfloat16 products: tests/test_export.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _service_models import toy_detector

from patchcore.core.export_search import Bf16ScoringGraph, Int8ScoringGraph
from patchcore.core.graph import ScoringGraph
from patchcore.core.search import NearestNeighborIndex, bf16_error


def _patches(bank: torch.Tensor, b: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, bank.shape[0], (b, p), generator=g)
    scale = bank.std() * torch.rand(b, p, 1, generator=g) * 0.3
    out = bank[rows] + scale * torch.randn(b, p, bank.shape[1], generator=g)
    out[0, 0] = bank.mean(0) + 30 * bank.std() * torch.randn(bank.shape[1], generator=g)
    return out


def _top_k_exact(kind: type, top_k: int) -> tuple:
    """A ``kind`` graph (several bank blocks) on drawn patches: (graph, bank, patches, its
    distances, the float32 search's), each image's ``top_k`` largest checked equal."""
    det = toy_detector()
    graph = kind(det, (64, 64), block_rows=37).eval()
    graph.top_k = top_k
    bank = det.memory_bank_.float()
    patches = _patches(bank, 4, 90, seed=top_k)
    with torch.no_grad():
        got = graph.patch_distances(patches)
        exact = ScoringGraph.patch_distances(graph, patches)  # the float32 search
    torch.testing.assert_close(
        got.topk(top_k, dim=1).values, exact.topk(top_k, dim=1).values, rtol=1e-6, atol=0
    )
    return graph, bank, patches, got, exact


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_each_images_top_k_is_exact_and_the_rest_are_upper_bounds(top_k):
    graph, bank, patches, got, exact = _top_k_exact(Int8ScoringGraph, top_k)
    # upper bounds up to the rounding of the float32 expansion |p|^2 - 2 p.b + |b|^2, which is
    # absolute in the squared distance: a few float32 epsilons of the squared norms
    norms2 = patches.square().sum(-1).max() + bank.square().sum(-1).max()
    slack = 16 * torch.finfo(torch.float32).eps * norms2
    assert (got.square() >= exact.square() * (1 - 1e-4) - slack).all()
    assert (got > exact * (1 + 1e-3)).any(), "the int8 scan never erred: the test is too easy"


def test_the_graphs_scan_finds_the_torch_scans_rows():
    """Blocks of the table, uint8 codes with the zero point, chunk minima: the rows found are
    those of the torch path's int8 index, and so are the bounds."""
    det = copy.deepcopy(toy_detector())  # the toy detector is shared: change a copy
    small = det.memory_bank_.float()
    g = torch.Generator().manual_seed(5)
    rows = torch.randint(0, small.shape[0], (700,), generator=g)  # 700 rows: 3 blocks, padded
    bank = small[rows] + 0.3 * small.std() * torch.randn(700, small.shape[1], generator=g)
    det.state_.memory_bank = bank
    graph = Int8ScoringGraph(det, (64, 64), block_rows=37, scan_columns=256).eval()
    assert len(graph.scan_starts) == 3
    patches = torch.cat([_patches(bank, 4, 90, seed=s) for s in range(3)]).reshape(
        -1, bank.shape[1]
    )
    index = NearestNeighborIndex(bank, precision="int8")
    qc = patches - graph.bank_mean
    with torch.no_grad():
        rows = graph._scan(qc)
    assert index._int8 is not None
    want = index._int8.nearest_rows(index._int8.encode(index._centred(patches)))
    assert torch.equal(rows, want)
    bound = ((qc - graph.rows[rows]) ** 2).sum(1)
    torch.testing.assert_close(bound, index.min_sq_upper(patches)[1], rtol=1e-5, atol=1e-4)


def test_the_scan_alone_would_miss_the_top_k():
    """Without the re-check (the bounds as they come from the scan) some image's top-k would
    differ: the re-check is what makes the scores exact."""
    det = toy_detector()
    graph = Int8ScoringGraph(det, (64, 64), block_rows=37).eval()
    bank = det.memory_bank_.float()
    wrong = 0
    for seed in range(6):
        patches = _patches(bank, 4, 90, seed=100 + seed)
        flat = patches.reshape(-1, patches.shape[-1]) - graph.bank_mean
        with torch.no_grad():
            bound = ((flat - graph.rows[graph._scan(flat)]) ** 2).sum(1).sqrt().view(4, 90)
            exact = ScoringGraph.patch_distances(graph, patches)
        k = graph.top_k
        wrong += int((bound.topk(k, 1).values - exact.topk(k, 1).values).abs().max() > 1e-4)
    assert wrong > 0


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_bf16_graph_top_k_is_exact_and_the_rest_within_the_bound(top_k):
    graph, _, patches, got, exact = _top_k_exact(Bf16ScoringGraph, top_k)
    qc = patches.reshape(-1, patches.shape[-1]) - graph.bank_mean
    err = bf16_error((qc * qc).sum(1), graph.max_norm, qc.shape[1]).view(got.shape)
    assert ((got.square() - exact.square()).abs() <= err * 1.001).all()
    assert ((got - exact).abs() > exact * 1e-3).any(), "the scan never erred: too easy"


def test_the_bf16_scan_alone_would_miss_the_top_k():
    """The bfloat16 estimates without the re-check give some image a different top k."""
    det = toy_detector()
    graph = Bf16ScoringGraph(det, (64, 64), block_rows=37).eval()
    bank = det.memory_bank_.float()
    wrong = 0
    for seed in range(6):
        patches = _patches(bank, 4, 90, seed=100 + seed)
        flat = patches.reshape(-1, patches.shape[-1]) - graph.bank_mean
        q_ext = torch.cat([flat, torch.ones_like(flat[:, :1])], 1)
        with torch.no_grad():
            parts = [
                torch.ops.patchcore.bf16_min_sq(q_ext, getattr(graph, f"bf16_block{i}"))
                for i in range(graph.n_blocks)
            ]
            est = (torch.stack(parts).amin(0) + (flat * flat).sum(1)).clamp(min=0).sqrt()
            exact = ScoringGraph.patch_distances(graph, patches)
        k = graph.top_k
        est_top = est.view(4, 90).topk(k, 1).values
        top = exact.topk(k, 1).values
        wrong += int(((est_top - top).abs() / top).max() > 1e-4)  # the export's parity limit
    assert wrong > 0
