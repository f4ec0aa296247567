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
import html
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from patchcore.core.metrics import MATLAB_METRICS, Metrics
from patchcore.lean.record import ANOMALOUS, judge
from patchcore.lean.util import fmt, package_version

__all__ = ["MATLAB_METRICS", "write_report"]

_KNOWN_METRICS = (*MATLAB_METRICS, "AUROC", "Threshold", "ConfusionMatrix")
_TARGET_METRICS = (*MATLAB_METRICS, "AUROC")
_LOWER_IS_BETTER = {"FalsePositiveRate", "FalseNegativeRate"}
_FIGURES = ("confusion_matrix", "score_histogram", "roc", "per_type_recall")

# Gallery key -> (heading, explanation, the prediction was correct).
_GALLERIES: dict[str, tuple[str, str, bool]] = {
    "true_positives": ("True positives", "anomalous images flagged as anomalous", True),
    "true_negatives": ("True negatives", "normal images passed as normal", True),
    "false_positives": ("False positives", "normal images flagged as anomalous", False),
    "false_negatives": ("False negatives", "anomalous images the detector missed", False),
}
_CSS = """
:root {
  --ink: #1d2330; --muted: #5f6b7a; --line: #dde2e8; --bg: #f3f5f8; --card: #ffffff;
  --accent: #24527a; --ok: #1a7f45; --low: #2b7bba; --ok-bg: #e6f4ea;
  --bad: #c0392b; --bad-bg: #fbe9e7;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 "Segoe UI", "Helvetica Neue", Roboto, "DejaVu Sans", Arial, sans-serif; }
header { background: var(--accent); color: #fff; padding: 22px 0 18px; }
header h1 { margin: 0; font-size: 26px; font-weight: 600; letter-spacing: .2px; }
header p { margin: 4px 0 0; color: #d5e2ee; font-size: 13px; }
.wrap { max-width: 1220px; margin: 0 auto; padding: 0 24px; }
main.wrap { padding-top: 20px; padding-bottom: 32px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 20px 18px; margin: 0 0 18px; min-width: 0; }
h2 { font-size: 18px; font-weight: 600; margin: 0 0 12px; padding-bottom: 8px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; font-weight: 600; margin: 18px 0 4px; }
.sub { color: var(--muted); font-size: 13px; margin: 0 0 10px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr));
  gap: 18px; margin-bottom: 18px; }
.grid2 > section { margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; }
.kpi { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fafbfc; }
.kpi .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .6px; }
.kpi .value { font-size: 30px; font-weight: 600; line-height: 1.2; margin-top: 2px;
  font-variant-numeric: tabular-nums; }
.kpi .hint { color: var(--muted); font-size: 12px; }
.kpi.pass { border-color: #9fd3b1; background: var(--ok-bg); }
.kpi.fail { border-color: #f0b4ab; background: var(--bad-bg); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 11px;
  font-weight: 700; letter-spacing: .5px; vertical-align: middle; }
.badge.pass { background: var(--ok); color: #fff; }
.badge.fail { background: var(--bad); color: #fff; }
.verdict { margin: 14px 0 0; padding: 10px 14px; border-radius: 6px; font-weight: 600; }
.verdict.pass { background: var(--ok-bg); color: var(--ok); }
.verdict.fail { background: var(--bad-bg); color: var(--bad); }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 7px 10px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { font-weight: 600; font-size: 13px; color: var(--muted); background: #f7f9fb; }
td.num, th.num { text-align: right; }
td.pass { color: var(--ok); font-weight: 600; }
td.fail { color: var(--bad); font-weight: 600; }
.scroll { overflow-x: auto; }
table.kv { max-width: 720px; }
table.kv th { width: 40%; color: var(--ink); background: none; font-size: 14px; font-weight: 500; }
table.kv td { word-break: break-word; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 13px; }
figure.fig { margin: 0; text-align: center; }
figure.fig img { max-width: 100%; height: auto; }
.bar { background: #edf0f3; border-radius: 3px; height: 12px; min-width: 120px; }
.bar span { display: block; height: 12px; border-radius: 3px; background: var(--accent); }
.bar span.pass { background: var(--ok); }
.bar span.fail { background: var(--bad); }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr));
  gap: 12px; }
.tile { margin: 0; border: 1px solid var(--line); border-radius: 6px; overflow: hidden;
  background: #fafbfc; }
.tile .frame { height: 200px; display: flex; align-items: center; justify-content: center;
  background: #e9edf1; }
.tile .frame img { display: block; max-width: 100%; max-height: 100%; }
.tile figcaption { padding: 6px 9px 8px; font-size: 12.5px; }
.tile .cap { display: block; overflow-wrap: anywhere; }
.tile .frame.nn { height: 110px; border-top: 1px solid var(--line); }
.tile .nn-cap { display: block; padding: 4px 9px 0; font-size: 11.5px; color: var(--muted);
  overflow-wrap: anywhere; }
.tile .score { display: block; font-variant-numeric: tabular-nums; color: var(--muted); }
.tile .score b.hi { color: var(--bad); }
.tile .score b.lo { color: var(--low); }
h3 .count { color: var(--muted); font-weight: 400; font-size: 13px; }
h3.ok { color: var(--ok); }
h3.err { color: var(--bad); }
.empty { color: var(--muted); font-style: italic; }
ul.notes { margin: 0; padding-left: 20px; }
footer { color: var(--muted); font-size: 12px; padding: 8px 0 28px; }
@media print { body { background: #fff; } section { break-inside: avoid; } }
"""


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


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    """True for real scalars (Python or numpy), False for bools and everything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _fmt(value: Any, digits: int = 4) -> str:
    """Format a value for display (see :func:`patchcore.lean.util.fmt`); None as an em dash."""
    return fmt(value, digits, missing="\u2014")


def _fmt_plain(value: Any) -> str:
    """Format a configuration value: floats with up to 6 significant digits, no padding."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral | bool):
        return "n/a" if math.isnan(float(value)) else f"{float(value):.6g}"
    return _fmt(value)


def _passes(name: str, value: Any, targets: Mapping[str, float]) -> bool | None:
    """True / False against the target of ``name``; None when there is no target or value."""
    if name not in targets or not _is_number(value) or math.isnan(float(value)):
        return None
    if name in _LOWER_IS_BETTER:
        return float(value) <= targets[name]
    return float(value) >= targets[name]


def _target_text(name: str, targets: Mapping[str, float]) -> str:
    relation = "\u2264" if name in _LOWER_IS_BETTER else "\u2265"
    return f"target {relation} {_fmt(targets[name], 3)}"


def _src(out_dir: Path, path: str | Path, what: str) -> str:
    """Escaped relative URL of an existing file inside ``out_dir``."""
    candidate = Path(path)
    full = candidate if candidate.is_absolute() else out_dir / candidate
    if not full.is_file():
        raise FileNotFoundError(f"{what}: {full} does not exist; save it before writing the report")
    try:
        relative = full.resolve().relative_to(out_dir.resolve())
    except ValueError:
        raise ValueError(
            f"{what}: {full} is outside {out_dir}; save figures and tiles inside the report "
            "folder so the report stays self-contained"
        ) from None
    return _esc(quote(relative.as_posix(), safe="/"))


def _figure_html(out_dir: Path, path: str | Path, alt: str) -> str:
    return (
        f'<figure class="fig"><img src="{_src(out_dir, path, f"figure {alt!r}")}" '
        f'alt="{_esc(alt)}"></figure>'
    )


def _section(title: str, body: str, anchor: str, subtitle: str | None = None) -> str:
    sub = f'<p class="sub">{_esc(subtitle)}</p>' if subtitle else ""
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>{sub}{body}</section>'


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
            f'<div class="kpi{cls}"><div class="label">{_esc(label)}{badge}</div>'
            f'<div class="value">{_esc(_fmt(value, 3))}</div>'
            f'<div class="hint">{_esc(extra)}</div></div>'
        )
    cards.append(
        '<div class="kpi"><div class="label">Decision threshold</div>'
        f'<div class="value">{_esc(_fmt(threshold, 4) if threshold is not None else "—")}</div>'
        '<div class="hint">score &ge; threshold &rarr; anomalous</div></div>'
    )
    body = f'<div class="cards">{"".join(cards)}</div>'
    if targets:
        checked = {n: _passes(n, known.get(n), targets) for n in targets}
        missed = [n for n, ok in checked.items() if ok is False]
        unknown = [n for n, ok in checked.items() if ok is None]
        if missed:
            detail = ", ".join(
                f"{n} {_fmt(known.get(n), 3)} ({_target_text(n, targets)})" for n in missed
            )
            body += (
                f'<div class="verdict fail">FAIL: {len(missed)} of {len(checked)} targets '
                f"missed: {_esc(detail)}</div>"
            )
        else:
            note = f" ({len(unknown)} not measured: {', '.join(unknown)})" if unknown else ""
            body += (
                f'<div class="verdict pass">PASS: all {len(checked) - len(unknown)} measured '
                f"targets met{_esc(note)}</div>"
            )
    return _section("Summary", body, "summary")


def _metrics_table(
    known: Mapping[str, Any], others: Mapping[str, Any], targets: Mapping[str, float]
) -> str:
    head = "".join(f'<th class="num">{_esc(n)}</th>' for n in MATLAB_METRICS)
    cells = []
    for name in MATLAB_METRICS:
        verdict = _passes(name, known.get(name), targets)
        cls = "num" if verdict is None else f"num {'pass' if verdict else 'fail'}"
        title = f' title="{_esc(_target_text(name, targets))}"' if name in targets else ""
        cells.append(f'<td class="{cls}"{title}>{_esc(_fmt(known.get(name)))}</td>')
    body = (
        '<div class="scroll"><table><thead><tr>'
        f"{head}</tr></thead><tbody><tr>{''.join(cells)}</tr></tbody></table></div>"
    )
    extra = {n: v for n, v in known.items() if n in ("AUROC", "Threshold")}
    extra.update(others)
    if extra:
        rows = "".join(
            f"<tr><th>{_esc(n)}</th><td>{_esc(_fmt(v))}</td></tr>" for n, v in extra.items()
        )
        body += f'<h3>Other metrics</h3><table class="kv">{rows}</table>'
    if targets:
        body += '<p class="sub">Green / red: meets / misses its target (hover for the target).</p>'
    return _section(
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
        return f'<p class="empty">{_esc(_fmt(cm))}</p>'
    return (
        '<table><thead><tr><th>true \\ predicted</th><th class="num">normal</th>'
        '<th class="num">anomalous</th></tr></thead><tbody>'
        f'<tr><th>normal</th><td class="num">{_esc(_fmt(tn))}</td>'
        f'<td class="num fail">{_esc(_fmt(fp))}</td></tr>'
        f'<tr><th>anomalous</th><td class="num fail">{_esc(_fmt(fn))}</td>'
        f'<td class="num">{_esc(_fmt(tp))}</td></tr></tbody></table>'
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
            if _is_number(recall) and not math.isnan(float(recall)):
                width = min(max(float(recall), 0.0), 1.0) * 100
            count_cell = f'<td class="num">{_esc(_fmt(count))}</td>' if has_counts else ""
            rows.append(
                f"<tr><th>{_esc(name)}</th>{count_cell}"
                f'<td class="num {cls}">{_esc(_fmt(recall, 3))}</td>'
                f'<td style="width:45%"><div class="bar"><span class="{cls}" '
                f'style="width:{width:.1f}%"></span></div></td></tr>'
            )
        parts.append(
            f'<table><thead><tr><th>defect type</th>{head}<th class="num">recall</th><th></th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    if not parts:
        return ""
    return _section(
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
        if _is_number(value):
            cards.append(
                f'<div class="kpi"><div class="label">{_esc(name)}</div>'
                f'<div class="value">{_esc(_fmt(value, 3))}</div></div>'
            )
        else:
            rows.append(f"<tr><th>{_esc(name)}</th><td>{_esc(_fmt(value))}</td></tr>")
    body = f'<div class="cards">{"".join(cards)}</div>' if cards else ""
    if rows:
        body += f'<table class="kv">{"".join(rows)}</table>'
    if not body:
        body = '<p class="empty">No pixel-level metrics.</p>'
    return _section(
        "Pixel-level localisation",
        body,
        "pixel",
        "Anomaly maps against ground-truth defect masks (AUROC over pixels, AUPRO over "
        "defect regions).",
    )


def _gallery_section(
    out_dir: Path, galleries: Mapping[str, Sequence[Mapping[str, Any]]], threshold: Any
) -> str:
    if not galleries:
        return ""
    ordered: list[tuple[str, str, str, bool | None, Sequence[Mapping[str, Any]]]] = [
        (key, heading, explanation, correct, galleries[key])
        for key, (heading, explanation, correct) in _GALLERIES.items()
        if key in galleries
    ]
    for name, items in galleries.items():
        if name not in _GALLERIES:
            anchor = re.sub(r"[^0-9a-z]", "", str(name).lower()) or "gallery"
            ordered.append((anchor, str(name), "", None, items))
    has_threshold = _is_number(threshold) and not math.isnan(float(threshold))
    blocks = []
    for anchor, heading, explanation, correct, items in ordered:
        cls = "" if correct is None else (' class="ok"' if correct else ' class="err"')
        count = f'<span class="count"> &middot; {len(items)} shown'
        count += f" &middot; {_esc(explanation)}</span>" if explanation else "</span>"
        tiles = []
        for i, item in enumerate(items):
            caption = item.get("caption", "")
            src = _src(out_dir, item["image_path"], f"{heading} tile {i}")
            score = item.get("score")
            score_html = ""
            if _is_number(score):
                if has_threshold:
                    high = judge([score], threshold)[0] == ANOMALOUS
                    score_html = (
                        f'<span class="score">score <b class="{"hi" if high else "lo"}">'
                        f"{_esc(_fmt(score))}</b> {'&ge;' if high else '&lt;'} threshold "
                        f"{_esc(_fmt(threshold))}</span>"
                    )
                else:
                    score_html = f'<span class="score">score <b>{_esc(_fmt(score))}</b></span>'
            nearest = ""
            if item.get("explanation_path"):  # the worst patch beside the nearest normal one
                nn_src = _src(out_dir, item["explanation_path"], f"{heading} explanation {i}")
                nn_cap = str(item.get("explanation_caption", ""))
                nearest = (
                    f'<div class="frame nn"><img src="{nn_src}" alt="{_esc(nn_cap)}" '
                    f'loading="lazy"></div><span class="nn-cap">{_esc(nn_cap)}</span>'
                )
            tiles.append(
                f'<figure class="tile"><div class="frame">'
                f'<img src="{src}" alt="{_esc(caption)}" loading="lazy"></div>{nearest}'
                f'<figcaption><span class="cap">{_esc(caption)}</span>{score_html}'
                "</figcaption></figure>"
            )
        grid = (
            f'<div class="gallery">{"".join(tiles)}</div>'
            if tiles
            else '<p class="empty">No images in this group.</p>'
        )
        blocks.append(f'<h3 id="gallery-{_esc(anchor)}"{cls}>{_esc(heading)}{count}</h3>{grid}')
    return _section(
        "Galleries",
        "".join(blocks),
        "galleries",
        "Each tile: the image, then its anomaly map (shared colour scale, blue = low, "
        "red = high); ground-truth defects outlined where available. Flagged images also "
        "show their worst patch (red) beside the nearest normal training patch (green).",
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
        return _section("Model card", '<p class="empty">No model information.</p>', "model")
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt_plain(v))}</td></tr>"
        for k, v in _flatten(model_card)
    )
    return _section("Model card", f'<table class="kv">{rows}</table>', "model")


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
        f"AUROC = {_fmt(auroc)}" if auroc is not None else None,
    )


def _figure_section(
    out_dir: Path, path: str | Path | None, alt: str, title: str, anchor: str, sub: str | None
) -> str:
    """A section holding one figure; empty without the figure."""
    if path is None:
        return ""
    return _section(title, _figure_html(out_dir, path, alt), anchor, sub)


def _confusion_section(out_dir: Path, figure: str | Path | None, known: Mapping[str, Any]) -> str:
    """The confusion-matrix figure, else a table of ``ConfusionMatrix``, else nothing."""
    if figure is not None:
        body = _figure_html(out_dir, figure, "Confusion matrix")
    elif "ConfusionMatrix" in known:
        body = _confusion_table(known["ConfusionMatrix"])
    else:
        return ""
    return _section(
        "Confusion matrix", body, "confusion", "Rows: true class; columns: predicted class."
    )


def _other_figures_section(out_dir: Path, figures: Mapping[str, str | Path]) -> str:
    if not figures:
        return ""
    blocks = "".join(
        f"<div><h3>{_esc(name)}</h3>{_figure_html(out_dir, path, name)}</div>"
        for name, path in figures.items()
    )
    return _section("Other figures", f'<div class="grid2">{blocks}</div>', "other")


def _notes_section(notes: Sequence[str] | None) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{_esc(n)}</li>" for n in notes)
    return _section("Notes", f'<ul class="notes">{items}</ul>', "notes")


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
        galleries: group -> list of ``{"image_path", "caption", "score"}``; groups
            ``true_positives``, ``true_negatives``, ``false_positives``,
            ``false_negatives`` get their own headings, in that order; others follow.
        per_type_recall: defect type -> recall, or -> ``{"recall", "n"}``.
        pixel_metrics: label -> value, e.g. ``{"PixelAUROC": 0.97, "AUPRO": 0.91}``.
        notes: free-text remarks shown at the end.
        targets: optional metric key -> required value (e.g. ``{"Recall": 0.95}``); drives
            the pass / fail colours and the summary verdict. FalsePositiveRate and
            FalseNegativeRate pass when at or below their target, the others at or above.

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
    for name in targets or {}:
        if name not in _TARGET_METRICS:
            raise ValueError(
                f"unknown target metric {name!r}; use one of {', '.join(_TARGET_METRICS)}"
            )
    target_map = {str(k): float(v) for k, v in (targets or {}).items()}
    threshold = known.get("Threshold", model_card.get("threshold"))
    named = {k: v for k, v in figures.items() if k in _FIGURES}
    other_figures = {str(k): v for k, v in figures.items() if k not in _FIGURES}

    body = "".join(
        [
            _summary(known, threshold, target_map),
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
            _gallery_section(out_dir, galleries, threshold),
            _model_card_section(model_card),
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
<meta name="generator" content="patchcore {_esc(version)}">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><div class="wrap"><h1>{_esc(title)}</h1>
<p>PatchCore anomaly detection report &middot; generated {_esc(generated)}</p></div></header>
<main class="wrap">
{body}
</main>
<footer class="wrap">patchcore {_esc(version)} &middot; scores: higher = more anomalous
&middot; positive class = anomalous</footer>
</body>
</html>
"""
    path = out_dir / "report.html"
    path.write_text(document, encoding="utf-8")
    return path
