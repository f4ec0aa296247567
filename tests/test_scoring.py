"""One scoring rule (patchcore.core.scoring): the detector's scores and maps against the exported
graph's (float32) and against a naive reference written out with brute-force distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from patchcore.core import scoring
from patchcore.core.detector import PatchCore
from patchcore.core.embedding import flatten_patches
from patchcore.core.graph import ScoringGraph

SIZE = (96, 96)


@pytest.fixture(scope="module", params=[10, 1], ids=["top10", "eq7"])
def det(request, toy_images) -> PatchCore:
    train, _, _ = toy_images
    return PatchCore(
        image_size=SIZE,
        coreset_ratio=0.1,
        top_k=request.param,
        num_neighbors=3,
        search_precision="float32",
        progress=False,
    ).fit(train[:4])


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images])


def naive(det: PatchCore, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Scores and processed-size maps from float64 brute force: every patch against every bank
    row; top-k mean, or the max with eq. 7 written out; bilinear upsampling then scipy's
    Gaussian filter (mirror borders = torch's reflect, radius 4 sigma)."""
    bank = det.memory_bank_.double()
    scores, maps = [], []
    for x in pixels:
        emb = det._embed(x[None])
        h, w = emb.shape[-2:]
        patches = flatten_patches(emb).double()
        dist = torch.cdist(patches, bank)
        nearest, rows = dist.min(1)
        if det.top_k > 1:
            scores.append(float(nearest.topk(det.top_k).values.mean()))
        else:
            worst = int(nearest.argmax())
            support = torch.cdist(bank[rows[worst]][None], bank)[0].argsort()[: det.num_neighbors]
            d = dist[worst, support]
            scores.append(float((1 - torch.exp(d[0]) / torch.exp(d).sum()) * nearest[worst]))
        up = F.interpolate(nearest.view(1, 1, h, w), size=SIZE, mode="bilinear")[0, 0]
        maps.append(ndimage.gaussian_filter(up.numpy(), det.sigma, mode="mirror", truncate=4.0))
    return np.array(scores), np.stack(maps)


def test_detector_graph_and_naive_reference_agree(det: PatchCore, toy_images) -> None:
    _, good, bad = toy_images
    images = good[:2] + bad[:2]
    pixels = _pixels(images)
    got = det.score(images, maps="processed")
    got_maps = np.stack(got.maps)
    with torch.inference_mode():
        fixed = [t.numpy() for t in ScoringGraph(det, SIZE).eval()(pixels)]
        dynamic = [t.numpy() for t in ScoringGraph(det, None).eval()(pixels)]
    want_scores, want_maps = naive(det, pixels)
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-5)
    top = float(want_maps.max())
    np.testing.assert_allclose(got_maps, want_maps, rtol=0, atol=2e-5 * top)
    for scores, maps in (fixed, dynamic):  # the exported graph: float32 throughout
        np.testing.assert_allclose(scores, got.scores, rtol=1e-5)
        np.testing.assert_allclose(maps, got_maps, rtol=0, atol=2e-5 * top)
    assert got.scores[2:].min() > got.scores[:2].max()  # the defects rank highest


def test_the_rule_by_hand() -> None:
    d = torch.tensor([[1.0, 5.0, 3.0, 2.0], [0.5, 0.25, 4.0, 1.0]])
    torch.testing.assert_close(scoring.image_scores(d, 2), torch.tensor([4.0, 2.5]))
    torch.testing.assert_close(scoring.image_scores(d, 9), d.mean(1))  # k > P: every patch
    torch.testing.assert_close(scoring.image_scores(d, 1), torch.tensor([5.0, 4.0]))
    patches = torch.arange(16.0).view(2, 4, 2)
    worst = scoring.worst_patches(patches, torch.tensor([1, 2]))
    torch.testing.assert_close(worst, torch.tensor([[2.0, 3.0], [12.0, 13.0]]))
    # eq. 7, m* at distance 0 and one neighbour at distance 1: weight 1 - e^0 / (e^0 + e^1)
    support = lambda w: torch.stack([w, w + torch.tensor([1.0, 0.0])], 1)  # noqa: E731
    got = scoring.image_scores(d, 1, patches=patches, support=support)
    weight = 1.0 - 1.0 / (1.0 + float(np.exp(1.0)))
    torch.testing.assert_close(got, torch.tensor([5.0, 4.0]) * weight)
