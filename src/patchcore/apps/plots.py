"""Pictures of inspected images: anomaly-map overlays, the image | overlay | colour bar
picture of ``predict --heatmaps``, report gallery tiles, explanation crops; PNG writing.

Everything here takes plain numpy data and knows nothing about the detector; colours come from
the display range the caller passes (every surface takes it from
:func:`patchcore.lean.record.display_range`). The evaluation charts (histogram, ROC, confusion
matrix, recall per type) live in :mod:`patchcore.apps.figures` and are importable from here too.

Conventions: images are ``uint8`` arrays ``(H, W)`` or ``(H, W, 3)``; anomaly maps are
float arrays ``(H, W)``; scores are "higher = more anomalous"; label 1 = anomalous.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

from patchcore.apps.figures import (
    PNG_SOFTWARE,
    colour_bar_figure,
    confusion_matrix_plot,
    per_type_recall_plot,
    roc_plot,
    score_histogram,
)
from patchcore.lean.record import ANOMALOUS, judge
from patchcore.lean.util import resize_map, resize_mask

__all__ = [
    "PNG_SOFTWARE",
    "anomaly_map_overlay",
    "colour_bar",
    "colour_bar_figure",
    "confusion_matrix_plot",
    "draw_regions",
    "crop_around",
    "explanation_pair",
    "gallery_tile",
    "heatmap_picture",
    "per_type_recall_plot",
    "roc_plot",
    "save_png",
    "score_histogram",
]

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


#: Smallest panel height of :func:`heatmap_picture` (a thumbnail is enlarged, pixel for pixel).
MIN_PICTURE_HEIGHT = 160


def _map_range(
    anomaly_map: np.ndarray, display_range: tuple[float, float] | None
) -> tuple[float, float]:
    """The range a map is drawn with: ``display_range``, else the map's own finite min / max."""
    if display_range is not None:
        return float(display_range[0]), float(display_range[1])
    finite = np.asarray(anomaly_map)[np.isfinite(anomaly_map)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def colour_bar(
    display_range: tuple[float, float],
    height: int,
    *,
    cmap: str = "jet",
    width: int = 14,
    font_size: int = 11,
) -> np.ndarray:
    """A vertical colour bar (hottest at the top) with its values written beside it.

    Args:
        display_range: ``(lo, hi)``: the map values at the bottom and top of the bar (what
            :func:`anomaly_map_overlay` drew as the coldest and hottest colour).
        height: the bar's height in pixels (the picture it stands beside).
        cmap: the overlay's colour map.
        width: the bar's width in pixels.
        font_size: size of the value labels.

    Returns:
        uint8 ``(height, W, 3)`` on white: the bar, then the top, middle and bottom values.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} and {width}")
    lo, hi = (float(v) for v in display_range)
    labels = [f"{v:.4g}" for v in (hi, (lo + hi) / 2, lo)]
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(t, font=font)) for t in labels)
    out = Image.new("RGB", (width + 6 + text_w + 2, height), (255, 255, 255))
    ramp = _colormap_lut(cmap)[np.linspace(255, 0, height).round().astype(np.uint8)]
    out.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None], width, axis=1))))
    draw = ImageDraw.Draw(out)
    tops = (0, max(0, (height - font_size) // 2), max(0, height - font_size - 2))
    for text, y in zip(labels, tops, strict=True):
        draw.text((width + 5, y), text, fill=(20, 20, 20), font=font)
    return np.asarray(out)


def heatmap_picture(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    display_range: tuple[float, float] | None,
    *,
    regions: Sequence | None = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    caption: str | None = None,
    caption_rgb: tuple[int, int, int] = (20, 20, 20),
    gap: int = 6,
) -> np.ndarray:
    """The picture of one inspected image: the image | its anomaly-map overlay (defect regions
    boxed) | the colour bar of the overlay's range, under an optional caption line.

    Args:
        image: uint8 ``(H, W)`` or ``(H, W, 3)``.
        anomaly_map: float ``(h, w)``, resized to the image when sizes differ.
        display_range: ``(lo, hi)`` of the colours (None: the map's own min / max, and the bar
            says so by its values).
        regions: defect regions in ``anomaly_map``'s pixels (see :func:`draw_regions`).
        mask: optional ground-truth mask, outlined on the overlay.
        alpha: overlay weight.
        caption: one line above the panels (e.g. the verdict and score), shortened to fit.
        caption_rgb: its colour.
        gap: white pixels between the panels.

    Images under :data:`MIN_PICTURE_HEIGHT` pixels are enlarged pixel for pixel (nearest), so
    a thumbnail's picture stays legible.

    Returns:
        uint8 ``(band + H', W' + gap + W' + gap + bar, 3)``.
    """
    original = _as_rgb(image)
    overlay = anomaly_map_overlay(original, anomaly_map, display_range, alpha, mask)
    if regions:
        overlay = draw_regions(overlay, regions, np.asarray(anomaly_map).shape[-2:])
    h, w = original.shape[:2]
    if h < MIN_PICTURE_HEIGHT:
        k = -(-MIN_PICTURE_HEIGHT // h)
        original, overlay = (
            np.repeat(np.repeat(p, k, axis=0), k, axis=1) for p in (original, overlay)
        )
        h, w = h * k, w * k
    bar = colour_bar(_map_range(anomaly_map, display_range), h)
    font_size = 13
    band = font_size + 10 if caption else 0
    width = 2 * w + 2 * gap + bar.shape[1]
    out = np.full((band + h, width, 3), 255, dtype=np.uint8)
    out[band:, :w] = original
    out[band:, w + gap : 2 * w + gap] = overlay
    out[band:, 2 * (w + gap) :] = bar
    if not caption:
        return out
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    draw.text((4, 4), _fit_text(draw, caption, font, width - 8), fill=caption_rgb, font=font)
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
