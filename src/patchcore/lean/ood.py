"""Out-of-distribution hints: is an input unlike everything the model was fitted on?

A PatchCore model only knows its normal training images. An input from another camera, another
product or another scale scores high for reasons that are not a defect, and its verdict
"anomalous" then means "wrong input", not "defect". Every inspection record carries a hint
(``ood``, ``ood_reason``; :mod:`patchcore.lean.record`) made here from a **profile** of the
training inputs, stored in the model at fit and carried by its export:

- **size**: each side within ``[min / SIZE_FACTOR, max x SIZE_FACTOR]`` of the training images'
  sides (a 1200 x 900 upscale of 300 px images, a 20 x 20 thumbnail);
- **aspect**: width / height within ``[min / ASPECT_FACTOR, max x ASPECT_FACTOR]``;
- **colour**: an input whose colourfulness (mean absolute difference of the channels from their
  mean) exceeds the training images' largest by more than ``COLOUR_MARGIN`` is a colour image
  on a model fitted on grey ones;
- **brightness**: the mean intensity within ``BRIGHTNESS_MARGIN`` of the training range;
- **contrast**: the intensity's standard deviation within ``[min / CONTRAST_FACTOR, max x
  CONTRAST_FACTOR]`` of the training images' (a black-and-white circuit board shown to a model
  of grey tiles; a defect, even a large one, changes it far less: benchmarks/RESULTS.md);
- **the anomaly map** (added to the profile at calibration, from the calibration's normal
  images): a defect changes a part of an image, another part or product changes all of it. The
  statistic is the map's ``MAP_QUANTILE`` quantile, the level of its best-looking tenth: a part
  with a defect, even one over most of its surface, keeps some normal area there; another part
  has none. The hint fires when it exceeds ``MAP_FACTOR`` times the largest of the normal
  calibration images' (chosen on the four real sets together, with the margins on each side:
  benchmarks/RESULTS.md, "Out-of-distribution hints"). A median (the first rule) fired on
  defective solar cells dark over most of their area.

Each check that fails adds a phrase; the reason is one line. Pixel statistics come from the
processed pixels (the size the model works at), sizes from the input's own size. numpy only:
the torch-free runtime imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ASPECT_FACTOR",
    "BRIGHTNESS_MARGIN",
    "COLOUR_MARGIN",
    "CONTRAST_FACTOR",
    "MAP_FACTOR",
    "MAP_QUANTILE",
    "PROFILE_VERSION",
    "SIZE_FACTOR",
    "check",
    "check_profile",
    "map_statistic",
    "merge",
    "pixel_stats",
    "profile",
    "with_map_reference",
]

PROFILE_VERSION = 1
#: Each side of an input within [min / SIZE_FACTOR, max x SIZE_FACTOR] of the training sides.
SIZE_FACTOR = 2.0
#: Width / height within [min / ASPECT_FACTOR, max x ASPECT_FACTOR] of the training aspects.
ASPECT_FACTOR = 1.3
#: Colourfulness above the training images' largest by more than this: a colour image.
COLOUR_MARGIN = 0.05
#: Mean intensity (0-1) outside the training images' range by more than this.
BRIGHTNESS_MARGIN = 0.3
#: Intensity std within [min / CONTRAST_FACTOR, max x CONTRAST_FACTOR] of the training images'.
CONTRAST_FACTOR = 1.5
#: The map statistic: this quantile of the map (its best-looking tenth's level).
MAP_QUANTILE = 0.1
#: Map statistic above this times the normal calibration images' largest.
MAP_FACTOR = 1.3
#: Rows per band of :func:`pixel_stats`.
_BAND_ROWS = 32


def pixel_stats(pixels: np.ndarray) -> np.ndarray:
    """Per image ``(mean intensity, intensity std, colourfulness)`` of (B, 3, H, W) or
    (3, H, W) pixels in [0, 1]: (B, 3) float64 (or (3,) for one image).

    Intensity is the mean of the three channels, colourfulness the mean absolute difference of
    the channels from it. Computed a band of :data:`_BAND_ROWS` rows at a time (the band stays
    in cache; sums in float64, the bands' variances merged), one pass over the pixels.
    """
    a = np.asarray(pixels, dtype=np.float32)
    single = a.ndim == 3
    a = a[None] if single else a
    b, _, h, w = a.shape
    out = np.zeros((b, 3))
    grey = np.empty((min(_BAND_ROWS, h), w), np.float32)
    diff = np.empty_like(grey)
    for i in range(b):
        count, mean, m2, colour = 0, 0.0, 0.0, 0.0
        for lo in range(0, h, _BAND_ROWS):
            band = a[i, :, lo : lo + _BAND_ROWS]
            g, t = grey[: band.shape[1]], diff[: band.shape[1]]
            np.add(band[0], band[1], out=g)
            np.add(g, band[2], out=g)
            g /= 3
            for c in range(3):
                np.subtract(band[c], g, out=t)
                colour += float(np.abs(t, out=t).sum(dtype=np.float64))
            # the band's mean and squared deviations, merged (Chan et al.): no cancellation
            n, m = g.size, float(g.mean(dtype=np.float64))
            np.subtract(g, np.float32(m), out=t)
            delta, count = m - mean, count + n
            mean += delta * n / count
            m2 += float(np.vdot(t, t)) + delta * delta * n * (count - n) / count
        out[i] = mean, math.sqrt(m2 / max(1, count)), colour / (3 * max(1, count))
    return out[0] if single else out


def _span(values: Any) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    return [float(v.min()), float(v.max())]


def profile(sizes: Sequence[Sequence[int]], stats: Any) -> dict[str, Any]:
    """The profile of training inputs: their own ``(H, W)`` sizes and :func:`pixel_stats`.

    Returns:
        a JSON-able dict: ``version``, ``images``, ``height``, ``width``, ``aspect`` (each
        ``[min, max]``), ``channels`` (``"grey"`` or ``"colour"``), ``colour`` (the largest
        colourfulness), ``mean`` and ``std`` (``[min, max]`` of the intensity statistics).
    """
    hw = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    st = np.asarray(stats, dtype=np.float64).reshape(-1, 3)
    if not len(hw) or len(hw) != len(st):
        raise ValueError(f"{len(hw)} sizes and {len(st)} pixel statistics: give one each")
    colour = float(st[:, 2].max())
    return {
        "version": PROFILE_VERSION,
        "images": int(len(hw)),
        "height": _span(hw[:, 0]),
        "width": _span(hw[:, 1]),
        "aspect": _span(hw[:, 1] / hw[:, 0]),
        "channels": "colour" if colour > COLOUR_MARGIN else "grey",
        "colour": colour,
        "mean": _span(st[:, 0]),
        "std": _span(st[:, 1]),
    }


def merge(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> dict[str, Any]:
    """The profile of two sets of training inputs together (``a`` None: ``b``); a map
    reference of ``a`` is kept."""
    if a is None:
        return dict(b)
    out = dict(a)
    for key in ("height", "width", "aspect", "mean", "std"):
        out[key] = [min(a[key][0], b[key][0]), max(a[key][1], b[key][1])]
    out["images"] = int(a["images"]) + int(b["images"])
    out["colour"] = max(float(a["colour"]), float(b["colour"]))
    out["channels"] = "colour" if out["colour"] > COLOUR_MARGIN else "grey"
    return out


def map_statistic(anomaly_map: np.ndarray) -> float:
    """The map's :data:`MAP_QUANTILE` quantile: about the normal level for a part with a defect
    (some of it stays normal), far above it for another part or product (none of it does)."""
    return float(np.quantile(np.asarray(anomaly_map), MAP_QUANTILE))


def with_map_reference(prof: Mapping[str, Any], normal_stats: Any) -> dict[str, Any]:
    """``prof`` with the map reference of a calibration: the :func:`map_statistic` of its
    normal images (``map_reference``: their largest; ``map_images``: how many). Non-finite
    values are ignored; without any, the reference is removed (so is an older profile's
    ``map_median``, a statistic this rule no longer uses)."""
    drop = ("map_reference", "map_images", "map_median")
    out = {k: v for k, v in prof.items() if k not in drop}
    m = np.asarray(normal_stats, dtype=np.float64).ravel()
    m = m[np.isfinite(m)]
    if m.size:
        out.update(map_reference=float(m.max()), map_images=int(m.size))
    return out


def check_profile(prof: Any) -> dict[str, Any] | None:
    """``prof`` if it is a profile this version reads, else None (an older or damaged one
    gives no hint rather than a wrong one)."""
    if not isinstance(prof, Mapping) or prof.get("version") != PROFILE_VERSION:
        return None
    try:
        for key in ("height", "width", "aspect", "mean", "std"):
            lo, hi = (float(v) for v in prof[key])
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                return None
        if not math.isfinite(float(prof["colour"])):
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return dict(prof)


def _outside(value: float, span: Sequence[float], factor: float) -> bool:
    return value < float(span[0]) / factor or value > float(span[1]) * factor


def _size_reasons(prof: Mapping[str, Any], size: Sequence[int]) -> list[str]:
    h, w = (int(v) for v in size)
    out = []
    if _outside(h, prof["height"], SIZE_FACTOR) or _outside(w, prof["width"], SIZE_FACTOR):
        lo = f"{prof['width'][0]:.0f}x{prof['height'][0]:.0f}"
        hi = f"{prof['width'][1]:.0f}x{prof['height'][1]:.0f}"
        span = lo if lo == hi else f"{lo} to {hi}"
        out.append(f"{w}x{h} px where the training images were {span}")
    elif _outside(w / h, prof["aspect"], ASPECT_FACTOR):
        a0, a1 = prof["aspect"]
        span = f"{a0:.2f}" if abs(a1 - a0) < 0.005 else f"{a0:.2f}-{a1:.2f}"
        out.append(f"aspect {w / h:.2f} where the training images had {span}")
    return out


def _pixel_reasons(prof: Mapping[str, Any], stats: Sequence[float]) -> list[str]:
    mean, std, colour = (float(v) for v in stats)
    out = []
    if colour > float(prof["colour"]) + COLOUR_MARGIN:
        out.append(f"a colour image where the training images were {prof.get('channels')}")
    lo, hi = prof["mean"]
    if mean < lo - BRIGHTNESS_MARGIN or mean > hi + BRIGHTNESS_MARGIN:
        out.append(f"brightness {mean:.2f} where the training images had {lo:.2f}-{hi:.2f}")
    if _outside(std, prof["std"], CONTRAST_FACTOR):
        lo, hi = prof["std"]
        out.append(f"contrast {std:.2f} where the training images had {lo:.2f}-{hi:.2f}")
    return out


def check(
    prof: Mapping[str, Any] | None,
    *,
    size: Sequence[int] | None = None,
    stats: Sequence[float] | None = None,
    map_stat: float | None = None,
    anomaly_map: np.ndarray | None = None,
) -> tuple[bool | None, str | None]:
    """The hint for one input: ``(ood, reason)``.

    Args:
        prof: the model's profile (:func:`profile`, with :func:`with_map_reference` after a
            calibration); None or unreadable: no hint.
        size: the input's own ``(H, W)``.
        stats: its :func:`pixel_stats`.
        map_stat: its :func:`map_statistic` (judged only with a map reference).
        anomaly_map: its map, when ``map_stat`` is not given: the statistic is computed only
            when the profile has a map reference (a quantile over the whole map costs a copy).

    Returns:
        ``(None, None)`` without a profile; ``(False, None)`` when the input looks like the
        training inputs; ``(True, "unlike the training images: ...")`` otherwise.
    """
    p = check_profile(prof)
    if p is None:
        return None, None
    reasons = []
    if size is not None and min(int(v) for v in size) > 0:
        reasons += _size_reasons(p, size)
    if stats is not None and all(math.isfinite(float(v)) for v in stats):
        reasons += _pixel_reasons(p, stats)
    ref = float(p.get("map_reference") or math.nan)
    if map_stat is None and anomaly_map is not None and ref > 0:
        map_stat = map_statistic(anomaly_map)
    if map_stat is not None and ref > 0 and map_stat > MAP_FACTOR * ref:  # NaN: no reference
        reasons.append(
            f"all of its anomaly map is high (its lowest tenth {map_stat / ref:.1f}x the "
            "normal images'): another part or product?"
        )
    if not reasons:
        return False, None
    return True, "unlike the training images: " + "; ".join(reasons)
