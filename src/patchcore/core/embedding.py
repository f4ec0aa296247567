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


FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
"""How training patch features can be held during fit (``PatchCore(feature_dtype=...)``)."""

_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class FeatureStore:
    """Collects patch features in ``dtype`` without a second full copy at the end.

    While every image yields the same number of patches (fixed ``image_size``), rows go into one
    buffer preallocated for all images; otherwise chunks are kept and concatenated once. A float16
    store that receives a value beyond float16's range converts itself to float32 (once; the
    rows already stored are exact in float32) and sets ``overflow``.
    """

    def __init__(self, n_images: int, dtype: torch.dtype = torch.float32) -> None:
        self.n_images = n_images
        self.dtype = dtype
        self.overflow = False
        self.buffer: torch.Tensor | None = None
        self.per_image: int | None = None
        self.chunks: list[torch.Tensor] = []
        self.rows = 0

    def _widen(self) -> None:
        """Switch a float16 store to float32 (a value would overflow float16)."""
        self.overflow = True
        self.dtype = torch.float32
        if self.buffer is not None:
            self.buffer = self.buffer.float()
        self.chunks = [c.float() for c in self.chunks]

    def add(self, rows: torch.Tensor, n_images: int) -> None:
        """Append ``rows`` (P, D), the patches of ``n_images`` images."""
        if self.dtype == torch.float16 and rows.numel() and float(rows.abs().amax()) > _FLOAT16_MAX:
            self._widen()
        rows = rows.to(self.dtype)
        per_image = rows.shape[0] // n_images
        if self.buffer is None and not self.chunks:
            self.per_image = per_image
            self.buffer = torch.empty(self.n_images * per_image, rows.shape[1], dtype=rows.dtype)
        if self.buffer is not None and per_image != self.per_image:  # sizes vary: fall back
            self.chunks = [self.buffer[: self.rows]]
            self.buffer = None
        if self.buffer is not None:
            self.buffer[self.rows : self.rows + rows.shape[0]] = rows
        else:
            self.chunks.append(rows)
        self.rows += rows.shape[0]

    def result(self) -> torch.Tensor:
        """All rows added, (P_total, D) in the store's dtype."""
        if self.buffer is not None:
            return self.buffer[: self.rows]
        return torch.cat(self.chunks)
