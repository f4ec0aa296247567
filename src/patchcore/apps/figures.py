"""Evaluation charts as PNG files: score histogram, ROC curve, confusion matrix, recall per
defect type (and the colour bar of the report's galleries).

Figures are drawn on :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, so no
screen and no pyplot global state are involved (safe to call from a server or a worker thread).
Conventions: scores are "higher = more anomalous"; label 1 = anomalous. Pictures of images
(overlays, tiles) are in :mod:`patchcore.apps.plots`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "PNG_SOFTWARE",
    "colour_bar_figure",
    "confusion_matrix_plot",
    "per_type_recall_plot",
    "roc_plot",
    "score_histogram",
]

DPI = 110
#: The PNG ``Software`` text entry of every picture written here (how a later run knows it may
#: replace the file).
PNG_SOFTWARE = "patchcore"
NORMAL_COLOR = "#2b7bba"
ANOMALOUS_COLOR = "#d7301f"
THRESHOLD_COLOR = "#222222"
NEUTRAL_COLOR = "#24527a"
PASS_COLOR = "#1a7f45"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _style_axes(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


def _save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white", metadata={"Software": PNG_SOFTWARE})
    return path


def score_histogram(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    threshold: float | None,
    path: str | Path,
    title: str = "Anomaly score distribution",
    *,
    bins: int = 40,
) -> Path:
    """Overlaid histograms of the scores of normal (label 0) and anomalous (label 1) images.

    Args:
        scores: ``(N,)`` image scores, higher = more anomalous.
        labels: ``(N,)`` ground truth, 1 = anomalous.
        threshold: decision threshold drawn as a vertical line (None: no line).
        path: PNG destination.
        title: figure title.
        bins: number of shared bins.

    Returns:
        ``path`` as a :class:`Path`.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    finite = np.isfinite(scores)
    values = scores[finite]
    if threshold is not None and np.isfinite(threshold):
        values = np.append(values, float(threshold))
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = _new_figure(6.4, 3.8)
    ax = fig.add_subplot()
    _style_axes(ax)
    for value, name, colour in ((0, "normal", NORMAL_COLOR), (1, "anomalous", ANOMALOUS_COLOR)):
        group = scores[finite & (labels == value)]
        ax.hist(
            group,
            bins=edges,
            color=colour,
            alpha=0.55,
            label=f"{name} (n={group.size})",
            edgecolor=colour,
            linewidth=0.6,
        )
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(
            float(threshold),
            color=THRESHOLD_COLOR,
            linestyle="--",
            linewidth=1.6,
            label=f"threshold = {float(threshold):.4g}",
        )
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _save_figure(fig, path)


def roc_plot(
    fpr: Sequence[float] | np.ndarray,
    tpr: Sequence[float] | np.ndarray,
    auc: float,
    path: str | Path,
    operating_point: tuple[float, float] | None = None,
) -> Path:
    """Receiver operating characteristic curve.

    Args:
        fpr: ``(K,)`` false positive rates, increasing.
        tpr: ``(K,)`` true positive rates.
        auc: area under the curve, shown in the title and legend.
        path: PNG destination.
        operating_point: ``(fpr, tpr)`` of the chosen threshold, marked on the curve.

    Returns:
        ``path`` as a :class:`Path`.
    """
    fpr = np.asarray(fpr, dtype=np.float64).ravel()
    tpr = np.asarray(tpr, dtype=np.float64).ravel()
    if fpr.shape != tpr.shape:
        raise ValueError(f"fpr {fpr.shape} and tpr {tpr.shape} differ in length")
    fig = _new_figure(4.8, 4.4)
    ax = fig.add_subplot()
    _style_axes(ax)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1.2, label="chance")
    ax.plot(fpr, tpr, color=ANOMALOUS_COLOR, linewidth=2.0, label=f"ROC (AUROC = {auc:.4f})")
    ax.fill_between(fpr, tpr, color=ANOMALOUS_COLOR, alpha=0.08, step=None)
    if operating_point is not None:
        op_fpr, op_tpr = (float(v) for v in operating_point)
        ax.plot(
            [op_fpr],
            [op_tpr],
            marker="o",
            markersize=8,
            color=THRESHOLD_COLOR,
            linestyle="none",
            label=f"threshold (FPR {op_fpr:.3f}, TPR {op_tpr:.3f})",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_title(f"ROC curve, AUROC = {auc:.4f}")
    ax.legend(loc="lower right", frameon=False, fontsize=9)
    return _save_figure(fig, path)


def confusion_matrix_plot(
    cm: Sequence[Sequence[int]] | np.ndarray,
    path: str | Path,
    class_names: tuple[str, str] = ("normal", "anomalous"),
) -> Path:
    """2x2 confusion matrix with counts and row percentages.

    Args:
        cm: ``(2, 2)`` counts, rows = true class, columns = predicted class, in
            ``class_names`` order, i.e. ``[[TN, FP], [FN, TP]]`` (sklearn's layout).
        path: PNG destination.
        class_names: names of class 0 and class 1.

    Returns:
        ``path`` as a :class:`Path`. Cells show the count and its share of the true class
        (the row), so the diagonal reads as specificity and recall.
    """
    cm = np.asarray(cm)
    if cm.shape != (2, 2):
        raise ValueError(f"cm must have shape (2, 2), got {cm.shape}")
    if len(class_names) != 2:
        raise ValueError(f"class_names must have 2 entries, got {class_names!r}")
    counts = cm.astype(np.int64)
    row_sums = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, row_sums, out=np.zeros((2, 2)), where=row_sums > 0)
    fig = _new_figure(4.6, 4.0)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    total = int(counts.sum())
    for i in range(2):
        for j in range(2):
            text_colour = "white" if share[i, j] > 0.55 else "#1a1a1a"
            ax.text(
                j,
                i - 0.08,
                f"{counts[i, j]:,}",
                ha="center",
                va="center",
                fontsize=17,
                fontweight="bold",
                color=text_colour,
            )
            pct = f"{100 * share[i, j]:.1f}%" if row_sums[i, 0] else "-"
            ax.text(j, i + 0.2, pct, ha="center", va="center", fontsize=10, color=text_colour)
    ax.set_xticks([0, 1], labels=list(class_names))
    ax.set_yticks([0, 1], labels=list(class_names), rotation=90, va="center")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({total:,} images)")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("share of the true class (row %)")
    return _save_figure(fig, path)


def per_type_recall_plot(
    recall_by_type: Mapping[str, float],
    path: str | Path,
    *,
    counts: Mapping[str, int] | None = None,
    target: float | None = None,
    title: str = "Recall per defect type",
) -> Path:
    """Horizontal bars of the recall (detection rate) per defect type.

    Args:
        recall_by_type: defect type -> recall in [0, 1] (NaN shown as "n/a"); drawn top to
            bottom in the mapping's order.
        path: PNG destination.
        counts: optional defect type -> number of test images, appended to the labels.
        target: optional required recall: bars at or above it are green, below it red, and
            it is drawn as a dashed line. Without it all bars share one neutral colour.
        title: figure title.

    Returns:
        ``path`` as a :class:`Path`.
    """
    names = list(recall_by_type)
    values = np.array([float(recall_by_type[n]) for n in names], dtype=np.float64)
    labels = [f"{n} (n={counts[n]})" if counts and n in counts else str(n) for n in names]
    fig = _new_figure(6.4, max(1.6, 0.9 + 0.42 * max(len(names), 1)))
    ax = fig.add_subplot()
    _style_axes(ax)
    ax.grid(True, axis="x", color="#e5e5e5")
    ax.grid(False, axis="y")
    positions = np.arange(len(names))
    shown = np.nan_to_num(values, nan=0.0)
    if target is None:
        colours = [NEUTRAL_COLOR] * len(names)
    else:
        colours = [PASS_COLOR if v >= target else ANOMALOUS_COLOR for v in shown]
    ax.barh(positions, shown, color=colours, height=0.62)
    if target is not None:
        ax.axvline(target, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2)
        ax.text(target, -0.6, f"target {target:.0%}", ha="center", va="bottom", fontsize=8)
    for y, value in zip(positions, values, strict=True):
        text = "n/a" if np.isnan(value) else f"{value:.1%}"
        ax.text(
            min(max(value, 0.0), 1.0) + 0.01 if not np.isnan(value) else 0.01,
            y,
            text,
            va="center",
            ha="left",
            fontsize=9,
        )
    ax.set_yticks(positions, labels=labels)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.12)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("recall (share of defective images flagged)")
    ax.set_title(title)
    return _save_figure(fig, path)


def colour_bar_figure(
    display_range: tuple[float, float] | None,
    path: str | Path,
    *,
    cmap: str = "jet",
    label: str = "anomaly-map value",
) -> Path:
    """A horizontal colour bar of the heatmaps' shared colour range, as a PNG.

    Args:
        display_range: ``(lo, hi)`` map values drawn as the coldest / hottest colour (values
            outside are clamped); None: each heatmap used its own range (the bar is labelled
            "low" to "high").
        path: PNG destination.
        cmap: the heatmaps' colour map.
        label: the axis label.
    """
    fig = _new_figure(6.4, 0.95)
    ax = fig.add_subplot()
    ax.imshow(np.linspace(0.0, 1.0, 256)[None, :], aspect="auto", cmap=cmap,
              extent=(0.0, 1.0, 0.0, 1.0))  # fmt: skip
    ax.set_yticks([])
    if display_range is None:
        ax.set_xticks([0.0, 1.0], labels=["low (each map its own)", "high"])
    else:
        lo, hi = (float(v) for v in display_range)
        ticks = np.linspace(0.0, 1.0, 5)
        ax.set_xticks(ticks, labels=[f"{lo + t * (hi - lo):.4g}" for t in ticks])
        label += " (clamped at both ends)"
    ax.set_xlabel(label, fontsize=9)
    ax.tick_params(labelsize=8)
    return _save_figure(fig, path)
