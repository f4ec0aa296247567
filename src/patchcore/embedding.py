"""Patch embedding: local neighbourhood averaging, alignment of layers, concatenation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_average(features: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Average each feature over its ``kernel_size`` x ``kernel_size`` neighbourhood.

    Args:
        features: (B, C, H, W).

    Returns:
        (B, C, H, W), same size (stride 1, zero padding counted like the paper's code).
    """
    if kernel_size <= 1:
        return features
    return F.avg_pool2d(features, kernel_size, stride=1, padding=kernel_size // 2)


def reduce_channels(features: torch.Tensor, dim: int) -> torch.Tensor:
    """Shrink the channel axis to ``dim`` by adaptive averaging over neighbouring channels.

    Args:
        features: (B, C, H, W) with C >= dim.

    Returns:
        (B, dim, H, W).
    """
    b, c, h, w = features.shape
    if dim >= c:
        return features
    x = features.permute(0, 2, 3, 1).reshape(-1, 1, c)
    x = F.adaptive_avg_pool1d(x, dim)
    return x.reshape(b, h, w, dim).permute(0, 3, 1, 2)


def embed(
    features: dict[str, torch.Tensor] | list[torch.Tensor],
    *,
    kernel_size: int = 3,
    embed_dim: int | None = None,
) -> torch.Tensor:
    """Combine tapped layers into one patch embedding on the first (finest) layer's grid.

    Args:
        features: feature maps shallow to deep, each (B, C_l, H_l, W_l).
        kernel_size: neighbourhood of the local average.
        embed_dim: optional final dimension (channel-averaging projection).

    Returns:
        (B, D, H_0, W_0) with D = sum(C_l) or ``embed_dim``.
    """
    maps = list(features.values()) if isinstance(features, dict) else list(features)
    size = maps[0].shape[-2:]
    out = []
    for f in maps:
        f = local_average(f, kernel_size)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    emb = torch.cat(out, dim=1)
    if embed_dim is not None:
        emb = reduce_channels(emb, embed_dim)
    return emb


def flatten_patches(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D), rows ordered image by image, row-major within an image."""
    b, d, h, w = embedding.shape
    return embedding.permute(0, 2, 3, 1).reshape(b * h * w, d)
