"""Normalised scores: a monotone map of raw anomaly scores onto [0, 1] with the threshold at 0.5.

This is a *mapping*, not a probability: 0.5 is the calibrated threshold, scores below it are
spread linearly over [0, 0.5) between the lowest calibration score and the threshold, scores above
it over (0.5, 1] between the threshold and the highest calibration score, and anything outside the
calibration range is clipped to 0 or 1. The order of scores, and so every verdict
(``raw >= threshold`` exactly when ``normalized >= 0.5``), is unchanged. anomalib uses the same
convention (threshold at 0.5, min-max around it); MATLAB offers a percentile normaliser instead.

numpy only: the torch-free runtime (:mod:`patchcore.lean.runtime`) imports it. The mapping is a
small
JSON-able dict stored with the model: ``{"kind": "piecewise_linear", "low": a, "threshold": t,
"high": b}`` with ``a < t < b``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["KIND", "check_mapping", "fit_normalization", "normalize"]

KIND = "piecewise_linear"


def fit_normalization(scores: Any, threshold: float) -> dict[str, Any]:
    """The mapping for ``threshold`` and the calibration ``scores`` it was chosen on.

    Args:
        scores: (N,) raw calibration scores (NaN entries, e.g. skipped images, are ignored), or
            ``None`` when the threshold was set by hand: then raw scores (distances, so >= 0)
            are mapped from [0, threshold] and [threshold, 2 x threshold].
        threshold: the verdict threshold; it maps to 0.5.

    Returns:
        ``{"kind", "low", "threshold", "high"}`` with ``low < threshold < high``. When every
        calibration score lies on one side of the threshold, the empty side mirrors the other.
    """
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if scores is None:
        low, high = min(0.0, t), max(2.0 * t, t)
    else:
        s = np.asarray(scores, dtype=np.float64).ravel()
        s = s[np.isfinite(s)]
        low = min(float(s.min()), t) if s.size else t
        high = max(float(s.max()), t) if s.size else t
    if low >= t and high <= t:
        low, high = t - max(abs(t), 1.0) * 0.5, t + max(abs(t), 1.0) * 0.5
    elif low >= t:
        low = t - (high - t)
    elif high <= t:
        high = t + (t - low)
    return {"kind": KIND, "low": low, "threshold": t, "high": high}


def check_mapping(mapping: Any) -> dict[str, Any]:
    """``mapping`` as a plain dict if it is a valid normalisation mapping, else ``ValueError``
    saying what is wrong (used when a model file or an export is read)."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"normalization must be a mapping, got {type(mapping).__name__}")
    if mapping.get("kind") != KIND:
        raise ValueError(f"normalization kind must be {KIND!r}, got {mapping.get('kind')!r}")
    try:
        low, t, high = (float(mapping[k]) for k in ("low", "threshold", "high"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"normalization needs numeric low, threshold, high: {e}") from None
    if not all(math.isfinite(v) for v in (low, t, high)) or not low < t < high:
        raise ValueError(
            f"normalization needs finite low < threshold < high, got {low!r}, {t!r}, {high!r}"
        )
    return {"kind": KIND, "low": low, "threshold": t, "high": high}


def normalize(raw: Any, mapping: Mapping[str, Any]) -> np.ndarray:
    """Map raw scores onto [0, 1] with ``mapping`` (from :func:`fit_normalization`).

    Args:
        raw: raw scores or maps, any shape.
    Returns:
        float64 array of the same shape; NaN stays NaN (it fails closed downstream).
    """
    m = check_mapping(mapping)
    low, t, high = m["low"], m["threshold"], m["high"]
    r = np.asarray(raw, dtype=np.float64)
    out = np.where(r < t, 0.5 * (r - low) / (t - low), 0.5 + 0.5 * (r - t) / (high - t))
    return np.clip(out, 0.0, 1.0)
