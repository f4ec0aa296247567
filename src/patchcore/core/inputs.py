"""The route of inputs into the detector: listing, decoding, resizing and batching.

:func:`as_list` turns every accepted input (one path, PIL image, array or tensor; a sequence of
them; a stacked ``(N, ...)`` array or tensor; an :class:`~patchcore.core.datasets.ImageDataset`)
into a
list. :func:`iter_batches` decodes that list (files in two threads, with bounded lookahead),
resizes each image to the processed size, groups consecutive same-size images into batches and
reports unreadable inputs in the batch whose index range they fall in, so a consumer can emit
results in input order. Fitting and scoring both read their images through it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from patchcore.core.datasets import ImageDataset
from patchcore.core.images import ImageInput, ImageReadError, as_tensor, input_limits, resize
from patchcore.lean.util import bounded_map

__all__ = [
    "Batch",
    "Skipped",
    "as_list",
    "check_on_error",
    "input_name",
    "iter_batches",
    "warn_skipped",
]

ON_ERROR = ("raise", "skip")
DECODE_THREADS = 2  # file decoding workers; more did not help on the 2-4 core machines measured


class Skipped(NamedTuple):
    """An input left out because it could not be read: its position, name and the problem."""

    index: int
    name: str
    reason: str


@dataclass
class Batch:
    """Consecutive inputs of one processed size, plus the unreadable ones among them.

    Attributes:
        indices: input positions of the decoded images, ascending.
        pixels: (B, 3, H, W) float32 in [0, 1] at the processed size; ``None`` when the batch
            holds only unreadable inputs.
        sizes: each decoded input's own (H, W).
        names: each decoded input's name (its path, or ``"image #i"``).
        skipped: the unreadable inputs met while this batch was filled (after the previous
            batch's images, before the next one's), so results can be emitted in input order.
    """

    indices: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def check_on_error(on_error: str) -> None:
    """Reject anything but ``"raise"`` or ``"skip"``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def as_list(images: Any) -> list[Any]:
    """Every accepted form of input as a list of single images (see the module docstring)."""
    if isinstance(images, ImageDataset):
        return list(images.images)
    if isinstance(images, (str, os.PathLike)) or (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3
    ):
        return [images]
    return list(images)  # a sequence, or a stacked (N, ...) batch


def input_name(image: Any, index: int) -> str:
    """How an input is named in messages: its path, or ``"image #<index>"``."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image #{index}"


def _decode(image: ImageInput, index: int) -> torch.Tensor:
    try:
        return as_tensor(image)
    except ImageReadError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ImageReadError(input_name(image, index), str(exc)) from None


def iter_batches(
    items: list[Any],
    *,
    batch_size: int,
    target_size: Callable[[int, int], tuple[int, int]],
    on_error: str = "raise",
    progress: bool = False,
    desc: str = "images",
) -> Iterator[Batch]:
    """Decode, resize and group ``items`` into same-size batches of at most ``batch_size``.

    Args:
        items: single images (see :func:`as_list`).
        batch_size: images per batch.
        target_size: (H, W) of an input -> the (H, W) it is resized to; over
            ``images.input_limits().max_processed_pixels`` the input is unreadable
            (:class:`~patchcore.core.images.ImageTooLargeError`).
        on_error: ``"raise"`` raises :class:`ImageReadError` at the first unreadable input;
            ``"skip"`` reports it in a batch's ``skipped``.
        progress: show a progress bar (one step per input).
        desc: the progress bar's label.

    Yields:
        :class:`Batch` objects covering the inputs in order. The last one may hold only
        ``skipped`` inputs.
    """
    check_on_error(on_error)
    bs = int(batch_size)

    def load(i: int) -> tuple[int, tuple[torch.Tensor, tuple[int, int]] | ImageReadError]:
        # Resized in the worker: only processed-size images wait in the queue (decoded
        # full-size float32 images in flight were most of fit's peak memory at small sizes).
        try:
            t = _decode(items[i], i)
            size = (int(t.shape[1]), int(t.shape[2]))
            target = target_size(*size)
            input_limits().check_processed(input_name(items[i], i), *target)
        except ImageReadError as exc:
            return i, exc
        return i, (resize(t, target), size)

    # Files are decoded in threads; in-memory images (and a single image) inline: the hand-off
    # to a worker thread cost ~2 ms per image at batch 1, more than the work.
    threaded = len(items) > 1 and any(isinstance(it, (str, os.PathLike)) for it in items)
    pool = ThreadPoolExecutor(max_workers=DECODE_THREADS) if threaded else None
    bar = _progress(len(items), desc, progress)
    batch = Batch()
    pending: list[torch.Tensor] = []
    try:
        results = (
            bounded_map(pool, load, range(len(items)), 4 * bs)
            if pool is not None
            else map(load, range(len(items)))
        )
        for i, result in results:
            bar.update(1)
            if isinstance(result, ImageReadError):
                if on_error == "raise":
                    raise result
                batch.skipped.append(Skipped(i, input_name(items[i], i), result.problem))
                continue
            t, size = result
            if pending and (pending[0].shape != t.shape or len(pending) >= bs):
                batch.pixels = torch.stack(pending)
                yield batch
                batch, pending = Batch(), []
            pending.append(t)
            batch.indices.append(i)
            batch.sizes.append(size)
            batch.names.append(input_name(items[i], i))
        if pending or batch.skipped:
            batch.pixels = torch.stack(pending) if pending else None
            yield batch
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def warn_skipped(message: str, skipped: list[Skipped], stacklevel: int = 3) -> None:
    """The one warning about unreadable inputs; ``message`` has an ``{n}`` field."""
    if skipped:
        warnings.warn(
            message.format(n=len(skipped))
            + ": "
            + "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""),
            UserWarning,
            stacklevel=stacklevel,
        )


def _progress(total: int, desc: str, enabled: bool):  # noqa: ANN202
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)
