"""The torch adapter of the one input pipeline (:mod:`patchcore.lean.inputs`).

:func:`iter_batches` runs :func:`patchcore.lean.inputs.iter_batches` with the torch path's own
decoder (:func:`~patchcore.core.images.as_tensor`: tensors accepted besides paths, PIL images
and arrays) and resize (:func:`~patchcore.core.images.resize`, torch's antialiased
``F.interpolate``), draws the progress bar, and hands each batch's pixels on as a tensor that
shares the numpy batch's memory (``torch.from_numpy``, no copy). Listing, naming, limits,
batching and skipped records are the lean pipeline's. Fitting, scoring and explaining read their
images through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from patchcore.core.images import ImageInput, ImageReadError, as_tensor, resize
from patchcore.lean import inputs as lean_inputs
from patchcore.lean.inputs import (
    Batch,
    Reorder,
    Skipped,
    as_list,
    check_on_error,
    input_name,
    warn_skipped,
)

__all__ = [
    "TORCH_ROUTE",
    "Batch",
    "Reorder",
    "Skipped",
    "as_list",
    "check_on_error",
    "decode_tensor",
    "group_batches",
    "input_name",
    "iter_batches",
    "resize_tensor",
    "warn_skipped",
]


def decode_tensor(image: ImageInput) -> np.ndarray:
    """Any input of :func:`~patchcore.core.images.as_tensor` -> float32 (3, H, W) array (a view
    of the tensor's memory)."""
    try:
        return as_tensor(image).numpy()
    except RuntimeError as exc:  # torch's own errors on a strange tensor
        raise ImageReadError("image", str(exc)) from None


def resize_tensor(chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`~patchcore.core.images.resize` on an array (the torch path's resize: results are
    those of ``F.interpolate(..., antialias=True)``)."""
    return resize(torch.from_numpy(chw), size).numpy()


#: The torch path's plug-ins of the lean pipeline: its decoder and its resize.
TORCH_ROUTE = {"decode": decode_tensor, "resize": resize_tensor}


def iter_batches(
    items: list[Any],
    *,
    batch_size: int,
    target_size: Callable[[int, int], tuple[int, int]],
    on_error: str = "raise",
    progress: bool = False,
    desc: str = "images",
    window: int = 0,
) -> Iterator[Batch]:
    """:func:`patchcore.lean.inputs.iter_batches` for the torch path: ``pixels`` a (B, 3, H, W)
    float32 tensor.

    Args:
        items: single images (see :func:`as_list`).
        batch_size: images per batch.
        target_size: (H, W) of an input -> the (H, W) it is resized to; over
            ``input_limits().max_processed_pixels`` the input is unreadable
            (:class:`~patchcore.core.images.ImageTooLargeError`).
        on_error: ``"raise"`` raises :class:`ImageReadError` at the first unreadable input;
            ``"skip"`` reports it in a batch's ``skipped``.
        progress: show a progress bar (one step per input).
        desc: the progress bar's label.
        window: 0 = consecutive same-size inputs per batch; > 0 = size buckets within that
            many inputs, batches out of input order (see the lean :func:`iter_batches`).

    Yields:
        :class:`Batch` objects covering the inputs in order. The last one may hold only
        ``skipped`` inputs.
    """
    bar = _progress(len(items), desc, progress)
    try:
        batches = lean_inputs.iter_batches(
            items, batch_size=batch_size, target_size=target_size, on_error=on_error,
            progress=bar.update, window=window, **TORCH_ROUTE,
        )  # fmt: skip
        for batch in batches:
            if batch.pixels is not None:
                batch.pixels = torch.from_numpy(batch.pixels)
            yield batch
    finally:
        bar.close()


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def group_batches(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive batches, ``size`` images or more to a group: a full batch alone, batches of
    mixed sizes together (one search, and one backbone pass on shared canvases, for them all).
    Batches of skipped inputs only count no image."""
    group: list[Batch] = []
    images = 0
    for batch in batches:
        group.append(batch)
        images += len(batch.indices)
        if images >= size:
            yield group
            group, images = [], 0
    if group:
        yield group
