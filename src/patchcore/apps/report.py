"""Self-contained HTML evaluation report.

:func:`write_report` writes ``out_dir/report.html``: inline CSS, no JavaScript, no network
access; figures and gallery tiles are PNG files already saved under ``out_dir`` (see
:mod:`patchcore.apps.plots`) and referenced by relative paths, so the folder can be zipped, mailed
and opened from disk. All text coming from the caller is HTML-escaped.

Metric names follow MATLAB's ``evaluateAnomalyDetection`` ``DataSetMetrics`` table
(``GlobalAccuracy``, ``MeanAccuracy``, ``Precision``, ``Recall``, ``Specificity``,
``F1Score``, ``FalsePositiveRate``, ``FalseNegativeRate``), spelled as the keys of
``metrics.json`` (:meth:`patchcore.core.metrics.Metrics.as_dict`); there are no aliases.
"""

from __future__ import annotations

import datetime as _dt
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from patchcore.apps.report_parts import (
    CSS,
    esc,
    fmt_value,
    gallery_section,
    history_section,
    is_number,
    local_src,
    section,
    warnings_section,
)
from patchcore.core.metrics import MATLAB_METRICS, Metrics
from patchcore.lean.util import package_version

__all__ = ["MATLAB_METRICS", "write_report"]

_KNOWN_METRICS = (*MATLAB_METRICS, "AUROC", "Threshold", "ConfusionMatrix")
_TARGET_METRICS = (*MATLAB_METRICS, "AUROC")
_LOWER_IS_BETTER = {"FalsePositiveRate", "FalseNegativeRate"}
_FIGURES = ("confusion_matrix", "score_histogram", "roc", "per_type_recall")


def _split_metrics(metrics: Metrics | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics the report lays out, other entries)``; names are the keys of ``metrics.json``.

    A :class:`~patchcore.core.metrics.Metrics` object contributes only what the report lays out.
    """
    if isinstance(metrics, Metrics):
        values = metrics.as_dict()
        return {k: values[k] for k in _KNOWN_METRICS if k in values}, {}
    known = {str(k): v for k, v in metrics.items() if k in _KNOWN_METRICS}
    others = {str(k): v for k, v in metrics.items() if k not in _KNOWN_METRICS}
    return known, others


def _fmt_plain(value: Any) -> str:
    """Format a configuration value: floats with up to 6 significant digits, no padding."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral | bool):
        return "n/a" if math.isnan(float(value)) else f"{float(value):.6g}"
    return fmt_value(value)


def _passes(name: str, value: Any, targets: Mapping[str, float]) -> bool | None:
    """True / False against the target of ``name``; None when there is no target or value."""
    if name not in targets or not is_number(value) or math.isnan(float(value)):
        return None
    if name in _LOWER_IS_BETTER:
        return float(value) <= targets[name]
    return float(value) >= targets[name]


def _target_text(name: str, targets: Mapping[str, float]) -> str:
    relation = "\u2264" if name in _LOWER_IS_BETTER else "\u2265"
    return f"target {relation} {fmt_value(targets[name], 3)}"


def _figure_html(out_dir: Path, path: str | Path, alt: str) -> str:
    return (
        f'<figure class="fig"><img src="{local_src(out_dir, path, f"figure {alt!r}")}" '
        f'alt="{esc(alt)}"></figure>'
    )


def _grid(sections: Iterable[str]) -> str:
    parts = [s for s in sections if s]
    if not parts:
        return ""
    if len(parts) == 1:
        return parts[0]
    return '<div class="grid2">' + "".join(parts) + "</div>"


def _summary(known: Mapping[str, Any], threshold: Any, targets: Mapping[str, float]) -> str:
    cards = []
    headline = (
        ("GlobalAccuracy", "Accuracy", "share of images classified correctly"),
        ("F1Score", "F1 score", "harmonic mean of precision and recall"),
        ("AUROC", "Image AUROC", "threshold-free ranking quality"),
    )
    for name, label, hint in headline:
        value = known.get(name)
        verdict = _passes(name, value, targets)
        cls = "" if verdict is None else " pass" if verdict else " fail"
        badge = (
            ""
            if verdict is None
            else f' <span class="badge {cls.strip()}">{"PASS" if verdict else "FAIL"}</span>'
        )
        extra = _target_text(name, targets) if name in targets else hint
        cards.append(
            f'<div class="kpi{cls}"><div class="label">{esc(label)}{badge}</div>'
            f'<div class="value">{esc(fmt_value(value, 3))}</div>'
            f'<div class="hint">{esc(extra)}</div></div>'
        )
    cards.append(
        '<div class="kpi"><div class="label">Decision threshold</div>'
        f'<div class="value">{esc(fmt_value(threshold, 4) if threshold is not None else "—")}</div>'
        '<div class="hint">score &ge; threshold &rarr; anomalous</div></div>'
    )
    body = f'<div class="cards">{"".join(cards)}</div>'
    if targets:
        checked = {n: _passes(n, known.get(n), targets) for n in targets}
        missed = [n for n, ok in checked.items() if ok is False]
        unknown = [n for n, ok in checked.items() if ok is None]
        if missed:
            detail = ", ".join(
                f"{n} {fmt_value(known.get(n), 3)} ({_target_text(n, targets)})" for n in missed
            )
            body += (
                f'<div class="verdict fail">FAIL: {len(missed)} of {len(checked)} targets '
                f"missed: {esc(detail)}</div>"
            )
        else:
            note = f" ({len(unknown)} not measured: {', '.join(unknown)})" if unknown else ""
            body += (
                f'<div class="verdict pass">PASS: all {len(checked) - len(unknown)} measured '
                f"targets met{esc(note)}</div>"
            )
    return section("Summary", body, "summary")


def _metrics_table(
    known: Mapping[str, Any], others: Mapping[str, Any], targets: Mapping[str, float]
) -> str:
    head = "".join(f'<th class="num">{esc(n)}</th>' for n in MATLAB_METRICS)
    cells = []
    for name in MATLAB_METRICS:
        verdict = _passes(name, known.get(name), targets)
        cls = "num" if verdict is None else f"num {'pass' if verdict else 'fail'}"
        title = f' title="{esc(_target_text(name, targets))}"' if name in targets else ""
        cells.append(f'<td class="{cls}"{title}>{esc(fmt_value(known.get(name)))}</td>')
    body = (
        '<div class="scroll"><table><thead><tr>'
        f"{head}</tr></thead><tbody><tr>{''.join(cells)}</tr></tbody></table></div>"
    )
    extra = {n: v for n, v in known.items() if n in ("AUROC", "Threshold")}
    extra.update(others)
    if extra:
        rows = "".join(
            f"<tr><th>{esc(n)}</th><td>{esc(fmt_value(v))}</td></tr>" for n, v in extra.items()
        )
        body += f'<h3>Other metrics</h3><table class="kv">{rows}</table>'
    if targets:
        body += '<p class="sub">Green / red: meets / misses its target (hover for the target).</p>'
    return section(
        "Image-level metrics",
        body,
        "metrics",
        "Data-set metrics in the layout of MATLAB evaluateAnomalyDetection "
        "(anomalous = positive class).",
    )


def _confusion_table(cm: Any) -> str:
    try:
        (tn, fp), (fn, tp) = cm
    except (TypeError, ValueError):
        return f'<p class="empty">{esc(fmt_value(cm))}</p>'
    return (
        '<table><thead><tr><th>true \\ predicted</th><th class="num">normal</th>'
        '<th class="num">anomalous</th></tr></thead><tbody>'
        f'<tr><th>normal</th><td class="num">{esc(fmt_value(tn))}</td>'
        f'<td class="num fail">{esc(fmt_value(fp))}</td></tr>'
        f'<tr><th>anomalous</th><td class="num fail">{esc(fmt_value(fn))}</td>'
        f'<td class="num">{esc(fmt_value(tp))}</td></tr></tbody></table>'
    )


def _recall_of(value: Any) -> tuple[Any, Any]:
    """``(recall, count)`` from a float or a mapping with 'recall' and 'n' / 'count'."""
    if isinstance(value, Mapping):
        count = next((value[k] for k in ("n", "count", "total", "support") if k in value), None)
        return value.get("recall"), count
    return value, None


def _per_type_section(
    out_dir: Path,
    figure: str | Path | None,
    per_type_recall: Mapping[str, Any] | None,
    targets: Mapping[str, float],
) -> str:
    parts = []
    if figure is not None:
        parts.append(_figure_html(out_dir, figure, "Recall per defect type"))
    if per_type_recall:
        has_counts = any(_recall_of(v)[1] is not None for v in per_type_recall.values())
        head = '<th class="num">images</th>' if has_counts else ""
        rows = []
        for name, value in per_type_recall.items():
            recall, count = _recall_of(value)
            verdict = _passes("Recall", recall, targets)
            cls = "" if verdict is None else ("pass" if verdict else "fail")
            width = 0.0
            if is_number(recall) and not math.isnan(float(recall)):
                width = min(max(float(recall), 0.0), 1.0) * 100
            count_cell = f'<td class="num">{esc(fmt_value(count))}</td>' if has_counts else ""
            rows.append(
                f"<tr><th>{esc(name)}</th>{count_cell}"
                f'<td class="num {cls}">{esc(fmt_value(recall, 3))}</td>'
                f'<td style="width:45%"><div class="bar"><span class="{cls}" '
                f'style="width:{width:.1f}%"></span></div></td></tr>'
            )
        parts.append(
            f'<table><thead><tr><th>defect type</th>{head}<th class="num">recall</th><th></th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    if not parts:
        return ""
    return section(
        "Recall per defect type",
        "".join(parts),
        "per-type",
        "Share of the defective images of each type flagged as anomalous.",
    )


def _pixel_section(pixel_metrics: Mapping[str, Any] | None) -> str:
    if pixel_metrics is None:
        return ""
    cards = []
    rows = []
    for name, value in pixel_metrics.items():
        if is_number(value):
            cards.append(
                f'<div class="kpi"><div class="label">{esc(name)}</div>'
                f'<div class="value">{esc(fmt_value(value, 3))}</div></div>'
            )
        else:
            rows.append(f"<tr><th>{esc(name)}</th><td>{esc(fmt_value(value))}</td></tr>")
    body = f'<div class="cards">{"".join(cards)}</div>' if cards else ""
    if rows:
        body += f'<table class="kv">{"".join(rows)}</table>'
    if not body:
        body = '<p class="empty">No pixel-level metrics.</p>'
    return section(
        "Pixel-level localisation",
        body,
        "pixel",
        "Anomaly maps against ground-truth defect masks (AUROC over pixels, AUPRO over "
        "defect regions).",
    )


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, key + "."))
        elif isinstance(value, list | tuple) and all(
            isinstance(v, str | int | float) for v in value
        ):
            rows.append((key, ", ".join(_fmt_plain(v) for v in value)))
        else:
            rows.append((key, value))
    return rows


def _model_card_section(model_card: Mapping[str, Any]) -> str:
    if not model_card:
        return section("Model card", '<p class="empty">No model information.</p>', "model")
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(_fmt_plain(v))}</td></tr>" for k, v in _flatten(model_card)
    )
    return section("Model card", f'<table class="kv">{rows}</table>', "model")


_HISTOGRAM = (
    "Score histogram",
    "Score distribution",
    "scores",
    "Image scores of normal and anomalous test images; dashed line = threshold.",
)


def _roc_texts(auroc: Any) -> tuple[str, str, str, str | None]:
    return (
        "ROC curve",
        "ROC curve",
        "roc",
        f"AUROC = {fmt_value(auroc)}" if auroc is not None else None,
    )


def _figure_section(
    out_dir: Path, path: str | Path | None, alt: str, title: str, anchor: str, sub: str | None
) -> str:
    """A section holding one figure; empty without the figure."""
    if path is None:
        return ""
    return section(title, _figure_html(out_dir, path, alt), anchor, sub)


def _confusion_section(out_dir: Path, figure: str | Path | None, known: Mapping[str, Any]) -> str:
    """The confusion-matrix figure, else a table of ``ConfusionMatrix``, else nothing."""
    if figure is not None:
        body = _figure_html(out_dir, figure, "Confusion matrix")
    elif "ConfusionMatrix" in known:
        body = _confusion_table(known["ConfusionMatrix"])
    else:
        return ""
    return section(
        "Confusion matrix", body, "confusion", "Rows: true class; columns: predicted class."
    )


def _other_figures_section(out_dir: Path, figures: Mapping[str, str | Path]) -> str:
    if not figures:
        return ""
    blocks = "".join(
        f"<div><h3>{esc(name)}</h3>{_figure_html(out_dir, path, name)}</div>"
        for name, path in figures.items()
    )
    return section("Other figures", f'<div class="grid2">{blocks}</div>', "other")


def _notes_section(notes: Sequence[str] | None) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return section("Notes", f'<ul class="notes">{items}</ul>', "notes")


def _check_targets(targets: Mapping[str, float] | None) -> dict[str, float]:
    """``targets`` as plain floats; an unknown metric name raises ValueError."""
    for name in targets or {}:
        if name not in _TARGET_METRICS:
            raise ValueError(
                f"unknown target metric {name!r}; use one of {', '.join(_TARGET_METRICS)}"
            )
    return {str(k): float(v) for k, v in (targets or {}).items()}


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    model_card: Mapping[str, Any],
    metrics: Metrics | Mapping[str, Any],
    figures: Mapping[str, str | Path],
    galleries: Mapping[str, Sequence[Mapping[str, Any]]],
    per_type_recall: Mapping[str, Any] | None = None,
    pixel_metrics: Mapping[str, Any] | None = None,
    notes: Sequence[str] | None = None,
    targets: Mapping[str, float] | None = None,
    warnings: Sequence[str] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    colour_bar: str | Path | None = None,
    gallery_totals: Mapping[str, int] | None = None,
) -> Path:
    """Write ``out_dir/report.html``, a self-contained evaluation report.

    Args:
        out_dir: report folder (created if missing); every referenced PNG must be inside it.
        title: report title.
        model_card: model description (backbone, layers, coreset size, training images...);
            nested mappings are flattened to dotted keys.
        metrics: a :class:`~patchcore.core.metrics.Metrics` (its pixel metrics fill the pixel
            section unless ``pixel_metrics`` is given), or a mapping with the keys of
            ``metrics.json``: :data:`MATLAB_METRICS`, ``AUROC``, ``Threshold`` and an optional
            ``ConfusionMatrix`` ``[[TN, FP], [FN, TP]]`` (shown as a table when there is no
            confusion-matrix figure); other entries are listed under "Other metrics".
        figures: name -> PNG path (absolute, or relative to ``out_dir``). Recognised names:
            ``confusion_matrix``, ``score_histogram``, ``roc``, ``per_type_recall``; others
            go to an "Other figures" section.
        galleries: group -> list of ``{"image_path", "caption", "score"}`` (and optionally
            ``"note"``, ``"explanation_path"``, ``"explanation_caption"``); groups
            ``true_positives``, ``true_negatives``, ``false_positives``,
            ``false_negatives`` get their own headings, in that order; others follow. The
            first :data:`~patchcore.apps.report_parts.GALLERY_VISIBLE` tiles of a group are
            shown, the others behind a "show" switch.
        per_type_recall: defect type -> recall, or -> ``{"recall", "n"}``.
        pixel_metrics: label -> value, e.g. ``{"PixelAUROC": 0.97, "AUPRO": 0.91}``.
        notes: free-text remarks shown at the end.
        targets: optional metric key -> required value (e.g. ``{"Recall": 0.95}``); drives
            the pass / fail colours and the summary verdict. FalsePositiveRate and
            FalseNegativeRate pass when at or below their target, the others at or above.
        warnings: shown in a box right after the summary (calibration warnings, images
            left out as training images...).
        history: the model's threshold history, oldest first (``time``, ``method``,
            ``data``, ``seed``, ``images``, ``value``, ``warnings`` per entry).
        colour_bar: a PNG of the heatmaps' colour scale, shown above the galleries.
        gallery_totals: group -> images in that outcome, when a group holds fewer tiles.

    Returns:
        Path of the written ``report.html``.

    Raises:
        FileNotFoundError: a figure or tile does not exist.
        ValueError: a figure or tile lies outside ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    known, others = _split_metrics(metrics)
    if pixel_metrics is None and isinstance(metrics, Metrics) and metrics.pixel_auroc is not None:
        pixel_metrics = {"PixelAUROC": metrics.pixel_auroc, "AUPRO": metrics.aupro}
    target_map = _check_targets(targets)
    threshold = known.get("Threshold", model_card.get("threshold"))
    named = {k: v for k, v in figures.items() if k in _FIGURES}
    other_figures = {str(k): v for k, v in figures.items() if k not in _FIGURES}

    body = "".join(
        [
            _summary(known, threshold, target_map),
            warnings_section(warnings),
            _metrics_table(known, others, target_map),
            _grid(
                [
                    _confusion_section(out_dir, named.get("confusion_matrix"), known),
                    _figure_section(out_dir, named.get("score_histogram"), *_HISTOGRAM),
                ]
            ),
            _grid(
                [
                    _figure_section(out_dir, named.get("roc"), *_roc_texts(known.get("AUROC"))),
                    _per_type_section(
                        out_dir, named.get("per_type_recall"), per_type_recall, target_map
                    ),
                ]
            ),
            _pixel_section(pixel_metrics),
            _other_figures_section(out_dir, other_figures),
            gallery_section(
                out_dir, galleries, threshold, colour_bar=colour_bar, total=gallery_totals
            ),
            _model_card_section(model_card),
            history_section(history),
            _notes_section(notes),
        ]
    )
    return _write_document(out_dir, title, body)


def _write_document(out_dir: Path, title: str, body: str) -> Path:
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version = package_version()
    document = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="patchcore {esc(version)}">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header><div class="wrap"><h1>{esc(title)}</h1>
<p>PatchCore anomaly detection report &middot; generated {esc(generated)}</p></div></header>
<main class="wrap">
{body}
</main>
<footer class="wrap">patchcore {esc(version)} &middot; scores: higher = more anomalous
&middot; positive class = anomalous</footer>
</body>
</html>
"""
    path = out_dir / "report.html"
    path.write_text(document, encoding="utf-8")
    return path
