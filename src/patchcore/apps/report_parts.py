"""Parts of the HTML report (:mod:`patchcore.apps.report`): its style sheet, the small HTML
helpers every section uses, and the sections about the images and the threshold: the
galleries (every tile of a group, the first ones shown and the rest behind a "show" switch,
with the heatmaps' colour bar), the warnings box and the threshold history.

No JavaScript: the switches are ``<details>`` elements, so the report works from disk.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from patchcore.lean.record import ANOMALOUS, judge
from patchcore.lean.util import fmt

__all__ = [
    "CSS",
    "GALLERIES",
    "GALLERY_VISIBLE",
    "esc",
    "fmt_value",
    "gallery_section",
    "history_section",
    "is_number",
    "local_src",
    "section",
    "warnings_section",
]

#: Tiles of a gallery group shown at once; the others open with the group's "show" switch.
GALLERY_VISIBLE = 6

#: Gallery key -> (heading, explanation, the prediction was correct).
GALLERIES: dict[str, tuple[str, str, bool]] = {
    "true_positives": ("True positives", "anomalous images flagged as anomalous", True),
    "true_negatives": ("True negatives", "normal images passed as normal", True),
    "false_positives": ("False positives", "normal images flagged as anomalous", False),
    "false_negatives": ("False negatives", "anomalous images the detector missed", False),
}

CSS = """
:root {
  --ink: #1d2330; --muted: #5f6b7a; --line: #dde2e8; --bg: #f3f5f8; --card: #ffffff;
  --accent: #24527a; --ok: #1a7f45; --low: #2b7bba; --ok-bg: #e6f4ea;
  --bad: #c0392b; --bad-bg: #fbe9e7; --warn: #8a5a00; --warn-bg: #fff6dd;
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
section.warn { background: var(--warn-bg); border-color: #efd08a; }
section.warn h2 { color: var(--warn); border-bottom-color: #efd08a; }
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
tr.current td { font-weight: 600; }
.scroll { overflow-x: auto; }
table.kv { max-width: 720px; }
table.kv th { width: 40%; color: var(--ink); background: none; font-size: 14px; font-weight: 500; }
table.kv td { word-break: break-word; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 13px; }
figure.fig { margin: 0; text-align: center; }
figure.fig img { max-width: 100%; height: auto; }
figure.colourbar { margin: 0 0 8px; }
figure.colourbar img { display: block; max-width: 520px; width: 100%; height: auto; }
.bar { background: #edf0f3; border-radius: 3px; height: 12px; min-width: 120px; }
.bar span { display: block; height: 12px; border-radius: 3px; background: var(--accent); }
.bar span.pass { background: var(--ok); }
.bar span.fail { background: var(--bad); }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr));
  gap: 12px; align-items: start; }
.tile { margin: 0; border: 1px solid var(--line); border-radius: 6px; overflow: hidden;
  background: #fafbfc; }
.tile img { display: block; width: 100%; height: auto; }
.tile .nn { border-top: 1px solid var(--line); background: #fff; }
.tile .nn img { width: auto; max-width: 100%; margin: 0 auto; }
.tile figcaption { padding: 6px 9px 8px; font-size: 12.5px; }
.tile .cap { display: block; overflow-wrap: anywhere; }
.tile .nn-cap { display: block; padding: 4px 9px 0; font-size: 11.5px; color: var(--muted);
  overflow-wrap: anywhere; }
.tile .note { display: block; color: var(--warn); font-weight: 600; }
.tile .score { display: block; font-variant-numeric: tabular-nums; color: var(--muted); }
.tile .score b.hi { color: var(--bad); }
.tile .score b.lo { color: var(--low); }
details.more { margin-top: 10px; }
details.more > summary { cursor: pointer; color: var(--accent); font-weight: 600;
  margin-bottom: 10px; }
h3 .count { color: var(--muted); font-weight: 400; font-size: 13px; }
h3.ok { color: var(--ok); }
h3.err { color: var(--bad); }
.empty { color: var(--muted); font-style: italic; }
ul.notes { margin: 0; padding-left: 20px; }
footer { color: var(--muted); font-size: 12px; padding: 8px 0 28px; }
@media print { body { background: #fff; } section { break-inside: avoid; }
  details.more > summary { display: none; } details.more > .gallery { display: grid; } }
"""


def esc(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes too)."""
    return html.escape(str(value), quote=True)


def is_number(value: Any) -> bool:
    """True for real scalars (Python or numpy), False for bools and everything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def fmt_value(value: Any, digits: int = 4) -> str:
    """Format a value for display (see :func:`patchcore.lean.util.fmt`); None as an em dash."""
    return fmt(value, digits, missing="\u2014")


def local_src(out_dir: Path, path: str | Path, what: str) -> str:
    """Escaped relative URL of an existing file inside ``out_dir``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it lies outside ``out_dir`` (the report would not be self-contained).
    """
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
    return esc(quote(relative.as_posix(), safe="/"))


def section(title: str, body: str, anchor: str, subtitle: str | None = None, cls: str = "") -> str:
    """One ``<section>`` with its heading (and a subtitle line)."""
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    klass = f' class="{esc(cls)}"' if cls else ""
    return f'<section id="{anchor}"{klass}><h2>{esc(title)}</h2>{sub}{body}</section>'


def warnings_section(warnings: Sequence[str] | None) -> str:
    """The warnings box (calibration warnings, images left out...); empty without any."""
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return section(
        "Warnings",
        f'<ul class="notes">{items}</ul>',
        "warnings",
        "Read these before trusting the figures below.",
        cls="warn",
    )


#: Threshold history columns: (entry key, heading, numeric).
_HISTORY_COLUMNS = (
    ("time", "time (UTC)", False),
    ("method", "method", False),
    ("data", "data", False),
    ("seed", "split seed", True),
    ("images", "images", True),
    ("value", "threshold", True),
    ("warnings", "warnings", False),
)


def _history_cell(key: str, entry: Mapping[str, Any]) -> str:
    value = entry.get(key)
    if key == "warnings":
        return esc("; ".join(value)) if value else "none"
    if key == "data" and isinstance(value, str):
        return esc(Path(value).name or value)
    if key == "images" and value is not None and entry.get("normal") is not None:
        return esc(f"{value} ({entry['normal']} normal, {entry.get('anomalous', 0)} anomalous)")
    return esc(fmt_value(value, 6) if is_number(value) else fmt_value(value))


def history_section(history: Sequence[Mapping[str, Any]] | None) -> str:
    """The model's threshold history, oldest first, the current threshold last (in bold)."""
    if not history:
        return ""
    head = "".join(
        f"<th{' class=num' if num else ''}>{esc(title)}</th>" for _, title, num in _HISTORY_COLUMNS
    )
    rows = []
    for k, entry in enumerate(history):
        cells = "".join(
            f"<td{' class=num' if num else ''}>{_history_cell(key, entry)}</td>"
            for key, _, num in _HISTORY_COLUMNS
        )
        current = ' class="current"' if k == len(history) - 1 else ""
        rows.append(f"<tr{current}>{cells}</tr>")
    body = (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    return section(
        "Threshold history",
        body,
        "history",
        "Every threshold this model has had, oldest first; the last one (bold) is in use.",
    )


def _score_html(score: Any, threshold: Any) -> str:
    if not is_number(score):
        return ""
    if not (is_number(threshold) and not math.isnan(float(threshold))):
        return f'<span class="score">score <b>{esc(fmt_value(score))}</b></span>'
    high = judge([score], threshold)[0] == ANOMALOUS
    return (
        f'<span class="score">score <b class="{"hi" if high else "lo"}">'
        f"{esc(fmt_value(score))}</b> {'&ge;' if high else '&lt;'} threshold "
        f"{esc(fmt_value(threshold))}</span>"
    )


def _tile(out_dir: Path, item: Mapping[str, Any], what: str, threshold: Any) -> str:
    caption = item.get("caption", "")
    src = local_src(out_dir, item["image_path"], what)
    nearest = ""
    if item.get("explanation_path"):  # the worst patch beside the nearest normal one
        nn_src = local_src(out_dir, item["explanation_path"], f"{what} explanation")
        nn_cap = str(item.get("explanation_caption", ""))
        nearest = (
            f'<div class="nn"><img src="{nn_src}" alt="{esc(nn_cap)}" loading="lazy"></div>'
            f'<span class="nn-cap">{esc(nn_cap)}</span>'
        )
    note = f'<span class="note">{esc(item["note"])}</span>' if item.get("note") else ""
    return (
        f'<figure class="tile"><img src="{src}" alt="{esc(caption)}" loading="lazy">{nearest}'
        f'<figcaption><span class="cap">{esc(caption)}</span>{note}'
        f"{_score_html(item.get('score'), threshold)}</figcaption></figure>"
    )


def _group(
    out_dir: Path, heading: str, items: Sequence[Mapping[str, Any]], threshold: Any, visible: int
) -> str:
    """A gallery group's tiles: the first ``visible`` shown, the others behind a switch."""
    tiles = [_tile(out_dir, it, f"{heading} tile {i}", threshold) for i, it in enumerate(items)]
    if not tiles:
        return '<p class="empty">No images in this group.</p>'
    html_ = f'<div class="gallery">{"".join(tiles[:visible])}</div>'
    if len(tiles) > visible:
        html_ += (
            f'<details class="more"><summary>Show the other {len(tiles) - visible} '
            f"({esc(heading.lower())} {visible + 1}-{len(tiles)})</summary>"
            f'<div class="gallery">{"".join(tiles[visible:])}</div></details>'
        )
    return html_


def gallery_section(
    out_dir: Path,
    galleries: Mapping[str, Sequence[Mapping[str, Any]]],
    threshold: Any,
    *,
    colour_bar: str | Path | None = None,
    visible: int = GALLERY_VISIBLE,
    total: Mapping[str, int] | None = None,
) -> str:
    """The galleries: one group per outcome (:data:`GALLERIES` first, then any other), each
    tile the image and its overlay, under the heatmaps' colour bar.

    Args:
        out_dir: the report folder (every picture lies inside it).
        galleries: group -> tiles ``{"image_path", "caption", "score"}`` and optionally
            ``"note"`` (one highlighted line, e.g. an out-of-distribution hint),
            ``"explanation_path"`` and ``"explanation_caption"``.
        threshold: the verdict threshold (scores are shown against it).
        colour_bar: the colour bar picture of the heatmaps' shared range.
        visible: tiles shown per group before its "show the other N" switch.
        total: group -> images in that group, when a group shows fewer tiles than it has.
    """
    if not galleries:
        return ""
    ordered = [
        (key, heading, explanation, correct, galleries[key])
        for key, (heading, explanation, correct) in GALLERIES.items()
        if key in galleries
    ]
    for name, items in galleries.items():
        if name not in GALLERIES:
            anchor = re.sub(r"[^0-9a-z]", "", str(name).lower()) or "gallery"
            ordered.append((anchor, str(name), "", None, items))
    blocks = []
    if colour_bar is not None:
        src = local_src(out_dir, colour_bar, "colour bar")
        blocks.append(
            f'<figure class="colourbar"><img src="{src}" alt="heatmap colour scale"></figure>'
        )
    for key, heading, explanation, correct, items in ordered:
        cls = "" if correct is None else (' class="ok"' if correct else ' class="err"')
        n = (total or {}).get(key, len(items))
        shown = f"{n} image{'' if n == 1 else 's'}"
        if n > len(items):
            shown += f", {len(items)} shown"
        count = f'<span class="count"> &middot; {shown}'
        count += f" &middot; {esc(explanation)}</span>" if explanation else "</span>"
        blocks.append(
            f'<h3 id="gallery-{esc(key)}"{cls}>{esc(heading)}{count}</h3>'
            + _group(out_dir, heading, items, threshold, visible)
        )
    return section(
        "Galleries",
        "".join(blocks),
        "galleries",
        "Each tile: the image, then its anomaly map over it (one colour scale for all, the bar "
        "above: blue = low, red = high); magenta boxes: defect regions; white outlines: "
        "ground-truth defects. Flagged images also show their worst patch (red) beside the "
        "nearest normal training patch (green).",
    )
