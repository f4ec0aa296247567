"""What a calibration learns about the anomaly maps, besides the image threshold.

Chosen once, on the calibration images' scores and maps, and stored in the fitted state:

- **the map scale** (:func:`map_scale`): the median over the calibration images of
  ``map_max / score`` (each image's anomaly-map maximum over its image score). The map and the
  score are made from the same patch distances (the map upsamples and blurs them, the score
  averages the ``top_k`` largest), so this ratio barely moves from image to image; it carries the
  image threshold onto the map's own scale. The default region cut is ``threshold x map
  scale`` (:meth:`patchcore.core.regions.RegionsMixin.region_cut`): an image scored at the
  threshold has its map maximum about at the cut, so flagged images show regions of their own
  and the record's peak-region rule (:func:`patchcore.lean.record.verdict_regions`) is rarely
  needed (benchmarks/RESULTS.md, "Region cut"). It needs no labels, so ``calibrate``,
  ``calibrate_normal`` and ``set_threshold(value, images=...)`` all set it, and a later
  ``set_threshold(value)`` without images keeps it (the cut follows the new threshold).
- **the map reference** of out-of-distribution hints (:func:`map_summary`): each calibration
  image's map statistic (:func:`patchcore.lean.ood.map_statistic`); the largest among the
  normal ones goes to the model's input
  profile (:func:`patchcore.lean.ood.with_map_reference`).
- **the display range** (:func:`display_range`): the heatmap colours' ``[lo, hi]``,
  ``[min, DISPLAY_TOP x max]`` over the calibration maps, stored as
  ``PatchCore.display_range_``; every surface draws with the one rule
  ``patchcore.lean.record.display_range(det.display_range_, det.threshold_)`` (the stored
  range, else the threshold's fallback).

Every threshold installed is also recorded (:func:`history_entry`): the model keeps its
threshold history, oldest first.

numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np

from patchcore.lean import ood

__all__ = [
    "DISPLAY_TOP",
    "MapFacts",
    "display_range",
    "extremes_of",
    "history_entry",
    "map_facts",
    "map_summary",
    "map_scale",
]

#: The top of the heatmap colour range: DISPLAY_TOP x the largest calibration map value.
DISPLAY_TOP = 0.7

MapFacts = tuple[float | None, tuple[float, float] | None]
"""``(map scale, display range)``; None where the calibration images give none."""


def _usable(scores: np.ndarray, extremes: np.ndarray) -> np.ndarray:
    return np.isfinite(scores) & (scores > 0) & np.isfinite(extremes).all(axis=1)


def map_scale(scores: Any, extremes: Any) -> float | None:
    """Median of ``map_max / score`` over the images with a finite, positive score and a map.

    Args:
        scores: (N,) image scores.
        extremes: (N, 2) each image's anomaly-map minimum and maximum.
    """
    s, e = np.asarray(scores, dtype=np.float64), np.asarray(extremes, dtype=np.float64)
    ok = _usable(s, e)
    return float(np.median(e[ok, 1] / s[ok])) if ok.any() else None


def display_range(extremes: Any) -> tuple[float, float] | None:
    """``[min, DISPLAY_TOP x max]`` over the maps (``max`` itself when that is not above
    ``min``), or None without a finite map."""
    e = np.asarray(extremes, dtype=np.float64).reshape(-1, 2)
    e = e[np.isfinite(e).all(axis=1)]
    if not len(e):
        return None
    lo, hi = float(e[:, 0].min()), float(e[:, 1].max())
    top = DISPLAY_TOP * hi
    return (lo, top if top > lo else hi)


def map_facts(scores: Any, extremes: Any) -> MapFacts:
    """``(map_scale(...), display_range(...))`` of one calibration pass."""
    return map_scale(scores, extremes), display_range(extremes)


def extremes_of(maps: Any) -> np.ndarray:
    """(N, 2) float64 minimum and maximum of each map (NaN for a missing map)."""
    out = np.full((len(maps), 2), np.nan)
    for i, m in enumerate(maps):
        if m is not None:
            out[i] = (float(np.min(m)), float(np.max(m)))
    return out


def map_summary(anomaly_map: Any) -> tuple[float, float, float]:
    """``(min, max, statistic)`` of one calibration map: its extremes (:func:`extremes_of`)
    and its :func:`patchcore.lean.ood.map_statistic` (the map reference of
    out-of-distribution hints)."""
    m = np.asarray(anomaly_map)
    return float(m.min()), float(m.max()), ood.map_statistic(m)


def _plain(value: Any) -> Any:
    """``value`` as JSON-able plain data (numbers, strings, lists, dicts; others as text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def history_entry(
    method: str,
    value: float,
    calibration: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of the threshold history: UTC time, method, value, the number of images it
    was chosen on (normal, anomalous), the bound asked, then the caller's ``context`` (e.g.
    ``data``, ``seed``, ``fraction``, ``split``, ``warnings``); ``warnings`` is always a list.
    """
    facts = dict(calibration or {})
    normal, anomalous = facts.get("n_normal"), facts.get("n_anomalous")
    if normal is None and facts.get("n") is not None:  # conformal: normal images only
        normal, anomalous = facts["n"], 0
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": method,
        "value": float(value),
        "images": None if normal is None else int(normal) + int(anomalous or 0),
        "normal": normal,
        "anomalous": anomalous,
        "max_fpr": facts.get("max_fpr"),
    }
    entry.update(_plain(dict(context or {})))
    entry["warnings"] = [str(w) for w in entry.get("warnings") or []]
    return entry
