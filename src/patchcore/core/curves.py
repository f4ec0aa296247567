"""Shared pieces of :mod:`patchcore.core.metrics` and :mod:`patchcore.core.pixel_metrics`:
argument checks (labels, scores) and the curve machinery (cumulative counts at each distinct
score, the trapezoid area). Pure numpy."""

from __future__ import annotations

import numpy as np

__all__ = [
    "REGION_STRUCTURE",
    "as_binary",
    "as_scores",
    "descending_counts",
    "labels_and_scores",
    "ratio",
    "require_both_classes",
    "trapezoid",
]

#: 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
REGION_STRUCTURE = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def as_binary(name: str, values, ndim: int | None = 1) -> np.ndarray:
    """Return ``values`` as a bool array; accepts bool or numbers that are all 0 or 1."""
    arr = np.asarray(values)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean or 0/1 numbers, got dtype {arr.dtype}")
    bad = np.setdiff1d(np.unique(arr), [0, 1])
    if bad.size:
        shown = ", ".join(repr(v.item()) for v in bad[:5])
        raise ValueError(
            f"{name} must contain only 0/1 (or False/True, 1 = anomalous); found {shown}"
        )
    return arr.astype(bool)


def as_scores(name: str, values, ndim: int | None = 1) -> np.ndarray:
    """Return ``values`` as a finite floating array (float dtypes kept, others -> float64)."""
    arr = np.asarray(values)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")
    return arr


def labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = as_binary("labels", labels)
    s = as_scores("scores", scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    return y, s


def require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        present = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{what} needs both normal (0) and anomalous (1) samples, "
            f"but all {y.size} labels are {present}"
        )


# --------------------------------------------------------------------------------------------
# curve machinery shared by image and pixel level
# --------------------------------------------------------------------------------------------


def descending_counts(
    scores: np.ndarray, pos: np.ndarray, neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative positive / negative weight flagged at each distinct score, high to low.

    Args:
        scores: ``(n,)`` scores.
        pos: ``(n,)`` weight each sample adds to the positives when flagged (bool or float).
        neg: ``(n,)`` weight each sample adds to the negatives when flagged (bool or float).

    Returns:
        ``(neg_cum, pos_cum, thresholds)``, each ``(m,)`` for the ``m`` distinct scores in
        decreasing order; entry ``k`` is the total weight of samples with
        ``score >= thresholds[k]``.
    """
    order = np.argsort(scores, kind="mergesort")[::-1]
    s = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    acc = np.int64 if pos.dtype == bool else np.float64
    pos_cum = np.cumsum(pos[order], dtype=acc)[last_of_tie]
    acc = np.int64 if neg.dtype == bool else np.float64
    neg_cum = np.cumsum(neg[order], dtype=acc)[last_of_tie]
    return neg_cum, pos_cum, s[last_of_tie]


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under the polyline ``(x, y)`` (``x`` non-decreasing), optionally up to ``x_max``.

    When ``x_max`` falls inside a segment, ``y`` is linearly interpolated there.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x_max is not None:
        inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
        if inside < x.size and x[inside - 1] < x_max:
            x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
            y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            x = np.r_[x[:inside], x_max]
            y = np.r_[y[:inside], y_at]
        else:
            x, y = x[:inside], y[:inside]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def ratio(num: int, den: int) -> float:
    return float(num / den) if den else 0.0
