"""Export the page's current view as the static HTML report (:func:`patchcore.apps.report.
write_report`): the metrics, figures and galleries at the page's threshold, on the images the
metrics count, with every false positive and false negative and up to
:data:`KEEP_CORRECT` true positives and true negatives.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps import plots, report
from patchcore.apps.review.pictures import display
from patchcore.apps.review.session import Item, ReviewSession
from patchcore.apps.review.view import counted
from patchcore.apps.workflow.model import model_card
from patchcore.apps.workflow.reporting import gallery_order
from patchcore.core import datasets, metrics
from patchcore.core.images import ImageReadError, read_image
from patchcore.lean import record as rec
from patchcore.lean.regions import DEFAULT_MIN_AREA

__all__ = ["KEEP_CORRECT", "export_report"]

#: True positives and true negatives shown in an exported report (errors: all of them).
KEEP_CORRECT = 30
TILE_HEIGHT = 200


def _figures(y: np.ndarray, s: np.ndarray, ev: dict[str, Any], t: float, out: Path) -> dict:
    figdir = out / "figures"
    figures = {
        "score_histogram": plots.score_histogram(
            s, y, t, figdir / "score_histogram.png", title="Anomaly scores (review)"
        ),
        "confusion_matrix": plots.confusion_matrix_plot(
            ev["ConfusionMatrix"], figdir / "confusion_matrix.png"
        ),
    }
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = metrics.roc_curve(y, s)
        op = (ev["FalsePositiveRate"], ev["Recall"])
        figures["roc"] = plots.roc_plot(fpr, tpr, metrics.auroc(y, s), figdir / "roc.png", op)
    recall = {k: v for k, v in ev["DefectTypeRecall"].items() if k != datasets.GOOD}
    if recall:
        figures["per_type_recall"] = plots.per_type_recall_plot(
            recall, figdir / "per_type_recall.png", counts=ev["DefectTypeCounts"]
        )
    return figures


def _tile(session: ReviewSession, item: Item, score: float, t: float, path: Path) -> Path | None:
    small = session.small_map(item)
    if small is None:
        return None
    try:
        image = read_image(item.path)
        mask = datasets.load_mask(item.sample) if item.mask is not None else None
    except ImageReadError:
        return None
    verdict = rec.judge([score], t)[0]
    cut = session.det.region_threshold_
    shrink = small.size / max(1, image.shape[0] * image.shape[1])
    found = rec.verdict_regions(
        small, verdict, t if cut is None else float(cut),
        min_area=max(1, round(DEFAULT_MIN_AREA * shrink)),
    )  # fmt: skip
    tile = plots.gallery_tile(
        image, small, display(session), score, t, item.name, mask,
        height=TILE_HEIGHT, annotate=False, regions=found,
    )  # fmt: skip
    return plots.save_png(tile, path)


def _galleries(
    session: ReviewSession, rows: list[tuple[Item, float]], t: float, out: Path
) -> dict[str, list[dict[str, Any]]]:
    y = np.array([it.label for it, _ in rows], dtype=int)
    s = np.array([v for _, v in rows], dtype=np.float64)
    pred = rec.judge(s, t) == rec.ANOMALOUS
    galleries: dict[str, list[dict[str, Any]]] = {}
    for key, idx in gallery_order(s, y, pred, len(rows)).items():
        keep = idx if key.startswith("false") else idx[:KEEP_CORRECT]
        items = []
        for rank, i in enumerate(keep):
            item, score = rows[i]
            path = _tile(session, item, score, t, out / "gallery" / f"{key}_{rank + 1:03d}.png")
            if path is None:
                continue
            kind = item.defect_type if item.label else "normal"
            items.append({"image_path": path, "caption": f"{item.name} ({kind})", "score": score})
        galleries[key] = items
    return galleries


def export_report(session: ReviewSession, threshold: float, method: str) -> Path:
    """Write the current view to ``<cache>/reports/<UTC time>/report.html``; returns its path.

    Raises:
        ValueError: no scored image yet, or a threshold that is not a finite number.
    """
    t = rec.check_threshold(threshold)
    rows = counted(session)
    if not rows:
        raise ValueError("no scored image to report on yet")
    y = np.array([it.label for it, _ in rows], dtype=int)
    s = np.array([v for _, v in rows], dtype=np.float64)
    types = [it.defect_type for it, _ in rows]
    ev = metrics.evaluate(rec.judge(s, t) == rec.ANOMALOUS, y, types)
    auroc = float(metrics.auroc(y, s)) if 0 < y.sum() < y.size else None
    measured = metrics.Metrics.from_dict(
        {**ev, "AUROC": auroc, "Threshold": t, "ThresholdMethod": method}
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    out = session.cache.reports_dir() / stamp
    marked = session.det.metadata_.get("review_marked_normal") or []
    errors = [it.name for it in session.items if session.record(it)["score"] is None]
    notes = [
        f"Exported from `patchcore review` on {len(rows)} images of {session.data_path} at "
        f"threshold {t:.6g} ({method}). A threshold chosen on these same images makes these "
        "metrics optimistic: they are not held out.",
        "Galleries: every false positive and false negative; up to "
        f"{KEEP_CORRECT} true positives and true negatives.",
    ]
    if marked:
        notes.append(
            f"{len(marked)} image(s) marked as normal and added to the model are left out: "
            + ", ".join(m.get("name", "?") for m in marked[:10])
        )
    if errors:
        notes.append(f"{len(errors)} image(s) could not be scored: " + ", ".join(errors[:10]))
    recall = {k: {"recall": v, "n": ev["DefectTypeCounts"][k]}
              for k, v in ev["DefectTypeRecall"].items() if k != datasets.GOOD}  # fmt: skip
    report.write_report(
        out,
        title=f"Review of {session.model_path.name} on {session.data_path.name}",
        model_card=model_card(session.det, None),
        metrics=measured,
        figures=_figures(y, s, ev, t, out),
        galleries=_galleries(session, rows, t, out),
        per_type_recall=recall or None,
        notes=notes,
    )
    return out / "report.html"
