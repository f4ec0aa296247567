"""Saving the page's threshold into the model file.

:func:`record_threshold` is the one place the review writes a threshold into a detector: the
value and method, the calibration facts and the score normalisation (through
:meth:`~patchcore.PatchCore.calibrate` on the cached scores for a named method, else
:meth:`~patchcore.PatchCore.set_threshold`), which record it in the model's one threshold
history (``threshold_history_``: UTC time, method, value, data, counts, the threshold it
replaced), as every calibration does. The calibration split facts are rewritten too: the
threshold was chosen on all of DATA, so nothing is held out (``test_names`` empty) and
``evaluate`` will not present these images as unseen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from patchcore.apps.review.cache import file_digest
from patchcore.apps.review.session import ReviewSession
from patchcore.apps.review.view import counted
from patchcore.core.detector import PatchCore
from patchcore.core.metrics import THRESHOLD_METHODS, anomaly_threshold
from patchcore.lean import record as rec

__all__ = ["DISPLAY_TOP", "MANUAL", "record_threshold", "save_threshold"]

#: The method name of a threshold dragged by hand on the page.
MANUAL = "manual (review)"
#: Display range of new heatmap colours: [min, DISPLAY_TOP x max] over the maps (as calibrate).
DISPLAY_TOP = 0.7


def record_threshold(
    det: PatchCore,
    value: float,
    method: str,
    *,
    data: str,
    names: list[str],
    labels: np.ndarray,
    scores: np.ndarray,
    max_fpr: float | None = None,
    max_fnr: float | None = None,
    display_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Install a threshold chosen in the review on ``det`` (in memory) and record it.

    Args:
        det: the detector.
        value: the threshold (for a named method, it must be what the method gives on
            ``scores``: the page and the server agree, or the data changed).
        method: one of :data:`~patchcore.core.metrics.THRESHOLD_METHODS`, or :data:`MANUAL`.
        data: the data folder, names, labels and scores it was chosen on.
        max_fpr, max_fnr: the bounds of a bounded method.
        display_range: heatmap colours to store when the model has none.

    Returns:
        The threshold's entry in ``det.threshold_history_``.

    Raises:
        ValueError: a method's threshold differs from ``value``, or a bad value.
    """
    t = rec.check_threshold(value)
    context = {"data": data, "seed": None, "fraction": 1.0, "source": "review", "split": False}
    if method in THRESHOLD_METHODS:
        chosen = anomaly_threshold(labels, scores, method, max_fpr=max_fpr, max_fnr=max_fnr)
        if chosen != t:
            raise ValueError(
                f"{method} gives {chosen!r} on these scores, not {t!r}; reload the page"
            )
        det.calibrate(
            names, labels, method=method, max_fpr=max_fpr, max_fnr=max_fnr, scores=scores,
            context=context,
        )  # fmt: skip
    else:
        det.set_threshold(t, method=method, context={**context, "images": len(names)})
    entry = det.threshold_history_[-1]
    md = dict(det.metadata_)
    md.update(
        calibration_data=data,
        calibration_names=list(names),
        calibration_method=method,
        calibration_fraction=1.0,
        calibration_seed=None,
        calibration_max_fpr=max_fpr,
        test_names=[],
    )
    if det.display_range_ is None and display_range is not None:
        det.state_.display_range = (float(display_range[0]), float(display_range[1]))
    det.metadata_ = md
    return entry


def _display_from_maps(session: ReviewSession) -> tuple[float, float] | None:
    """[min, 0.7 x max] over the cached maps of the counted images (the calibrate rule)."""
    lo, hi = np.inf, -np.inf
    for item, _ in counted(session):
        r = session.record(item)
        if r.get("map_max") is not None:
            hi = max(hi, float(r["map_max"]))
        small = session.small_map(item)
        if small is not None:
            lo = min(lo, float(small.min()))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    top = DISPLAY_TOP * hi
    return (lo, top if top > lo else hi)


def save_threshold(
    session: ReviewSession,
    value: float,
    method: str,
    *,
    max_fpr: float | None = None,
    max_fnr: float | None = None,
) -> dict[str, Any]:
    """Write the page's threshold into the model file (atomically) and keep the cache: the
    scores do not change, so the cache folder moves to the new file's digest.

    Returns:
        The history entry (see :func:`record_threshold`).
    """
    with session.lock:
        if session.job.running:
            raise RuntimeError(f"{session.job.what} is running; save when it is done")
        rows = counted(session)
        entry = record_threshold(
            session.det, value, method,
            data=str(session.data_path),
            names=[it.name for it, _ in rows],
            labels=np.array([it.label for it, _ in rows], dtype=int),
            scores=np.array([s for _, s in rows], dtype=np.float64),
            max_fpr=max_fpr, max_fnr=max_fnr,
            display_range=_display_from_maps(session),
        )  # fmt: skip
        session.det.save(session.model_path)
        old = session.model_digest
        session.model_digest = file_digest(session.model_path)
        session.cache.carry_over(old, session.model_digest)
        return entry
