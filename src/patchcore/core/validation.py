"""Validation of :class:`~patchcore.core.detector.PatchCore`'s parameters (run by ``fit`` and
``load``): each error quotes the bad value and the accepted ones."""

from __future__ import annotations

from typing import Any

from patchcore.core import params
from patchcore.core.augment import views
from patchcore.core.backbones import BACKBONE_DTYPES, get_spec
from patchcore.core.embedding import FEATURE_DTYPES
from patchcore.core.search import PRECISIONS

__all__ = ["SAMPLINGS", "validate_params"]

SAMPLINGS = params.SAMPLINGS  # one definition, torch-free


def validate_params(det: Any) -> None:
    """Raise ``ValueError`` for the first invalid parameter of the estimator ``det``."""
    get_spec(det.backbone)
    views(det.augment)  # ValueError naming the known augmentations
    if not (isinstance(det.coreset_ratio, (int, float)) and 0 < det.coreset_ratio <= 1):
        raise ValueError(f"coreset_ratio must be in (0, 1], got {det.coreset_ratio!r}")
    if det.max_bank_size is not None and int(det.max_bank_size) < 1:
        raise ValueError(f"max_bank_size must be >= 1 or None, got {det.max_bank_size!r}")
    if det.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be 'float16' or 'float32', got {det.feature_dtype!r}")
    if det.backbone_dtype not in BACKBONE_DTYPES:
        raise ValueError(
            f"backbone_dtype must be 'float32', 'bfloat16' or 'float16', got {det.backbone_dtype!r}"
        )
    if det.projection_dim is not None and int(det.projection_dim) < 1:
        raise ValueError(f"projection_dim must be >= 1 or None, got {det.projection_dim!r}")
    if det.sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {det.sampling!r}")
    if det.search_precision not in ("auto", *PRECISIONS):
        raise ValueError(
            f"search_precision must be 'auto' or one of {PRECISIONS}, got {det.search_precision!r}"
        )
    if det.image_size is not None and det.scale is not None:
        raise ValueError("give image_size or scale, not both")
    if det.scale is not None and not (0 < det.scale <= 4):
        raise ValueError(f"scale must be in (0, 4], got {det.scale!r}")
    if det.image_size is not None:
        sizes = (det.image_size,) if isinstance(det.image_size, int) else tuple(det.image_size)
        if len(sizes) not in (1, 2) or any(int(s) < 32 for s in sizes):
            raise ValueError(
                f"image_size must be an int or (H, W), each >= 32, got {det.image_size!r}"
            )
    if int(det.num_neighbors) < 1:
        raise ValueError(f"num_neighbors must be >= 1, got {det.num_neighbors!r}")
    if isinstance(det.top_k, bool) or int(det.top_k) != det.top_k or det.top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {det.top_k!r}")
    if int(det.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {det.batch_size!r}")
    if det.sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {det.sigma!r}")
    if det.kernel_size < 1 or det.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {det.kernel_size!r}")
