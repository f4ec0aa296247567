"""Validation of :class:`~patchcore.detector.PatchCore`'s parameters (run by ``fit`` and
``load``): each error quotes the bad value and the accepted ones."""

from __future__ import annotations

from typing import Any

from .backbones import BACKBONE_DTYPES, get_spec
from .embedding import FEATURE_DTYPES
from .search import PRECISIONS

__all__ = ["SAMPLINGS", "validate_params"]

SAMPLINGS = ("greedy", "greedy_exact", "random")


def validate_params(self: Any) -> None:
    """Raise ``ValueError`` for the first invalid parameter of the estimator ``self``."""
    get_spec(self.backbone)
    if not (isinstance(self.coreset_ratio, (int, float)) and 0 < self.coreset_ratio <= 1):
        raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}")
    if self.max_bank_size is not None and int(self.max_bank_size) < 1:
        raise ValueError(f"max_bank_size must be >= 1 or None, got {self.max_bank_size!r}")
    if self.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(
            f"feature_dtype must be 'float16' or 'float32', got {self.feature_dtype!r}"
        )
    if self.backbone_dtype not in BACKBONE_DTYPES:
        raise ValueError(
            "backbone_dtype must be 'float32', 'bfloat16' or 'float16', got "
            f"{self.backbone_dtype!r}"
        )
    if self.projection_dim is not None and int(self.projection_dim) < 1:
        raise ValueError(f"projection_dim must be >= 1 or None, got {self.projection_dim!r}")
    if self.sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
    if self.search_precision not in ("auto", *PRECISIONS):
        raise ValueError(
            f"search_precision must be 'auto' or one of {PRECISIONS}, got {self.search_precision!r}"
        )
    if self.image_size is not None and self.scale is not None:
        raise ValueError("give image_size or scale, not both")
    if self.scale is not None and not (0 < self.scale <= 4):
        raise ValueError(f"scale must be in (0, 4], got {self.scale!r}")
    if self.image_size is not None:
        sizes = (self.image_size,) if isinstance(self.image_size, int) else tuple(self.image_size)
        if len(sizes) not in (1, 2) or any(int(s) < 32 for s in sizes):
            raise ValueError(
                f"image_size must be an int or (H, W), each >= 32, got {self.image_size!r}"
            )
    if int(self.num_neighbors) < 1:
        raise ValueError(f"num_neighbors must be >= 1, got {self.num_neighbors!r}")
    if int(self.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
    if self.sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {self.sigma!r}")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size!r}")
