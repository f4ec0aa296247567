"""Anomaly-map overlays and evaluation figures, written as PNG files.

Everything here takes plain numpy data and knows nothing about the detector. Figures are
drawn on :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, so no screen
and no pyplot global state are involved (safe to call from a server or a worker thread).

Conventions: images are ``uint8`` arrays ``(H, W)`` or ``(H, W, 3)``; anomaly maps are
float arrays ``(H, W)``; scores are "higher = more anomalous"; label 1 = anomalous.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

from patchcore.lean.record import ANOMALOUS, judge
from patchcore.lean.util import resize_map, resize_mask

__all__ = [
    "PNG_SOFTWARE",
    "anomaly_map_overlay",
    "confusion_matrix_plot",
    "draw_regions",
    "crop_around",
    "explanation_pair",
    "gallery_tile",
    "per_type_recall_plot",
    "roc_plot",
    "save_png",
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
OK_RGB = (26, 152, 80)
BAD_RGB = (215, 48, 31)
#: Colour of defect-region boxes: magenta, which 'jet' never shows (mask outlines are white).
REGION_RGB = (255, 0, 255)


@lru_cache(maxsize=8)
def _colormap_lut(name: str) -> np.ndarray:
    """Return a ``(256, 3)`` uint8 lookup table for a matplotlib colour map."""
    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    lut = np.round(rgba[:, :3] * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate a uint8 image and return it as ``(H, W, 3)`` uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8, got dtype {image.dtype}; convert it with "
            "np.clip(x, 0, 255).astype(np.uint8) (or x * 255 for images in [0, 1])"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"image must have shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")


def _normalise(anomaly_map: np.ndarray, display_range: tuple[float, float] | None) -> np.ndarray:
    """Clamp a map to ``display_range`` and scale it to [0, 1]; NaN maps to 0."""
    if display_range is None:
        finite = np.isfinite(anomaly_map)
        if not finite.any():
            return np.zeros(anomaly_map.shape, dtype=np.float32)
        lo, hi = float(anomaly_map[finite].min()), float(anomaly_map[finite].max())
    else:
        lo, hi = (float(v) for v in display_range)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise ValueError(
                f"display_range must be finite (lo, hi) with lo <= hi, got {display_range!r}"
            )
    span = hi - lo
    if span <= 0:
        # A given flat range is a hard cut (at or above = hottest); a flat map is all cold.
        if display_range is None:
            return np.zeros(anomaly_map.shape, dtype=np.float32)
        return (anomaly_map >= hi).astype(np.float32)
    with np.errstate(invalid="ignore"):
        norm = np.clip((anomaly_map.astype(np.float32) - lo) / span, 0.0, 1.0)
    norm[np.isnan(norm)] = 0.0  # NaN is cold; +inf / -inf clamp to the ends
    return norm


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Inner outline of a binary mask.

    Args:
        mask: bool ``(H, W)``.
        width: outline thickness in pixels (>= 1).

    Returns:
        bool ``(H, W)``, True on the ``width`` outermost pixels of each region (regions that
        touch the image border are outlined along the border too).
    """
    mask = np.asarray(mask, dtype=bool)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~eroded


def anomaly_map_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    display_range: tuple[float, float] | None = None,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
    *,
    cmap: str = "jet",
    outline_color: tuple[int, int, int] = (255, 255, 255),
    outline_width: int = 2,
) -> np.ndarray:
    """Blend a colour-mapped anomaly map over an image.

    Args:
        image: uint8 ``(H, W)`` (grey, converted to RGB) or ``(H, W, 3)``.
        anomaly_map: float ``(h, w)``; resized bilinearly to ``(H, W)`` when sizes differ.
        display_range: ``(lo, hi)`` map values shown as the coldest / hottest colour; values
            outside are clamped. Use one range for a whole data set so colours compare
            across images. Defaults to this map's own min / max.
        alpha: weight of the colour map in the blend, in [0, 1].
        mask: optional ground-truth bool ``(h, w)``; its outline is drawn in
            ``outline_color`` (resized with nearest neighbour when sizes differ).
        cmap: matplotlib colour map name.
        outline_color: RGB of the mask outline (white does not occur in 'jet').
        outline_width: outline thickness in pixels.

    Returns:
        uint8 ``(H, W, 3)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    amap = np.asarray(anomaly_map)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must have shape (H, W), got {amap.shape}")
    amap = resize_map(amap.astype(np.float32, copy=False), (height, width))
    index = np.round(_normalise(amap, display_range) * 255.0).astype(np.uint8)
    colours = _colormap_lut(cmap)[index]
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
    out = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    if mask is not None:
        mask_arr = np.asarray(mask)
        if mask_arr.ndim == 3:
            mask_arr = mask_arr[..., 0]
        if mask_arr.ndim != 2:
            raise ValueError(f"mask must have shape (H, W), got {np.asarray(mask).shape}")
        outline = mask_outline(resize_mask(mask_arr > 0, (height, width)), outline_width)
        out[outline] = np.asarray(outline_color, dtype=np.uint8)
    return out


def draw_regions(
    image: np.ndarray,
    regions: Sequence,
    map_shape: tuple[int, int],
    *,
    color: tuple[int, int, int] = REGION_RGB,
    width: int = 2,
) -> np.ndarray:
    """Draw the bounding boxes of defect regions on a copy of an image.

    Args:
        image: uint8 ``(H, W)`` or ``(H, W, 3)``.
        regions: :class:`patchcore.lean.regions.Region` records (anything with ``x0, y0, x1,
            y1``) in the pixels of a map of ``map_shape``; boxes are scaled to the image.
        map_shape: ``(h, w)`` of the map the regions were found on.
        color: RGB of the boxes.
        width: line width in pixels (>= 1).

    Returns:
        uint8 ``(H, W, 3)``.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    rgb = _as_rgb(image).copy()
    if not regions:
        return rgb
    height, wide = rgb.shape[:2]
    sy, sx = height / map_shape[0], wide / map_shape[1]
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    for r in regions:
        x0, y0 = int(r.x0 * sx), int(r.y0 * sy)
        x1 = max(x0, min(wide, round(r.x1 * sx)) - 1)  # exclusive -> last pixel
        y1 = max(y0, min(height, round(r.y1 * sy)) - 1)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
    return np.asarray(canvas)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3|4)`` array as PNG (tagged :data:`PNG_SOFTWARE`);
    create parent folders."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"array must be uint8, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"array must have shape (H, W) or (H, W, 3|4), got {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    Image.fromarray(array).save(path, format="PNG", pnginfo=info)
    return path


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


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font.
        return ImageFont.load_default()


def gallery_tile(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    display_range: tuple[float, float] | None,
    score: float,
    threshold: float | None,
    caption: str,
    mask: np.ndarray | None = None,
    *,
    alpha: float = 0.5,
    gap: int = 4,
    height: int | None = None,
    annotate: bool = True,
    regions: Sequence | None = None,
) -> np.ndarray:
    """Original and overlay side by side, under a caption band with score vs threshold.

    Args:
        image: uint8 ``(H, W)`` or ``(H, W, 3)``.
        anomaly_map: float ``(h, w)``.
        display_range: shared ``(lo, hi)`` of the colour map, see :func:`anomaly_map_overlay`.
        score: image score, higher = more anomalous.
        threshold: decision threshold; the score line is red when ``score >= threshold``,
            green otherwise (None: no verdict).
        caption: first line of the band (e.g. file name and true label), shortened with
            an ellipsis when too long.
        mask: optional ground-truth bool mask, outlined on the overlay.
        alpha: overlay weight.
        gap: white pixels between the two panels.
        height: resize both panels to this height, keeping the aspect ratio.
        annotate: draw the caption band; False returns only the two panels (e.g. when an
            HTML report prints the caption and score itself).
        regions: optional defect regions in ``anomaly_map``'s pixels, boxed on the overlay
            (see :func:`draw_regions`).

    Returns:
        uint8 ``(band + H', 2 * W' + gap, 3)``; ``band`` is 0 when ``annotate`` is False.
    """
    original = _as_rgb(image)
    overlay = anomaly_map_overlay(original, anomaly_map, display_range, alpha, mask)
    if regions:
        overlay = draw_regions(overlay, regions, np.asarray(anomaly_map).shape[-2:])
    if height is not None and height != original.shape[0]:
        if height < 1:
            raise ValueError(f"height must be >= 1, got {height}")
        new_width = max(1, round(original.shape[1] * height / original.shape[0]))
        original, overlay = (
            np.asarray(Image.fromarray(p).resize((new_width, height), Image.Resampling.BILINEAR))
            for p in (original, overlay)
        )
    h, w = original.shape[:2]
    font_size = 13 if 2 * w + gap >= 300 else 11
    band = 2 * (font_size + 5) + 6 if annotate else 0
    tile = np.full((band + h, 2 * w + gap, 3), 255, dtype=np.uint8)
    tile[band:, :w] = original
    tile[band:, w + gap :] = overlay
    if not annotate:
        return tile
    canvas = Image.fromarray(tile)
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    max_width = tile.shape[1] - 8
    draw.text((4, 3), _fit_text(draw, caption, font, max_width), fill=(20, 20, 20), font=font)
    if threshold is None:
        verdict, colour = f"score {score:.4g}", (20, 20, 20)
    else:
        flagged = judge([score], threshold)[0] == ANOMALOUS
        verdict = (
            f"{'ANOMALOUS' if flagged else 'normal'}: score {score:.4g} "
            f"{'>=' if flagged else '<'} {threshold:.4g}"
        )
        colour = BAD_RGB if flagged else OK_RGB
    draw.text(
        (4, 3 + font_size + 5), _fit_text(draw, verdict, font, max_width), fill=colour, font=font
    )
    return np.asarray(canvas)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``max_width`` pixels."""
    text = " ".join(str(text).split())
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def crop_around(
    image: np.ndarray, box: tuple[int, int, int, int], *, context: float = 2.0, min_side: int = 48
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A crop of ``image`` around ``box`` (``(top, left, bottom, right)``, pixels).

    The crop is ``context`` times the box's larger side (at least ``min_side``), square where
    the image allows, clipped to it.

    Returns:
        the crop (uint8, RGB) and the box in the crop's coordinates.
    """
    rgb = _as_rgb(image)
    top, left, bottom, right = box
    height, width = rgb.shape[:2]
    side = max(min_side, int(round(context * max(bottom - top, right - left))))
    cy, cx = (top + bottom) // 2, (left + right) // 2
    y0 = int(np.clip(cy - side // 2, 0, max(0, height - side)))
    x0 = int(np.clip(cx - side // 2, 0, max(0, width - side)))
    crop = rgb[y0 : y0 + side, x0 : x0 + side]
    return crop, (top - y0, left - x0, bottom - y0, right - x0)


def explanation_pair(
    image: np.ndarray,
    box: tuple[int, int, int, int],
    train_image: np.ndarray | None,
    train_box: tuple[int, int, int, int] | None,
    *,
    height: int = 160,
    gap: int = 4,
) -> np.ndarray:
    """The worst patch of an image beside the nearest normal training patch, as two crops.

    Args:
        image: the inspected image, uint8 ``(H, W)`` or ``(H, W, 3)``.
        box: its worst patch, ``(top, left, bottom, right)`` in its pixels (outlined red).
        train_image: the training image holding the nearest bank row; None when it cannot be
            shown (not reachable, or no provenance): a grey panel takes its place.
        train_box: that patch in the training image's pixels (outlined green).
        height: both crops are resized to this height.

    Returns:
        uint8 ``(height, W1 + gap + W2, 3)``.
    """
    panels = []
    for img, b, colour in ((image, box, BAD_RGB), (train_image, train_box, OK_RGB)):
        if img is None or b is None:
            panels.append(np.full((height, height, 3), 200, dtype=np.uint8))
            continue
        crop, (t, left, bottom, right) = crop_around(img, b)
        scale = height / crop.shape[0]
        w = max(1, round(crop.shape[1] * scale))
        canvas = Image.fromarray(crop).resize((w, height), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(canvas)
        draw.rectangle(
            [left * scale, t * scale, right * scale - 1, bottom * scale - 1],
            outline=colour,
            width=2,
        )
        panels.append(np.asarray(canvas))
    out = np.full((height, panels[0].shape[1] + gap + panels[1].shape[1], 3), 255, np.uint8)
    out[:, : panels[0].shape[1]] = panels[0]
    out[:, panels[0].shape[1] + gap :] = panels[1]
    return out
