"""The page's two model-changing actions: "Mark as normal" and "Compare a second model".

Mark as normal adds the marked false positives to the memory bank with
:meth:`~patchcore.PatchCore.partial_fit`, writes the model file (atomically), rescores the
other images and says what changed at the page's threshold: which false positives went away,
which true positives were lost. The marked images are recorded in
``metadata_["review_marked_normal"]`` and left out of the metrics from then on.

Compare scores the same images with a second model (cached beside it) and sets the two side
by side: image AUROC, the confusion matrix at each model's threshold, recall per defect type,
and the images whose verdicts differ.
"""

from __future__ import annotations

import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps.review.cache import Cache, file_digest
from patchcore.apps.review.session import Item, Job, ReviewSession, score_into
from patchcore.apps.review.view import counted
from patchcore.core import metrics
from patchcore.core.detector import PatchCore
from patchcore.lean import record as rec

__all__ = ["compare_models", "mark_normal", "start_compare", "start_mark_normal"]


def _anomalous(scores: list[float | None], threshold: float) -> np.ndarray:
    """Verdicts as booleans, by :func:`patchcore.lean.record.judge`."""
    return rec.judge(scores, threshold) == rec.ANOMALOUS


def check_marks(session: ReviewSession, ids: list[int]) -> list[Item]:
    """The items to mark, or ValueError: unknown, unscored, or not labelled normal."""
    if not ids:
        raise ValueError("no image to mark as normal")
    items = []
    for i in ids:
        if not 0 <= int(i) < len(session.items):
            raise ValueError(f"no image #{i}")
        it = session.items[int(i)]
        if it.label != 0:
            raise ValueError(f"{it.name} is labelled {it.defect_type!r}: only normal images")
        if session.record(it)["score"] is None:
            raise ValueError(f"{it.name} has no score (error row): it cannot be added")
        items.append(it)
    return items


def mark_normal(session: ReviewSession, items: list[Item], threshold: float, job: Job) -> None:
    """Add ``items`` to the model, rescore the rest, keep the before/after in
    ``session.last_update`` (at ``threshold``)."""
    t = rec.check_threshold(threshold)
    before = {it.index: session.record(it)["score"] for it in session.items}
    skip = session.excluded()
    det = session.det
    job.what = f"adding {len(items)} image(s) to the memory bank"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the threshold predates the update
        det.partial_fit([str(it.path) for it in items], progress=session.progress)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    md = dict(det.metadata_)
    marks = [{"name": it.name, "digest": it.digest, "time": now} for it in items]
    md["review_marked_normal"] = [*(md.get("review_marked_normal") or []), *marks]
    det.metadata_ = md
    det.save(session.model_path)
    old_entries = session.entries
    session.model_digest = file_digest(session.model_path)
    session.entries = session.cache.load_entries(session.model_digest)
    for it in items:  # shown (left out of the metrics) with their scores before the update
        session.entries[it.digest] = old_entries[it.digest]  # type: ignore[index]
    job.what = "rescoring the other images"
    score_into(det, session.cache, session.model_digest, session.items, session.entries, job,
               progress=session.progress)  # fmt: skip
    skip |= {it.digest for it in items}
    session.last_update = summary(session, items, before, skip, t)


def summary(
    session: ReviewSession, items: list[Item], before: dict[int, Any], skip: set, t: float
) -> dict[str, Any]:
    """What an update changed at threshold ``t`` on the images the metrics count."""
    rows = [
        it for it in session.items
        if it.digest not in skip and before[it.index] is not None
        and session.record(it)["score"] is not None
    ]  # fmt: skip
    old = _anomalous([before[it.index] for it in rows], t)
    new = _anomalous([session.record(it)["score"] for it in rows], t)
    label = np.array([it.label for it in rows], dtype=bool)

    def names(mask: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"index": it.index, "name": it.name, "type": it.defect_type,
             "before": before[it.index], "after": session.record(it)["score"]}
            for it, m in zip(rows, mask, strict=True) if m
        ]  # fmt: skip

    def confusion(pred: np.ndarray) -> list[list[int]]:
        return [[int((~label & ~pred).sum()), int((~label & pred).sum())],
                [int((label & ~pred).sum()), int((label & pred).sum())]]  # fmt: skip

    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "threshold": t,
        "marked": [it.name for it in items],
        "fp_gone": names(~label & old & ~new),
        "fp_new": names(~label & ~old & new),
        "tp_lost": names(label & old & ~new),
        "tp_gained": names(label & ~old & new),
        "before": confusion(old),
        "after": confusion(new),
        "counted": len(rows),
    }


def start_mark_normal(session: ReviewSession, ids: list[int], threshold: float) -> bool:
    """Check the marks and start :func:`mark_normal` as the page's job (False: busy)."""
    items = check_marks(session, ids)
    rec.check_threshold(threshold)
    return session.start("mark as normal", lambda job: mark_normal(session, items, threshold, job))


def _side(labels: np.ndarray, types: list[str], scores: list[float], t: float) -> dict[str, Any]:
    """One model's column of the comparison."""
    pred = _anomalous(scores, t)
    ev = metrics.evaluate(pred, labels, types)
    s = np.asarray(scores, dtype=np.float64)
    both = 0 < labels.sum() < labels.size
    return {
        "threshold": t,
        "auroc": float(metrics.auroc(labels, s)) if both else None,
        "confusion": ev["ConfusionMatrix"],
        "recall_by_type": ev["DefectTypeRecall"],
        "counts_by_type": ev["DefectTypeCounts"],
        "metrics": {k: ev[k] for k in metrics.MATLAB_METRICS},
    }


def compare_models(session: ReviewSession, other: str | os.PathLike, threshold: float, job: Job):
    """Score the images with ``other`` (cached beside it) and put the two models side by side
    in ``session.compare``; model A is judged at the page's ``threshold``, model B at its own
    (MaxF1 on these images when it has none, which the comparison says)."""
    path = Path(other)
    det_b = PatchCore.load(path, device=session.device)
    digest = file_digest(path)
    cache = Cache(path)
    entries = cache.load_entries(digest)
    job.what = f"scoring with {path.name}"
    score_into(det_b, cache, digest, session.items, entries, job, progress=session.progress)
    rows = []
    for it, score_a in counted(session):
        e = entries.get(it.digest or "")
        score_b = e["record"]["score"] if e else None
        if score_b is not None:
            rows.append((it, score_a, float(score_b)))
    labels = np.array([it.label for it, _, _ in rows], dtype=int)
    types = [it.defect_type for it, _, _ in rows]
    t_b, note = det_b.threshold_, None
    if t_b is None:
        t_b = metrics.anomaly_threshold(labels, [b for *_, b in rows], "max_f1")
        note = f"{path.name} has no threshold: judged at MaxF1 on these images"
    a = _side(labels, types, [s for _, s, _ in rows], float(threshold))
    b = _side(labels, types, [s for *_, s in rows], float(t_b))
    va = _anomalous([s for _, s, _ in rows], float(threshold))
    vb = _anomalous([s for *_, s in rows], float(t_b))
    differ = [
        {"index": it.index, "name": it.name, "type": it.defect_type, "label": it.label,
         "score_a": sa, "score_b": sb, "a": rec.ANOMALOUS if x else rec.NORMAL,
         "b": rec.ANOMALOUS if y else rec.NORMAL}
        for (it, sa, sb), x, y in zip(rows, va, vb, strict=True) if x != y
    ]  # fmt: skip
    session.compare = {
        "a": {"path": str(session.model_path), **a},
        "b": {"path": str(path), "threshold_method": det_b.threshold_method_, **b},
        "counted": len(rows),
        "disagree": differ,
        "note": note,
    }


def start_compare(session: ReviewSession, other: str, threshold: float) -> bool:
    """Start :func:`compare_models` as the page's job (False: busy).

    Raises:
        FileNotFoundError: no such model file.
    """
    if not Path(other).is_file():
        raise FileNotFoundError(f"{other}: no such model file")
    rec.check_threshold(threshold)
    return session.start("compare", lambda job: compare_models(session, other, threshold, job))
