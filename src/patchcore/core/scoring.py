"""The scoring rule, written once: the image score from patch distances, and the anomaly map.

:meth:`PatchCore._score_batch <patchcore.core.detector.PatchCore>`, :meth:`explain
<patchcore.core.explain.ExplainMixin.explain>` and the exported graph
(:class:`patchcore.core.graph.ScoringGraph`) all call these functions; only where the distances
come from differs (the detector's search re-checks its candidates in float32, the graph
computes every distance in float32).

Image score (:func:`image_scores`): the mean of the ``top_k`` largest patch distances
(:func:`top_k_mean`); with ``top_k = 1`` the largest, reweighted by the paper's eq. 7
(:func:`reweight`) when the ``k`` bank rows around the worst patch's nearest row are given.

Anomaly map: bilinear upsampling of the patch distances to the processed size, then a Gaussian
blur (sigma 4). Both steps are linear and separable, so :func:`upsample_blur` applies them as two
small matrix products per map, ``A_h @ scores @ A_w.T`` (:func:`apply_operators`), with ``A``
(out x in) = blur @ upsample along one axis (:func:`axis_operator`, built once per shape, in
float64): the same map as bilinear upsampling followed by :func:`gaussian_blur` to float32
rounding, at a fraction of the cost (benchmarks/RESULTS.md). :func:`maps_at_sizes` then brings
each map to its output size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "apply_operators",
    "axis_operator",
    "blur",
    "blur_mode",
    "gaussian_blur",
    "gaussian_kernel1d",
    "image_scores",
    "maps_at_sizes",
    "patch_scores_to_map",
    "reweight",
    "top_k_mean",
    "upsample_blur",
    "worst_patches",
]

# ---------------------------------------------------------------------------- image score


def top_k_mean(distances: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B,) mean of each image's ``top_k`` largest patch distances (all of them when fewer).

    Args:
        distances: (B, P) patch distances whose ``top_k`` largest are exact.
    """
    k = min(int(top_k), distances.shape[1])
    return distances.topk(k, dim=1).values.float().mean(dim=1)


def worst_patches(patches: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """(B, D): each image's patch at ``arg`` from (B, P, D) patches (a gather: exportable)."""
    b, _, d = patches.shape
    return torch.gather(patches, 1, arg.view(b, 1, 1).expand(b, 1, d))[:, 0]


def reweight(worst: torch.Tensor, support: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The paper's eq. 7: damp each image's max-patch score where its neighbourhood is dense.

    Args:
        worst: (B, D) each image's most anomalous patch.
        support: (B, k, D) the ``k`` bank rows nearest to that patch's nearest bank row m*
            (m* itself first).
        scores: (B,) the max-patch scores.
    """
    d = torch.linalg.vector_norm(worst[:, None, :] - support, dim=-1)  # (B, k)
    return (1.0 - torch.softmax(d, dim=1)[:, 0]) * scores


def image_scores(
    distances: torch.Tensor,
    top_k: int,
    *,
    patches: torch.Tensor | None = None,
    best: tuple[torch.Tensor, torch.Tensor] | None = None,
    support: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B,) image scores, higher = more anomalous: the one rule.

    Args:
        distances: (B, P) nearest-bank distances of each image's patches.
        top_k: > 1: :func:`top_k_mean`; 1: the largest distance (eq. 7 below).
        patches: (B, P, D) the patches (needed for eq. 7 only).
        best: ``(max, argmax)`` over P when already known exactly (else from ``distances``).
        support: (B, D) worst patches -> (B, k, D) bank rows for :func:`reweight`; ``None``
            (or ``top_k > 1``): no reweighting.
    """
    if int(top_k) > 1:
        return top_k_mean(distances, top_k)
    image_max, arg = distances.max(dim=1) if best is None else best
    if support is None or patches is None:
        return image_max
    worst = worst_patches(patches, arg)
    return reweight(worst, support(worst), image_max)


# ---------------------------------------------------------------------------- anomaly map


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius 4 sigma (odd length)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def blur_mode(h: int, w: int, sigma: float) -> str:
    """The border mode of the blur of an (h, w) map: reflected, or replicated when the map is
    not wider than the kernel's radius."""
    r = max(1, int(math.ceil(4.0 * sigma)))
    return "reflect" if min(h, w) > r else "replicate"


def blur(maps: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Separable blur of (B, 1, H, W) maps with a 1-D ``kernel`` (odd length), borders ``mode``."""
    r = kernel.numel() // 2
    x = F.conv2d(F.pad(maps, (r, r, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), kernel.view(1, 1, -1, 1))


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (replicated for maps under the radius).

    Args:
        maps: (B, 1, H, W).

    Returns:
        (B, 1, H, W).
    """
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.dtype).to(maps.device)
    return blur(maps, k, blur_mode(*maps.shape[-2:], sigma))


@functools.lru_cache(maxsize=32)
def axis_operator(n_in: int, n_out: int, sigma: float, mode: str) -> torch.Tensor:
    """(n_out, n_in) float64: bilinear upsampling (align_corners=False), then the 1-D blur."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in signals of length n_in
    x = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)  # (n_in, 1, n_out)
    if sigma > 0:
        k = gaussian_kernel1d(sigma, torch.float64)
        r = k.numel() // 2
        x = F.conv1d(F.pad(x, (r, r), mode=mode), k.view(1, 1, -1))
    return x[:, 0].T.contiguous()


def map_operators(
    grid: tuple[int, int], size: tuple[int, int], sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_h, A_w)`` float64 of :func:`upsample_blur` from a (h, w) patch grid to ``size``."""
    (h, w), (H, W) = grid, size
    mode = blur_mode(H, W, sigma) if sigma > 0 else "none"
    return axis_operator(h, H, float(sigma), mode), axis_operator(w, W, float(sigma), mode)


def apply_operators(grid: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) patch scores -> (B, 1, H, W): ``A_h @ grid @ A_w.T``."""
    return torch.matmul(torch.matmul(a_h, grid), a_w.T)


def upsample_blur(grid: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Bilinear upsampling of patch scores to ``size``, then :func:`gaussian_blur`, as two products.

    Args:
        grid: (B, 1, h, w) patch scores.
        size: output (H, W).
        sigma: Gaussian sigma in output pixels (<= 0: no blur).

    Returns:
        (B, 1, H, W), equal to ``gaussian_blur(F.interpolate(grid, size, mode="bilinear"), sigma)``
        up to float rounding.
    """
    dtype = grid.dtype if grid.dtype in (torch.float32, torch.float64) else torch.float32
    a_h, a_w = map_operators(tuple(grid.shape[-2:]), tuple(size), sigma)
    return apply_operators(grid.to(dtype), a_h.to(grid.device, dtype), a_w.to(grid.device, dtype))


def patch_scores_to_map(
    patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0
) -> torch.Tensor:
    """Upsample (B, h, w) patch scores to ``size`` (bilinear) and blur: (B, H, W) maps."""
    return upsample_blur(patch_scores.unsqueeze(1), size, sigma)[:, 0]


def maps_at_sizes(
    grid: torch.Tensor,
    processed: tuple[int, int],
    sizes: list[tuple[int, int]],
    sigma: float = 4.0,
) -> list[np.ndarray]:
    """Anomaly maps of a batch, each at its own output size.

    Args:
        grid: (B, 1, h, w) patch scores.
        processed: (H, W) the images were processed at: the map is upsampled and blurred there.
        sizes: B output sizes; a map whose size differs from ``processed`` is then resized
            bilinearly (an input's own size, or a display size).

    Returns:
        B float32 arrays, each of its output size.
    """
    up = upsample_blur(grid, processed, sigma)
    out = []
    for j, size in enumerate(sizes):
        m = up[j : j + 1]
        if tuple(size) != tuple(processed):
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(m[0, 0].cpu().numpy().astype(np.float32, copy=False))
    return out
