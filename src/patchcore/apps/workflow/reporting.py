"""The evaluation report: figures, galleries and notes around
:func:`patchcore.apps.report.write_report`.

The galleries use the anomaly maps kept by the scoring pass (no second detector pass); only
the few images shown are decoded again, here, for their tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps import figures, plots, report
from patchcore.apps.workflow.explain import explanation_picture
from patchcore.apps.workflow.model import (
    calibration_text,
    display_range,
    display_range_text,
    model_card,
    threshold_history,
)
from patchcore.apps.workflow.scoring import PIXEL_METRIC_SIDE, ScoredSet
from patchcore.core import datasets, metrics
from patchcore.core.datasets import Sample
from patchcore.core.detector import PatchCore
from patchcore.core.images import ImageReadError, read_image
from patchcore.lean.record import ANOMALOUS, judge, verdict_regions
from patchcore.lean.regions import DEFAULT_MIN_AREA

#: Height of the panels of a gallery tile, in pixels.
TILE_HEIGHT = 240


def write_evaluation_report(
    det: PatchCore,
    scored: ScoredSet,
    measured: metrics.Metrics,
    out: Path,
    title: str,
    gallery_size: int,
    notes: Sequence[str],
    warnings: Sequence[str] = (),
) -> Path:
    """Write ``out/report.html`` with its figures and gallery tiles; returns its path.

    ``warnings`` (e.g. images left out as training images) are shown in the report's warnings
    box after the current threshold's calibration warnings.
    """
    ok = np.isfinite(scored.scores)
    truth = scored.data.labels
    recall = {t: r for t, r in (measured.defect_type_recall or {}).items() if t != datasets.GOOD}
    counts = measured.defect_type_counts or {}
    galleries, totals = _galleries(det, scored, out / "gallery", gallery_size)
    history = threshold_history(det)
    return report.write_report(
        out,
        title=title,
        model_card=model_card(det, scored.ms_per_image),
        metrics=measured,
        figures=_figures(scored, measured, out / "figures", recall),
        galleries=galleries,
        gallery_totals=totals,
        colour_bar=figures.colour_bar_figure(display_range(det), out / "figures" / "colours.png"),
        per_type_recall={t: {"recall": r, "n": counts.get(t)} for t, r in recall.items()} or None,
        notes=[*_notes(det, scored, measured, ok, truth, gallery_size), *notes],
        warnings=[
            *(history[-1].get("warnings") or [] if history else []),
            *warnings,
            *_unlike_warning(scored),
        ],
        history=history,
    )


def _unlike_warning(scored: ScoredSet) -> list[str]:
    """One warning on the test images whose out-of-distribution hint fired, else none."""
    if not scored.unlike:
        return []
    n = len(scored.unlike)
    first = min(scored.unlike)
    return [
        f"{n} of the {len(scored.data)} test images {'looks' if n == 1 else 'look'} unlike the "
        f"training images (out-of-distribution hint), e.g. {scored.data[first].name}: "
        f"{scored.unlike[first]}; their verdicts may say more about the input than about a "
        "defect"
    ]


def _figures(
    scored: ScoredSet, measured: metrics.Metrics, figdir: Path, recall: dict[str, float]
) -> dict[str, Path]:
    scores, truth = scored.scores, scored.data.labels
    ok = np.isfinite(scores)
    threshold = float(measured.threshold)  # type: ignore[arg-type]
    figures = {
        "score_histogram": plots.score_histogram(
            scores[ok],
            truth[ok],
            threshold,
            figdir / "score_histogram.png",
            title="Anomaly scores of the held-out test images",
        )
    }
    if measured.auroc is not None:
        fpr, tpr, _ = metrics.roc_curve(truth[ok], scores[ok])
        op = (measured.false_positive_rate, measured.recall)
        figures["roc"] = plots.roc_plot(fpr, tpr, measured.auroc, figdir / "roc.png", op)
    figures["confusion_matrix"] = plots.confusion_matrix_plot(
        measured.confusion_matrix, figdir / "confusion_matrix.png"
    )
    if recall:
        figures["per_type_recall"] = plots.per_type_recall_plot(
            recall, figdir / "per_type_recall.png", counts=measured.defect_type_counts or {}
        )
    return figures


def _notes(
    det: PatchCore,
    scored: ScoredSet,
    measured: metrics.Metrics,
    ok: np.ndarray,
    truth: np.ndarray,
    gallery_size: int,
) -> list[str]:
    n_normal = int((truth[ok] == 0).sum())
    notes = [
        f"Evaluated on {int(ok.sum())} held-out test images ({n_normal} normal, "
        f"{int(ok.sum()) - n_normal} anomalous) that were not used to choose the threshold "
        f"({calibration_text(det.metadata_)}).",
        f"Galleries: every false positive and false negative, and up to {gallery_size} true "
        "positives and true negatives; positives by highest score first, negatives by lowest "
        "score first.",
        f"Heatmaps share one colour scale: {display_range_text(det)}.",
    ]
    notes += _calibration_notes(det, scored.scores[ok], truth[ok])
    cut = det.region_cut()
    notes.append(
        "Magenta boxes: defect regions, the connected regions of the anomaly map at or above "
        + (
            f"the region threshold {cut:.4g} ({det.state_.region_threshold_method})"
            if det.region_threshold_ is not None
            else f"the image threshold {cut:.4g}"
        )
        + f", at least {DEFAULT_MIN_AREA} native pixels (white outlines: ground-truth masks)."
    )
    if measured.pixel_auroc is not None:
        notes.append(
            f"Pixel metrics use maps and masks resized to at most {PIXEL_METRIC_SIDE} px on "
            f"the longer side ({measured.pixel_metric_images} images with known masks); "
            "AUPRO up to a false positive rate of 0.3."
        )
    if scored.skipped:
        notes.append(
            f"{len(scored.skipped)} unreadable test image(s) left out: "
            + "; ".join(f"{p}: {r}" for p, r in scored.skipped[:10])
        )
    return notes


def _calibration_notes(det: PatchCore, scores: np.ndarray, truth: np.ndarray) -> list[str]:
    """The conformal guarantee (with the rate measured here) and what the normalised score is."""
    out = []
    c = det.calibration_ or {}
    t = float(det.threshold_)  # type: ignore[arg-type]
    if det.threshold_method_ == "conformal" and c:
        lo, hi = c["fpr_bounds"]
        normal = scores[truth == 0]
        seen = (
            f"; measured here on {normal.size} held-out normal test images: "
            f"{float((judge(normal, t) == ANOMALOUS).mean()):.2%}"
            if normal.size
            else ""
        )
        out.append(
            f"Threshold from {c['n']} normal images alone (split conformal, requested "
            f"false-alarm rate {c['max_fpr']:g}): the expected false-alarm rate on normal "
            f"images exchangeable with those lies in [{lo:.2%}, {hi:.2%}]{seen}. It says "
            "nothing about images from a drifted process."
        )
    m = det.normalization_
    if m:
        out.append(
            f"Normalised score (CLI `predict`, the service): the raw score mapped onto [0, 1] "
            f"with the threshold at 0.5, linear from {m['low']:.4g} (0) to the threshold "
            f"{m['threshold']:.4g} and on to {m['high']:.4g} (1), clipped: a mapping, not a "
            "probability."
        )
    return out


def gallery_order(
    scores: np.ndarray, truth: np.ndarray, pred: np.ndarray, k: int, *, all_errors: bool = True
) -> dict[str, list[int]]:
    """Indices of the images per outcome, most telling first: up to ``k`` true positives and
    true negatives, and every false positive and false negative (``all_errors``; else up to
    ``k`` of them too).

    True positives: highest scores first (clearest detections); true negatives: lowest first
    (clearest passes); false positives: highest first (most confidently wrong alarms); false
    negatives: lowest first (most thoroughly missed defects).
    """
    out = {}
    for key, t, p, descending in (
        ("true_positives", 1, True, True),
        ("true_negatives", 0, False, False),
        ("false_positives", 0, True, True),
        ("false_negatives", 1, False, False),
    ):
        idx = np.flatnonzero((truth == t) & (pred == p) & np.isfinite(scores))
        order = np.argsort(-scores[idx] if descending else scores[idx], kind="stable")
        limit = None if all_errors and t != p else k
        out[key] = idx[order][:limit].tolist()
    return out


def _galleries(
    det: PatchCore, scored: ScoredSet, gdir: Path, k: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The gallery tiles per outcome and how many images each outcome holds."""
    test, scores = scored.data, scored.scores
    threshold = float(det.threshold_)  # type: ignore[arg-type]
    verdicts = judge(scores, threshold)
    order = gallery_order(scores, test.labels, verdicts == ANOMALOUS, k)
    every = gallery_order(scores, test.labels, verdicts == ANOMALOUS, len(scores))
    totals = {key: len(idx) for key, idx in every.items()}
    rng = display_range(det)
    cut = det.region_cut()
    galleries: dict[str, list[dict[str, Any]]] = {}
    placed: dict[str, list[tuple[int, str]]] = {}  # per gallery: (test index, file stem) per tile
    for key, idx in order.items():
        items, placed[key] = [], []
        for rank, i in enumerate(idx):
            s, m = test[i], scored.maps.get(i)
            if m is None:
                continue
            try:
                image = _pixels(s)
                mask = datasets.load_mask(s) if s.mask is not None else None
            except ImageReadError:
                continue
            found = _regions(m, verdicts[i], cut, image.shape[:2])
            tile = plots.gallery_tile(
                image, m, rng, float(scores[i]), threshold, s.name, mask,
                height=TILE_HEIGHT, annotate=False, regions=found,
            )  # fmt: skip
            stem = f"{key}_{rank + 1:02d}"
            path = plots.save_png(tile, gdir / f"{stem}.png")
            placed[key].append((i, stem))
            kind = s.defect_type if s.is_anomalous else "normal"
            caption = f"{s.name} ({kind}, {len(found)} region{'' if len(found) == 1 else 's'})"
            items.append({"image_path": path, "caption": caption, "score": float(scores[i])})
            if i in scored.unlike:
                items[-1]["note"] = scored.unlike[i]
        galleries[key] = items
    _add_explanations(det, test, placed, galleries, gdir)
    return galleries, totals


def _regions(small_map: np.ndarray, verdict: str, cut: float, native: tuple[int, int]) -> tuple:
    """Defect regions of a gallery map (shrunk to at most PIXEL_METRIC_SIDE px) by the
    record's rule (:func:`~patchcore.lean.record.verdict_regions`: none for a normal verdict,
    at least one for an anomalous one), the minimum area scaled from native pixels."""
    shrink = small_map.size / max(1, native[0] * native[1])
    area = max(1, round(DEFAULT_MIN_AREA * shrink))
    return verdict_regions(small_map, verdict, cut, min_area=area)


#: Galleries whose tiles also show the nearest normal training patch (the flagged images).
EXPLAINED_GALLERIES = ("true_positives", "false_positives")


def _add_explanations(
    det: PatchCore,
    test: Any,
    placed: dict[str, list[tuple[int, str]]],
    galleries: dict[str, list[dict[str, Any]]],
    gdir: Path,
) -> None:
    """Beside each flagged tile: its worst patch and the nearest normal training patch.

    One :meth:`~patchcore.PatchCore.explain` pass over the shown flagged images; a training
    image that cannot be read any more (moved, or in-memory at fit) shows as a grey panel.
    """
    shown = [(key, i) for key in EXPLAINED_GALLERIES for i, _ in placed[key]]
    if not shown:
        return
    found = det.explain([test[i].image for _, i in shown], on_error="skip", progress=False)
    by_image = dict(zip(shown, found, strict=True))
    for key in EXPLAINED_GALLERIES:  # tiles and placed[key] line up (skipped images in neither)
        for item, (i, stem) in zip(galleries[key], placed[key], strict=True):
            e = by_image[(key, i)]
            if e.error is not None:
                continue
            try:
                pic = explanation_picture(e, _pixels(test[i]), height=TILE_HEIGHT // 2)
            except ImageReadError:
                continue
            item["explanation_path"] = plots.save_png(pic, gdir / f"{stem}_nn.png")
            item["explanation_caption"] = explanation_caption(e)


def explanation_caption(e: Any) -> str:
    """One line: the nearest normal training patch of an explanation, where and how far."""
    if e.train_index is None:
        return f"nearest bank row {e.bank_row} at distance {e.distance:.4g} ({e.note})"
    where = f"rows {e.train_box[0]}-{e.train_box[2]}, cols {e.train_box[1]}-{e.train_box[3]}"
    return f"nearest normal patch: {Path(e.train_name).name}, {where}, distance {e.distance:.4g}"


def _pixels(sample: Sample) -> np.ndarray:
    """A sample's pixels for its tile (decoded here, once, for the few images shown)."""
    return read_image(sample.image) if isinstance(sample.image, Path) else sample.image
