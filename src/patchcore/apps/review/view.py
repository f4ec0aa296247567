"""What the page reads: the whole review as columns, one image in detail, a chosen threshold.

The page computes the metrics of a dragged threshold itself from these columns (see
``static/metrics.js``); the threshold methods are computed here, with
:func:`patchcore.core.metrics.anomaly_threshold` on the images the metrics count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from patchcore.apps.review.session import Item, ReviewSession
from patchcore.core import metrics
from patchcore.lean import record as rec
from patchcore.lean.regions import DEFAULT_MIN_AREA, Region

__all__ = ["choose_threshold", "counted", "detail", "model_info", "state", "start_threshold"]


def model_info(session: ReviewSession) -> dict[str, Any]:
    """The model's facts the page shows in its header and threshold panel."""
    det = session.det
    card = det.card()
    md = det.metadata_
    threshold = det.threshold_
    shown = rec.display_range(det.display_range_, threshold)
    return {
        "path": str(session.model_path),
        "digest": session.model_digest,
        "backbone": card["backbone"],
        "image_size": card.get("image_size"),
        "scale": card.get("scale"),
        "bank_size": card["bank_size"],
        "training_images": card["training_images"],
        "threshold": threshold,
        "threshold_method": det.threshold_method_,
        "calibration_data": md.get("calibration_data"),
        "region_threshold": det.region_threshold_,
        "display_range": list(shown) if shown is not None else None,
        "updates": len(det.updates_),
        "thresholds": det.threshold_history_,
        "marked_normal": [m.get("name") for m in md.get("review_marked_normal") or []],
    }


def counted(session: ReviewSession) -> list[tuple[Item, float]]:
    """The items the metrics count: scored (finite score), not marked as normal; with scores."""
    out = []
    excluded = session.excluded()
    for it in session.items:
        score = session.record(it).get("score")
        if score is None or not math.isfinite(score) or it.digest in excluded:
            continue
        out.append((it, float(score)))
    return out


def state(session: ReviewSession) -> dict[str, Any]:
    """The whole review as columns (one entry per image, in data order) plus the model, the
    job, the last update and the last comparison."""
    excluded = session.excluded()
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "name",
            "label",
            "type",
            "score",
            "verdict",
            "error",
            "mask",
            "excluded",
            "pending",
        )
    }
    for it in session.items:
        r = session.record(it)
        cols["name"].append(it.name)
        cols["label"].append(it.label)
        cols["type"].append(it.defect_type)
        cols["score"].append(r["score"])
        cols["verdict"].append(r["verdict"])
        cols["error"].append(r["error"])
        cols["mask"].append(it.mask is not None)
        cols["excluded"].append(it.digest in excluded)
        cols["pending"].append(it.digest is not None and it.digest not in session.entries)
    return {
        "model": model_info(session),
        "data": {"path": str(session.data_path), "count": len(session.items)},
        "items": cols,
        "job": session.job.as_dict(),
        "missing": session.missing(),
        "start_threshold": start_threshold(session),
        "last_update": session.last_update,
        "compare": session.compare,
    }


def start_threshold(session: ReviewSession) -> dict[str, Any] | None:
    """Where the page's threshold starts: the model's, else MaxF1 on these images."""
    t = session.det.threshold_
    if t is not None:
        return {"value": float(t), "method": session.det.threshold_method_ or "model"}
    try:
        return choose_threshold(session, "max_f1")
    except ValueError:
        return None


def choose_threshold(
    session: ReviewSession,
    method: str,
    max_fpr: float | None = None,
    max_fnr: float | None = None,
) -> dict[str, Any]:
    """A threshold chosen on the counted images (:func:`metrics.anomaly_threshold`).

    Raises:
        ValueError: unknown method, bad bound, one class only, or no feasible point.
    """
    rows = counted(session)
    labels = np.array([it.label for it, _ in rows], dtype=int)
    scores = np.array([s for _, s in rows], dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no scored image to choose a threshold on yet")
    t = metrics.anomaly_threshold(labels, scores, method, max_fpr=max_fpr, max_fnr=max_fnr)
    return {
        "value": float(t),
        "method": method,
        "max_fpr": max_fpr,
        "max_fnr": max_fnr,
        "n": int(labels.size),
    }


def _scaled(region: Region, sx: float, sy: float, size: tuple[int, int]) -> dict[str, Any]:
    """A region of a shrunk map in the image's own pixels (``size``: its (W, H))."""
    d = region.as_dict()
    d.update(
        x0=int(region.x0 * sx), y0=int(region.y0 * sy),
        x1=min(size[0], math.ceil(region.x1 * sx)), y1=min(size[1], math.ceil(region.y1 * sy)),
        area=int(round(region.area * sx * sy)),
        peak_x=int((region.peak_x + 0.5) * sx), peak_y=int((region.peak_y + 0.5) * sy),
    )  # fmt: skip
    return d


def detail(session: ReviewSession, index: int, threshold: float) -> dict[str, Any]:
    """One image as the viewer shows it at the page's ``threshold``: the record's fields with
    the verdict judged at it and the regions cut at the region threshold (the model's region
    threshold, else ``threshold``); the cached regions when ``threshold`` is the one scored at.

    Raises:
        IndexError: no such image.
        NonFiniteScoreError: a threshold that is not a finite number.
    """
    item = session.items[index]
    r = dict(session.record(item))
    t = rec.check_threshold(threshold)
    scored_at = r.get("threshold")
    out = {**r, "index": index, "label": item.label, "defect_type": item.defect_type}
    out.update(has_mask=item.mask is not None, excluded=item.digest in session.excluded())
    if r["verdict"] == rec.ERROR and r["score"] is None:
        return out
    out["verdict"] = rec.judge([r["score"]], t)[0]
    out["threshold"] = t
    if scored_at is not None and t == scored_at and r.get("regions") is not None:
        out["regions_from"] = "record"
        return out
    if t != scored_at:
        out["normalized_score"] = None  # the mapping belongs to the model's threshold
    small = session.small_map(item)
    if small is None or not r.get("width"):
        out["regions"] = None
        return out
    cut = session.det.region_threshold_
    cut = t if cut is None else float(cut)
    h, w = small.shape
    sx, sy = r["width"] / w, r["height"] / h
    area = max(1, round(DEFAULT_MIN_AREA / (sx * sy)))
    found = rec.verdict_regions(small, out["verdict"], cut, min_area=area)
    out["regions"] = [_scaled(g, sx, sy, (r["width"], r["height"])) for g in found]
    out["region_threshold"] = cut
    out["regions_from"] = "cached map"
    return out
