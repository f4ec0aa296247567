"""Model files as the workflow uses them: loading, the threshold check, the model card.

What a model was fitted and calibrated on is stored in ``PatchCore.metadata_`` (plain strings,
lists and numbers):

=====================  ======================================================================
``fit_data``           data spec of the training images
``train_names``        names of the images the memory bank was built from
``calibration_data``   data spec of the labelled images that were split
``calibration_names``  names of the calibration half (threshold chosen on these)
``test_names``         names of the held-out half (the only images ``evaluate`` scores)
``display_range``      ``[lo, hi]`` of the heatmap colours: ``[min, 0.7 * max]`` over the maps
                       of the calibration images, as in the reference example
=====================  ======================================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from patchcore.apps.workflow.data import WorkflowError
from patchcore.core.detector import PatchCore
from patchcore.lean import record
from patchcore.lean.util import package_version

#: Display range of the heatmap colours: [min, DISPLAY_TOP * max] over the calibration maps.
DISPLAY_TOP = 0.7


def load_model(path: str | os.PathLike, *, device: str | None = None) -> PatchCore:
    """Load a model file (errors name the file; see :meth:`PatchCore.load`).

    The workflow passes ``progress=False`` to every call it makes, so no bars are drawn.
    """
    return PatchCore.load(path, device=device)


def require_threshold(det: PatchCore, model_path: str | os.PathLike | None) -> float:
    """The model's threshold; :class:`WorkflowError` (with the command to run) without one."""
    if det.threshold_ is None:
        where = f"{model_path}: " if model_path is not None else ""
        hint = f"patchcore calibrate {model_path} DATA" if model_path else "calibrate"
        raise WorkflowError(f"{where}threshold not calibrated yet; run `{hint}` first")
    return float(det.threshold_)


def display_range(det: PatchCore) -> tuple[float, float] | None:
    """The heatmap colour range of ``det``'s pictures: :func:`patchcore.lean.record.
    display_range` of the range stored at calibration and the threshold."""
    return record.display_range(det.display_range_, det.threshold_)


def model_card(det: PatchCore, ms_per_image: float | None) -> dict[str, Any]:
    """The model's card for people: backbone, size, bank, threshold, split, timings."""
    card = det.card()
    md = det.metadata_
    size = card.get("image_size")
    if size is None:
        size = f"native, scaled by {card.get('scale'):g}" if card.get("scale") else "native"
    elif isinstance(size, (list, tuple)):
        size = f"{size[0]} x {size[1]}"
    else:
        size = f"{size} x {size}"
    out: dict[str, Any] = {
        "backbone": card["backbone"],
        "tapped layers": ", ".join(card["layers"]),
        "image size": size,
        "training images": card["training_images"],
        "training data": md.get("fit_data", ""),
        "memory bank": f"{card['bank_size']:,} rows x {card['feature_dim']} features",
        "coreset ratio": f"{card['coreset_ratio']:g} ({card['sampling']})",
        "image score": image_score_text(card["top_k"], card["num_neighbors"]),
        "threshold": card["threshold"],
        "threshold method": card["threshold_method"],
        "calibration": calibration_text(md, card.get("calibration")),
        "normalised score": normalization_text(card.get("normalization")),
        "heatmap display range": display_range_text(det),
        "fit time": f"{card['fit_seconds']:.1f} s",
    }
    if card.get("region_threshold") is not None:  # else regions are cut at the threshold
        out["region threshold"] = (
            f"{card['region_threshold']:.6g} ({card['region_threshold_method']})"
        )
    out["updates"] = updates_text(det.updates_)
    history = threshold_history(det)
    if history:
        out["thresholds"] = (
            f"{len(history)} (the history below; current: {entry_text(history[-1])})"
        )
    if ms_per_image is not None:
        out["scoring time"] = f"{ms_per_image:.1f} ms per image (with anomaly map)"
    out["seed"] = det.seed
    out["patchcore version"] = md.get("patchcore_version", package_version())
    return out


def threshold_history(det: PatchCore) -> list[dict[str, Any]]:
    """Every threshold the model has had, oldest first, the one in use last (each a dict:
    ``time`` (UTC), ``method``, ``value``, ``data``, ``seed``, ``images``, ``normal``,
    ``anomalous``, ``warnings``...). A model file from before the history existed gives one
    entry rebuilt from its stored split (no time); a model without a threshold, none."""
    recorded = list(getattr(det, "threshold_history_", None) or [])
    if recorded or det.threshold_ is None:
        return recorded
    md = det.metadata_
    names = md.get("calibration_names")
    return [
        {
            "time": None,
            "method": det.threshold_method_,
            "value": float(det.threshold_),
            "data": md.get("calibration_data"),
            "seed": md.get("calibration_seed"),
            "images": len(names) if names else None,
            "warnings": [],
        }
    ]


def entry_text(entry: dict[str, Any]) -> str:
    """One line on a threshold history entry: value, method, when, on what, warnings."""
    value = entry.get("value")
    text = f"{value:.6g}" if isinstance(value, (int, float)) else "none"
    text += f" ({entry.get('method') or '?'}"
    if entry.get("time"):
        text += f", {entry['time']}"
    if entry.get("data"):
        text += f", on {entry['data']}"
    if entry.get("images") is not None:
        text += f", {entry['images']} images"
    if entry.get("seed") is not None:
        text += f", split seed {entry['seed']}"
    warned = entry.get("warnings") or []
    return text + (f", {len(warned)} warning{'s' if len(warned) > 1 else ''})" if warned else ")")


def replaced_warning(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str | None:
    """The warning of a re-calibration: what the new threshold replaced and, when the data or
    split seed differ, that ``evaluate`` now scores another held-out split (None: nothing was
    replaced)."""
    if not old or old.get("value") is None:
        return None
    text = f"this calibration replaced the threshold {entry_text(old)}"
    new = new or {}
    moved = (old.get("data"), old.get("seed")) != (new.get("data"), new.get("seed"))
    if new.get("split") and moved:
        seed = "" if new.get("seed") is None else f" (split seed {new['seed']})"
        text += f"; evaluate now scores the held-out images of {new.get('data')}{seed}"
    return text + " (its entry stays in the threshold history: patchcore info)"


def split_entry(det: PatchCore) -> dict[str, Any] | None:
    """The history entry of the calibration that stored the held-out split ``evaluate`` uses
    (the last one that stored a split), or None when no recorded calibration did."""
    if not det.metadata_.get("test_names"):
        return None
    for entry in reversed(threshold_history(det)):
        if entry.get("split"):
            return entry
    return None


def image_score_text(top_k: int, num_neighbors: int) -> str:
    """How the model turns patch distances into an image score, in words."""
    if top_k > 1:
        return f"mean of the {top_k} largest patch distances"
    if num_neighbors > 1:
        return f"largest patch distance, reweighted by eq. 7 ({num_neighbors} neighbours)"
    return "largest patch distance"


def updates_text(updates: Sequence[dict[str, Any]]) -> str:
    """One line on the model's ``partial_fit`` records."""
    if not updates:
        return "none (fitted once)"
    last = updates[-1]
    images = sum(int(u.get("images", 0)) for u in updates)
    return (
        f"{len(updates)} ({images} images added in all; last {last.get('time', '?')}: "
        f"{last.get('images', '?')} images, +{last.get('rows_added', '?')} / "
        f"-{last.get('rows_dropped', '?')} bank rows)"
    )


def display_range_text(det: PatchCore) -> str:
    """One line on the heatmap colour range (:func:`display_range`) and where it comes from."""
    stored = det.display_range_
    shown = display_range(det)
    if shown is None:
        return "none (no threshold: each heatmap uses its own range)"
    lo, hi = shown
    if stored and (float(stored[0]), float(stored[1])) == shown:
        return f"[{lo:.4g}, {hi:.4g}] (min, 0.7 x max over the calibration maps)"
    low, high = record.THRESHOLD_RANGE
    return f"[{lo:.4g}, {hi:.4g}] ({low:g}-{high:g} x the threshold; none stored)"


def normalization_text(mapping: dict[str, Any] | None) -> str:
    """One line on the raw -> [0, 1] score mapping."""
    if not mapping:
        return "none (no threshold)"
    return (
        f"piecewise linear: {mapping['low']:.4g} -> 0, threshold {mapping['threshold']:.4g} -> "
        f"0.5, {mapping['high']:.4g} -> 1 (clipped; a mapping, not a probability)"
    )


def calibration_text(md: dict[str, Any], facts: dict[str, Any] | None = None) -> str:
    """One line on the stored calibration split (``facts``: the detector's ``calibration_``)."""
    if not md.get("calibration_names"):
        return "not stored"
    if md.get("calibration_method") == "conformal":
        f = facts or {}
        lo, hi = f.get("fpr_bounds") or (math.nan, math.nan)
        return (
            f"{len(md['calibration_names'])} held-out normal images of "
            f"{md.get('calibration_data', '?')} (conformal, false-alarm rate <= "
            f"{md.get('calibration_max_fpr', math.nan):g}: expected {lo:.4g}-{hi:.4g} on "
            f"exchangeable normals; rank {f.get('rank', '?')} of {f.get('n', '?')}); "
            f"{len(md.get('test_names', []))} labelled images held out"
        )
    bound = md.get("calibration_max_fpr")
    extra = f", max FPR {bound:g}" if bound is not None else ""
    return (
        f"{len(md['calibration_names'])} images of {md.get('calibration_data', '?')} "
        f"(fraction {md.get('calibration_fraction', 0):g}, seed {md.get('calibration_seed')}"
        f"{extra}); {len(md.get('test_names', []))} held out"
    )
