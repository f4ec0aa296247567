"""From patch scores to a per-pixel anomaly map: upsample, then Gaussian blur (sigma 4)."""

from __future__ import annotations

import math

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
    x = patch_scores.unsqueeze(1)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(x, sigma)[:, 0]
