"""Small helpers shared by the application modules (one copy each).

Argument checks, the package version, one-line messages, display formatting, the resizing of
float maps and boolean masks, and a bounded thread-pool map. Nothing here knows about detectors
or data sets, and nothing imports torch (the torch-free runtime uses it).
"""

from __future__ import annotations

import json
import math
import numbers
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

#: What :func:`package_version` answers when the package metadata is missing (plain checkout).
UNKNOWN_VERSION = "0+unknown"


def package_version() -> str:
    """The installed ``patchcore`` version, or :data:`UNKNOWN_VERSION`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("patchcore")
    except PackageNotFoundError:
        return UNKNOWN_VERSION


def check_on_error(on_error: object, *, allow_none: bool = False) -> None:
    """Raise ValueError unless ``on_error`` is ``"raise"`` or ``"skip"`` (or None if allowed)."""
    if on_error not in ("raise", "skip") and not (allow_none and on_error is None):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def check_fraction(
    name: str, value: object, *, allow_one: bool = True, error: type[ValueError] = ValueError
) -> float:
    """``value`` as a float in (0, 1] (or (0, 1) with ``allow_one=False``), else ``error``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = 0.0 < v <= 1.0 if allow_one else 0.0 < v < 1.0
    if not ok:
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise error(f"{name} must be in {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` (or an exception) on one line, whitespace collapsed, at most ``limit`` chars.

    An exception without a message gives its type name.
    """
    flat = " ".join(str(text).split())
    if not flat and isinstance(text, BaseException):
        flat = type(text).__name__
    return flat[:limit] if limit is not None else flat


def fmt(value: object, digits: int = 4, missing: str = "n/a") -> str:
    """A value for display: floats to ``digits`` decimals (very large / small ones in ``g``
    notation), integers with thousands separators, bools as yes / no, None as ``missing``,
    NaN as n/a, containers as JSON."""
    if value is None:
        return missing
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "n/a"
        if math.isinf(number) or abs(number) >= 1e5 or (number != 0 and abs(number) < 1e-3):
            return f"{number:.4g}"
        return f"{number:.{digits}f}"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, Mapping | list | tuple):
        try:
            return json.dumps(value, default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def resize_map(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``shape`` (H, W); float32 (as is when it fits)."""
    height, width = shape
    if array.shape == (height, width):
        return array
    resized = Image.fromarray(array.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``shape`` (H, W)."""
    height, width = shape
    if mask.shape == (height, width):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (width, height), Image.Resampling.NEAREST
    )
    return np.asarray(resized) > 127


def bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[int], Any], items: Iterable[int], lookahead: int
) -> Iterator[Any]:
    """Like ``pool.map`` but keeps at most ``lookahead`` results in flight (bounded memory).

    Futures not yet consumed are cancelled when the consumer stops early.
    """
    queue: deque[Future] = deque()
    try:
        for x in items:
            queue.append(pool.submit(fn, x))
            if len(queue) >= lookahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:
        for f in queue:
            f.cancel()
