"""The one route of inputs into a scorer: listing, decoding, limits, resizing and batching.

numpy only (no torch): the torch path (:mod:`patchcore.core.inputs`, a thin adapter that turns
each batch into a tensor without a copy) and the torch-free runtime read their images through
:func:`iter_batches`, so both list, name, limit, batch and skip inputs the same way.

- :func:`as_list`: every accepted form of input as a list of single images: one path, PIL image
  or array (anything with ``ndim <= 3``, a torch tensor too); a sequence of them; a stacked
  ``(N, ...)`` array; an object whose ``images`` attribute is a list (an
  :class:`~patchcore.core.datasets.ImageDataset`); any other iterable.
- :func:`iter_batches`: decodes each input with a pluggable ``decode`` (files in
  :data:`DECODE_THREADS` threads with bounded look-ahead, in-memory inputs inline), checks the
  input limits (:func:`patchcore.lean.pixels.input_limits`), resizes to the processed size with a
  pluggable ``resize``, groups consecutive same-size images into ``(B, 3, H, W)`` float32
  batches (with ``window``: same-size images within that many inputs of each other, in size
  buckets, so sets of mixed sizes still run batched), and reports each unreadable input as a
  :class:`Skipped` record in the batch whose index range it falls in (with ``window``: in the
  next batch emitted), so a consumer can emit results in input order.
- ``on_error``: ``"raise"`` stops at the first unreadable input (an
  :class:`~patchcore.lean.pixels.ImageReadError` naming it); ``"skip"`` makes it a
  :class:`Skipped` record and carries on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from patchcore.lean.memory import keep_freed_memory
from patchcore.lean.pixels import (
    ImageReadError,
    InputLimits,
    input_limits,
    pil_to_array,
    read_image,
    resize_array,
    to_chw,
)
from patchcore.lean.util import bounded_map, check_on_error

__all__ = [
    "DECODE_THREADS",
    "ON_ERROR",
    "Batch",
    "Reorder",
    "Skipped",
    "as_list",
    "check_on_error",
    "decode_input",
    "input_name",
    "iter_batches",
    "warn_skipped",
]

ON_ERROR = ("raise", "skip")
DECODE_THREADS = 2  # file decoding workers; more did not help on the 2-4 core machines measured
LOOKAHEAD_BATCHES = 4  # decoded batches in flight ahead of the consumer (bounded memory)

Decode = Callable[[Any], np.ndarray]
"""One input -> float32 ``(3, H, W)`` in [0, 1] at its own size (raises ImageReadError,
TypeError or ValueError when it cannot be read)."""
Resize = Callable[[np.ndarray, tuple[int, int]], np.ndarray]
"""float32 ``(3, H, W)`` and a target ``(H', W')`` -> float32 ``(3, H', W')``."""


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
        pixels: (B, 3, H, W) float32 in [0, 1] at the processed size (a numpy array here; the
            torch adapter makes it a tensor sharing its memory); ``None`` when the batch holds
            only unreadable inputs.
        sizes: each decoded input's own (H, W).
        names: each decoded input's name (:func:`input_name`).
        skipped: the unreadable inputs met while this batch was filled (after the previous
            batch's images, before the next one's), so results can be emitted in input order.
    """

    indices: list[int] = field(default_factory=list)
    pixels: Any = None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return True
    ndim = getattr(images, "ndim", None)  # numpy arrays and torch tensors alike
    return isinstance(ndim, int) and ndim <= 3


def as_list(images: Any) -> list[Any]:
    """Every accepted form of input as a list of single images (see the module docstring)."""
    if _is_single(images):
        return [images]
    listed = getattr(images, "images", None)  # a data set's images, in order
    if isinstance(listed, (list, tuple)):
        return list(listed)
    return list(images)  # a sequence, an iterable, or a stacked (N, ...) batch


def input_name(image: Any, index: int) -> str:
    """How an input is named in messages and records: its path, or ``"image #<index>"``."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image #{index}"


def decode_input(image: Any) -> np.ndarray:
    """A path, PIL image or numpy array -> float32 ``(3, H, W)`` in [0, 1] (the default
    ``decode`` of :func:`iter_batches`; :func:`patchcore.lean.pixels.to_chw` rules)."""
    if isinstance(image, (str, os.PathLike)):
        return to_chw(read_image(image), str(image))
    if isinstance(image, Image.Image):
        return to_chw(pil_to_array(image))
    if isinstance(image, np.ndarray):
        return to_chw(image)
    raise TypeError(
        f"unsupported input type {type(image).__name__}; give a path, PIL image or numpy array"
    )


def _named(exc: Exception, name: str) -> ImageReadError:
    """``exc`` as an ImageReadError (of the same class, when it is one) named ``name``."""
    if isinstance(exc, ImageReadError):
        return exc if exc.path == name else type(exc)(name, exc.problem)
    return ImageReadError(name, str(exc))


def iter_batches(
    items: list[Any],
    *,
    batch_size: int,
    target_size: Callable[[int, int], tuple[int, int]],
    decode: Decode = decode_input,
    resize: Resize = resize_array,
    on_error: str = "raise",
    limits: InputLimits | None = None,
    progress: Callable[[int], Any] | None = None,
    window: int = 0,
) -> Iterator[Batch]:
    """Decode, limit, resize and group ``items`` into same-size batches of at most
    ``batch_size``.

    Args:
        items: single images (see :func:`as_list`).
        batch_size: images per batch.
        target_size: an input's own (H, W) -> the (H, W) it is processed at. It may refuse an
            input by raising ``ValueError`` (an ``ImageReadError`` keeps its class and problem
            and is named after the input).
        decode: one input -> float32 (3, H, W) in [0, 1] (default :func:`decode_input`: path,
            PIL image or array; the torch path passes one that accepts tensors too).
        resize: (3, H, W) and a target size -> (3, H', W'), called only when the size changes
            (default :func:`patchcore.lean.pixels.resize_array`; the torch path passes torch's
            antialiased ``F.interpolate``).
        on_error: ``"raise"`` raises :class:`ImageReadError` at the first unreadable input;
            ``"skip"`` reports it in a batch's ``skipped``.
        limits: the :class:`~patchcore.lean.pixels.InputLimits` (``None``: the process-wide
            :func:`~patchcore.lean.pixels.input_limits` at call time). The processed size is
            checked against ``max_processed_pixels`` before the resize.
        progress: called with 1 after each input (a progress bar's ``update``).
        window: 0 (default) groups consecutive same-size inputs only. A positive ``window``
            groups inputs by processed size in buckets: a bucket is emitted when it holds
            ``batch_size`` inputs, or when its oldest input is ``window`` inputs behind the
            newest one read (so at most about ``window + batch_size`` decoded images wait).
            Batches then come out of input order (each batch's ``indices`` still ascend); a
            consumer restores the order (:class:`Reorder`).

    Yields:
        :class:`Batch` objects covering the inputs (in order when ``window`` is 0),
        ``pixels`` a C-contiguous numpy array. The last one may hold only ``skipped`` inputs.
    """
    check_on_error(on_error)
    keep_freed_memory()  # every batch reuses the memory of the one before
    bs = int(batch_size)
    chosen = limits

    def load(i: int) -> tuple[int, tuple[np.ndarray, tuple[int, int]] | ImageReadError]:
        # Resized in the worker: only processed-size images wait in the queue (decoded
        # full-size float32 images in flight were most of fit's peak memory at small sizes).
        name = input_name(items[i], i)
        try:
            chw = decode(items[i])
            size = (int(chw.shape[1]), int(chw.shape[2]))
            lim = input_limits() if chosen is None else chosen
            if chosen is not None:  # the process-wide limits were checked while decoding
                lim.check(name, *size)
            target = tuple(int(v) for v in target_size(*size))
            lim.check_processed(name, *target)
        except (ImageReadError, TypeError, ValueError) as exc:
            return i, _named(exc, name)
        return i, (chw if target == size else resize(chw, target), size)  # type: ignore[arg-type]

    # Files are decoded in threads; in-memory images (and a single image) inline: the hand-off
    # to a worker thread cost ~2 ms per image at batch 1, more than the work.
    threaded = len(items) > 1 and any(isinstance(it, (str, os.PathLike)) for it in items)
    pool = ThreadPoolExecutor(max_workers=DECODE_THREADS) if threaded else None
    try:
        results = (
            bounded_map(pool, load, range(len(items)), LOOKAHEAD_BATCHES * bs)
            if pool is not None
            else map(load, range(len(items)))
        )
        decoded = _decoded(results, items, on_error, progress)
        if window > 0:
            yield from _bucketed(decoded, items, bs, int(window))
        else:
            yield from _group(decoded, items, bs)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _decoded(
    results: Iterator[tuple[int, Any]],
    items: list[Any],
    on_error: str,
    progress: Callable[[int], Any] | None,
) -> Iterator[tuple[int, Any]]:
    """``(index, (chw, size))`` per readable input, ``(index, Skipped)`` per unreadable one
    (``on_error="raise"``: its ImageReadError instead), ticking ``progress`` per input."""
    for i, result in results:
        if progress is not None:
            progress(1)
        if isinstance(result, ImageReadError):
            if on_error == "raise":
                raise result
            yield i, Skipped(i, input_name(items[i], i), result.problem)
        else:
            yield i, result


def _group(decoded: Iterator[tuple[int, Any]], items: list[Any], bs: int) -> Iterator[Batch]:
    """Consecutive same-size decoded inputs as batches; unreadable ones as Skipped records."""
    batch = Batch()
    pending: list[np.ndarray] = []
    for i, result in decoded:
        if isinstance(result, Skipped):
            batch.skipped.append(result)
            continue
        chw, size = result
        if pending and (pending[0].shape != chw.shape or len(pending) >= bs):
            batch.pixels = np.stack(pending)
            yield batch
            batch, pending = Batch(), []
        pending.append(chw)
        batch.indices.append(i)
        batch.sizes.append(size)
        batch.names.append(input_name(items[i], i))
    if pending or batch.skipped:
        batch.pixels = np.stack(pending) if pending else None
        yield batch


def _bucketed(
    decoded: Iterator[tuple[int, Any]], items: list[Any], bs: int, window: int
) -> Iterator[Batch]:
    """Decoded inputs grouped by processed shape within ``window`` inputs (see
    :func:`iter_batches`); unreadable ones ride on the next batch emitted."""
    buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray, tuple[int, int]]]] = {}
    skipped: list[Skipped] = []

    def emit(shape: tuple[int, ...]) -> Batch:
        held = buckets.pop(shape)
        batch = Batch(
            indices=[i for i, _, _ in held],
            pixels=np.stack([chw for _, chw, _ in held]),
            sizes=[size for _, _, size in held],
            names=[input_name(items[i], i) for i, _, _ in held],
            skipped=skipped[:],
        )
        skipped.clear()
        return batch

    try:
        for i, result in decoded:
            if isinstance(result, Skipped):
                skipped.append(result)
            else:
                chw, size = result
                bucket = buckets.setdefault(chw.shape, [])
                bucket.append((i, chw, size))
                if len(bucket) >= bs:
                    yield emit(chw.shape)
            # buckets are kept in order of their oldest input: flush those held too long
            while buckets and next(iter(buckets.values()))[0][0] <= i - window:
                yield emit(next(iter(buckets)))
    except ImageReadError:  # on_error="raise": what came before it is still scored
        while buckets:
            yield emit(next(iter(buckets)))
        raise
    while buckets:
        yield emit(next(iter(buckets)))
    if skipped:
        yield Batch(skipped=skipped[:])


class Reorder:
    """Puts per-input results that arrive out of order (batches of :func:`iter_batches` with a
    ``window``) back in input order, releasing each as soon as all before it are in.

    ``add(index, item)`` files one; ``ready()`` yields the items now next in order.
    """

    def __init__(self) -> None:
        self.next = 0
        self._held: dict[int, Any] = {}

    def add(self, index: int, item: Any) -> None:
        self._held[index] = item

    def ready(self) -> Iterator[Any]:
        while self.next in self._held:
            yield self._held.pop(self.next)
            self.next += 1

    def __len__(self) -> int:
        return len(self._held)


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
