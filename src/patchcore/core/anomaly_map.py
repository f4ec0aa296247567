"""From patch scores to a per-pixel anomaly map: upsample, then Gaussian blur (sigma 4).

Both steps are linear and separable, so :func:`upsample_blur` applies them as two small matrix
products per map, ``A_h @ scores @ A_w.T``, with ``A`` (out x in) = blur @ upsample along one
axis (built once per shape, in float64). That gives the same map as bilinear upsampling followed
by :func:`gaussian_blur` (to float32 rounding) at a fraction of the cost: the 33-tap blur of a
224x224 map took ~1.6 ms as two convolutions, the products take ~0.05 ms.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius 4 sigma (odd length)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders.

    Args:
        maps: (B, 1, H, W).

    Returns:
        (B, 1, H, W).
    """
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.dtype).to(maps.device)
    r = k.numel() // 2
    h, w = maps.shape[-2:]
    mode = "reflect" if min(h, w) > r else "replicate"
    x = F.pad(maps, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=mode)
    return F.conv2d(x, k.view(1, 1, -1, 1))


def patch_scores_to_map(
    patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0
) -> torch.Tensor:
    """Upsample patch scores to ``size`` (bilinear) and blur.

    Args:
        patch_scores: (B, h, w) patch-level scores.
        size: output (H, W) in pixels.

    Returns:
        (B, H, W) anomaly maps.
    """
    return upsample_blur(patch_scores.unsqueeze(1), size, sigma)[:, 0]


def _blur_mode(h: int, w: int, sigma: float) -> str:
    """The border mode :func:`gaussian_blur` uses for an (h, w) map."""
    r = max(1, int(math.ceil(4.0 * sigma)))
    return "reflect" if min(h, w) > r else "replicate"


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in: int, n_out: int, sigma: float, mode: str) -> torch.Tensor:
    """(n_out, n_in) float64: bilinear upsampling (align_corners=False), then the 1-D blur."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in signals of length n_in
    x = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)  # (n_in, 1, n_out)
    if sigma > 0:
        k = gaussian_kernel1d(sigma, torch.float64)
        r = k.numel() // 2
        x = F.conv1d(F.pad(x, (r, r), mode=mode), k.view(1, 1, -1))
    return x[:, 0].T.contiguous()


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
    (h, w), (H, W) = grid.shape[-2:], size
    mode = _blur_mode(H, W, sigma) if sigma > 0 else "none"
    dtype = grid.dtype if grid.dtype in (torch.float32, torch.float64) else torch.float32
    a_h = _axis_operator(h, H, float(sigma), mode).to(grid.device, dtype)
    a_w = _axis_operator(w, W, float(sigma), mode).to(grid.device, dtype)
    return torch.matmul(torch.matmul(a_h, grid.to(dtype)), a_w.T)


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
