"""One inspection record: what every surface says about one image, and the one rule that judges.

The library (:meth:`patchcore.PatchCore.inspect`), the CLI's table / JSON / CSV, the HTML
report, both services, the torch-free runtime and the Ray batch's Parquet rows are all made
from :class:`Inspection`, so they use the same field names and the same values:

=====================  ==========  =====================================================
field                  type        meaning
=====================  ==========  =====================================================
``image``              str         the input's name: its path or URI, an upload's file
                                   name, or ``"image #<index>"``
``index``              int         position in the call's inputs
``verdict``            str | None  ``"anomalous"``, ``"normal"`` or ``"error"``
                                   (:data:`VERDICTS`); None only where no threshold
                                   exists (a scores-only run)
``score``              float|None  the image score, higher = more anomalous; None on error
``normalized_score``   float|None  the score on [0, 1] with the threshold at 0.5 (a
                                   display mapping, not a probability)
``threshold``          float|None  the threshold the verdict was judged against
``width``, ``height``  int|None    the image's own size in pixels
``map_max``            float|None  the anomaly map's largest value (native-size map)
``map_max_x``,         int|None    where it is, in the image's own pixels (first in
``map_max_y``                      row-major order)
``regions``            list|None   the defect regions (:class:`~patchcore.lean.regions.
                                   Region`): at least one for an ``anomalous`` verdict,
                                   none for ``normal``; None without a map or on error
``region_threshold``   float|None  the anomaly-map value the regions were cut at
``error``              str|None    why there is no verdict (unreadable, non-finite)
``ood``                bool|None   the input is unlike the training images (size, aspect,
                                   colour, brightness, contrast, or all of its map high:
                                   :mod:`patchcore.lean.ood`); None without a profile
``ood_reason``         str|None    why, in one line; None when ``ood`` is not True
=====================  ==========  =====================================================

:data:`FIELDS` lists them once with their types; :func:`as_dict` (JSON), :func:`as_row`
(CSV: ``regions`` as JSON text) and :func:`arrow_schema` (Parquet) are derived from it.

The rule: :func:`judge` is the only place where a score becomes a verdict (``score >=
threshold`` is anomalous). A score that is not finite is an ``"error"`` verdict, never
``"normal"``; a threshold that is not a finite number refuses every verdict
(:class:`NonFiniteScoreError`). numpy only: the torch-free runtime imports it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from patchcore.lean import normalization, ood
from patchcore.lean.regions import DEFAULT_MIN_AREA, Region, label_regions

__all__ = [
    "ANOMALOUS",
    "ERROR",
    "FIELDS",
    "NORMAL",
    "VERDICTS",
    "Field",
    "Inspection",
    "NonFiniteScoreError",
    "arrow_schema",
    "as_dict",
    "as_row",
    "check_threshold",
    "display_range",
    "error_record",
    "inspection",
    "judge",
    "verdict_regions",
]

NORMAL, ANOMALOUS, ERROR = "normal", "anomalous", "error"
#: Every verdict word, on every surface.
VERDICTS = (NORMAL, ANOMALOUS, ERROR)

#: Heatmap colour range without a calibrated one: ``[lo x threshold, hi x threshold]``.
THRESHOLD_RANGE = (0.5, 1.25)


class NonFiniteScoreError(ValueError):
    """A score or threshold that is NaN or infinite where a verdict is needed. Never read as
    a verdict: ``NaN >= threshold`` would be "normal"."""


@dataclass(frozen=True)
class Field:
    """One field of :class:`Inspection`: its name, type tag and meaning.

    ``kind`` is one of ``"str"``, ``"int"``, ``"float"``, ``"bool"``, ``"regions"``.
    """

    name: str
    kind: str
    description: str


#: The record's fields in output order (the schema, written once).
FIELDS: tuple[Field, ...] = (
    Field("image", "str", "the input's name: path, URI, upload file name or 'image #<index>'"),
    Field("index", "int", "position in the call's inputs"),
    Field("verdict", "str", "anomalous | normal | error; null without a threshold"),
    Field("score", "float", "image score, higher = more anomalous; null on error"),
    Field("normalized_score", "float", "score on [0, 1], threshold at 0.5 (not a probability)"),
    Field("threshold", "float", "the threshold the verdict was judged against"),
    Field("width", "int", "the image's own width in pixels"),
    Field("height", "int", "the image's own height in pixels"),
    Field("map_max", "float", "largest anomaly-map value (map at the image's own size)"),
    Field("map_max_x", "int", "column of the map maximum, image pixels"),
    Field("map_max_y", "int", "row of the map maximum, image pixels"),
    Field("regions", "regions", "defect regions: boxes x0,y0,x1,y1 (x1,y1 exclusive), area, peak"),
    Field("region_threshold", "float", "anomaly-map value the regions were cut at"),
    Field("error", "str", "why there is no verdict; null otherwise"),
    Field("ood", "bool", "input unlike the training images (another part, camera, scale?)"),
    Field("ood_reason", "str", "why the input looks unlike the training images, one line"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)


@dataclass(frozen=True)
class Inspection:
    """What one surface says about one image (see the module docstring for every field).

    ``anomaly_map`` (float32 HxW at the image's own size, or None) travels with the record in
    memory but is not one of its output fields.
    """

    image: str
    index: int
    verdict: str | None
    score: float | None
    normalized_score: float | None
    threshold: float | None
    width: int | None = None
    height: int | None = None
    map_max: float | None = None
    map_max_x: int | None = None
    map_max_y: int | None = None
    regions: tuple[Region, ...] | None = None
    region_threshold: float | None = None
    error: str | None = None
    ood: bool | None = None
    ood_reason: str | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def anomalous(self) -> bool:
        """``verdict == "anomalous"``."""
        return self.verdict == ANOMALOUS

    def without_map(self) -> Inspection:
        """The same record without its anomaly map (to keep many in memory)."""
        return replace(self, anomaly_map=None)


def check_threshold(threshold: Any, what: str = "threshold") -> float | None:
    """``threshold`` as a finite float, or None when None.

    Raises:
        NonFiniteScoreError: NaN, infinite, a bool or not a number (a string "1e9" too).
    """
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise NonFiniteScoreError(f"{what} must be a finite number, got {threshold!r}")
    t = float(threshold)
    if not math.isfinite(t):
        raise NonFiniteScoreError(f"{what} is {t!r}, so no score can be judged")
    return t


def judge(scores: Any, threshold: Any) -> np.ndarray:
    """The verdict rule, the only one: ``score >= threshold`` is anomalous.

    Args:
        scores: (N,) raw scores (any array-like; None counts as not finite).
        threshold: the verdict threshold; None gives no verdict (None everywhere).

    Returns:
        (N,) object array of :data:`VERDICTS` words: ``"error"`` where a score is NaN,
        infinite or None; all None when ``threshold`` is None.

    Raises:
        NonFiniteScoreError: a threshold that is not a finite number.
    """
    t = check_threshold(threshold)
    s = np.array([np.nan if v is None else v for v in np.ravel(scores)], dtype=np.float64)
    if t is None:
        return np.full(s.shape, None, dtype=object)
    out = np.where(s >= t, ANOMALOUS, NORMAL).astype(object)
    out[~np.isfinite(s)] = ERROR
    return out


def display_range(
    stored: Sequence[float] | None, threshold: float | None
) -> tuple[float, float] | None:
    """The heatmap colour range: map values drawn as the coldest / hottest colour.

    The stored range (chosen at calibration over the calibration maps) when there is one;
    else :data:`THRESHOLD_RANGE` times a positive threshold; else None (each map its own).
    """
    if stored is not None:
        lo, hi = (float(v) for v in stored)
        if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
            return lo, hi
    if threshold is not None and math.isfinite(threshold) and threshold > 0:
        return THRESHOLD_RANGE[0] * threshold, THRESHOLD_RANGE[1] * threshold
    return None


def verdict_regions(
    anomaly_map: np.ndarray, verdict: str | None, cut: float, min_area: int = DEFAULT_MIN_AREA
) -> tuple[Region, ...]:
    """The regions a record shows: none for a normal verdict; for an anomalous one (or when
    there is no verdict) the regions of ``anomaly_map >= cut`` of at least ``min_area``
    pixels, and an anomalous image always shows at least its peak's region: when no region
    passes the cut, the map is cut at its ``min_area``-th largest value instead (so the peak
    region covers about ``min_area`` pixels).
    """
    if verdict == NORMAL:
        return ()
    found = label_regions(anomaly_map, cut, min_area=min_area)
    if found or verdict != ANOMALOUS:
        return tuple(found)
    flat = np.ravel(anomaly_map)
    n = min(int(min_area), flat.size)
    lower = float(np.partition(flat, flat.size - n)[flat.size - n])
    found = label_regions(anomaly_map, min(cut, lower), min_area=min_area)
    return tuple(found or label_regions(anomaly_map, min(cut, lower), min_area=1)[:1])


def inspection(
    image: str,
    index: int,
    score: float,
    *,
    threshold: float | None,
    normalization_map: Mapping[str, Any] | None = None,
    anomaly_map: np.ndarray | None = None,
    size: tuple[int, int] | None = None,
    region_cut: float | None = None,
    min_area: int = DEFAULT_MIN_AREA,
    profile: Mapping[str, Any] | None = None,
    pixel_stats: Sequence[float] | None = None,
) -> Inspection:
    """The record of one scored image.

    Args:
        image, index: the input's name and position.
        score: its raw image score.
        threshold: the verdict threshold (None: no verdict); checked by :func:`judge`.
        normalization_map: the score mapping of :mod:`patchcore.lean.normalization`.
        anomaly_map: float HxW at the image's own size, or None.
        size: the image's own (H, W) when there is no map.
        region_cut: the anomaly-map value regions are cut at (None: no regions).
        min_area: smallest region kept, in pixels.
        profile: the model's profile of its training inputs (:mod:`patchcore.lean.ood`):
            the out-of-distribution hint is judged on it (None: no hint).
        pixel_stats: the input's :func:`patchcore.lean.ood.pixel_stats`, when known.

    A score or map that is not finite gives an ``"error"`` record (no verdict, no regions).
    """
    verdict = judge([score], threshold)[0]
    t = check_threshold(threshold)
    if verdict == ERROR or (anomaly_map is not None and not np.isfinite(anomaly_map).all()):
        why = f"scored {score!r}" if verdict == ERROR else "its anomaly map holds NaN/inf"
        return error_record(
            image,
            index,
            f"{why}: no verdict (the model holds non-finite values or overflowed)",
            threshold=t,
            size=size if anomaly_map is None else anomaly_map.shape,
        )
    norm = None
    if normalization_map is not None:
        norm = float(normalization.normalize(score, normalization_map))
    rec: dict[str, Any] = {}
    if anomaly_map is not None:
        flat = int(np.argmax(anomaly_map))
        y, x = divmod(flat, anomaly_map.shape[1])
        size = anomaly_map.shape
        rec = dict(map_max=float(anomaly_map.flat[flat]), map_max_x=int(x), map_max_y=int(y))
        if region_cut is not None:
            cut = check_threshold(region_cut, "region threshold")
            rec["regions"] = verdict_regions(anomaly_map, verdict, cut, min_area)
            rec["region_threshold"] = cut
    rec["ood"], rec["ood_reason"] = ood.check(
        profile,
        size=size,
        stats=pixel_stats,
        anomaly_map=anomaly_map,
    )
    return Inspection(
        image=image,
        index=int(index),
        verdict=verdict,
        score=float(score),
        normalized_score=norm,
        threshold=t,
        width=None if size is None else int(size[1]),
        height=None if size is None else int(size[0]),
        anomaly_map=anomaly_map,
        **rec,
    )


def error_record(
    image: str,
    index: int,
    error: str,
    *,
    threshold: float | None = None,
    size: Sequence[int] | None = None,
) -> Inspection:
    """The record of an input that has no verdict: unreadable, refused, or non-finite."""
    return Inspection(
        image=image,
        index=int(index),
        verdict=ERROR,
        score=None,
        normalized_score=None,
        threshold=threshold,
        width=None if size is None else int(size[1]),
        height=None if size is None else int(size[0]),
        error=str(error),
    )


def as_dict(record: Inspection) -> dict[str, Any]:
    """The record's :data:`FIELDS` as plain JSON-able values (``regions``: a list of dicts)."""
    out = {name: getattr(record, name) for name in FIELD_NAMES}
    if record.regions is not None:
        out["regions"] = [r.as_dict() for r in record.regions]
    return out


def as_row(record: Inspection) -> dict[str, Any]:
    """The record as a flat row (CSV): ``regions`` as JSON text, None as an empty string."""
    d = as_dict(record)
    if d["regions"] is not None:
        d["regions"] = json.dumps(d["regions"], separators=(",", ":"))
    return {k: "" if v is None else v for k, v in d.items()}


def arrow_schema(extra: Sequence[tuple[str, Any]] = ()) -> Any:
    """The ``pyarrow.Schema`` of records (Parquet), then ``extra`` (name, pyarrow type)
    columns. ``regions`` is a list of structs with the :class:`Region` fields."""
    import pyarrow as pa

    region = pa.struct(
        [
            (name, pa.float64() if name in ("peak", "mean") else pa.int64())
            for name in Region.__dataclass_fields__
        ]
    )
    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    columns = [(f.name, pa.list_(region) if f.kind == "regions" else types[f.kind]) for f in FIELDS]
    return pa.schema([*columns, *extra])
