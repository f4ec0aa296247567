"""Pixel- and region-level metrics and map thresholds: pixel AUROC, the PRO curve and AUPRO,
the pooled pixel-F1 threshold, found / false defect regions and the region-F1 threshold.

Pure numpy (scipy for connected components). Conventions as :mod:`patchcore.core.metrics`:
higher map values are more anomalous, masks are True on defect pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from patchcore.core.curves import (
    REGION_STRUCTURE,
    as_scores,
    descending_counts,
    ratio,
    trapezoid,
)
from patchcore.lean.regions import region_mask

__all__ = [
    "RegionScores",
    "aupro",
    "pixel_auroc",
    "pixel_threshold",
    "pro_curve",
    "region_scores",
    "region_threshold",
]


# --------------------------------------------------------------------------------------------
# pixel level
# --------------------------------------------------------------------------------------------


def _masks_and_maps(masks, maps) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate paired ``HxW`` masks (nonzero = defect) and finite score maps."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    if len(masks) == 0:
        raise ValueError("masks and maps are empty")
    pairs = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        m = np.asarray(mask)
        if m.dtype != bool:
            if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
                raise ValueError(f"masks[{i}] must be boolean or numeric, got dtype {m.dtype}")
            m = m != 0
        a = as_scores(f"maps[{i}]", amap, ndim=2)
        if m.shape != a.shape:
            raise ValueError(f"masks[{i}] has shape {m.shape} but maps[{i}] has shape {a.shape}")
        pairs.append((m, a))
    return pairs


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel ``1 / size of its connected defect region`` (0 outside), and region count."""
    labeled, n_regions = ndimage.label(mask, structure=REGION_STRUCTURE)
    weights = np.zeros(mask.shape, dtype=np.float64)
    if n_regions:
        sizes = np.bincount(labeled.ravel())
        inside = labeled > 0
        weights[inside] = 1.0 / sizes[labeled[inside]]
    return weights, n_regions


def _pixel_curve(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    num_thresholds: int | None,
    region_overlap: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, y, thresholds)`` over all pixels, ``y`` = TPR or per-region overlap.

    Starts at ``(0, 0, inf)`` and follows decreasing thresholds to ``(1, 1, min score)``.
    """
    weights, n_regions = [], 0
    for m, _ in pairs:
        if region_overlap:
            w, r = _region_weights(m)
            weights.append(w)
            n_regions += r
        else:
            weights.append(m)
    n_neg = sum(int(m.size - np.count_nonzero(m)) for m, _ in pairs)
    n_pos = n_regions if region_overlap else sum(int(np.count_nonzero(m)) for m, _ in pairs)
    if n_neg == 0:
        raise ValueError("every pixel of every mask is a defect: the FPR is undefined")
    if n_pos == 0:
        raise ValueError("no mask contains a defect pixel: the metric needs at least one defect")

    if num_thresholds is None:
        scores = np.concatenate([a.ravel() for _, a in pairs])
        pos = np.concatenate([w.ravel() for w in weights])
        neg = np.concatenate([~m.ravel() for m, _ in pairs])
        neg_cum, pos_cum, thr = descending_counts(scores, pos, neg)
        thr = thr.astype(np.float64)
    else:
        if int(num_thresholds) != num_thresholds or num_thresholds < 2:
            raise ValueError(f"num_thresholds must be an integer >= 2, got {num_thresholds!r}")
        low = min(float(a.min()) for _, a in pairs)
        high = max(float(a.max()) for _, a in pairs)
        thr = np.unique(np.linspace(low, high, int(num_thresholds)))  # increasing
        pos_hist = np.zeros(thr.size, dtype=np.float64)
        neg_hist = np.zeros(thr.size, dtype=np.int64)
        for (m, a), w in zip(pairs, weights, strict=True):
            # index of the highest threshold <= score; >= 0 since thr[0] is the minimum
            idx = np.searchsorted(thr, a.ravel().astype(np.float64), side="right") - 1
            pos_hist += np.bincount(idx, weights=w.ravel().astype(np.float64), minlength=thr.size)
            neg_hist += np.bincount(idx[~m.ravel()], minlength=thr.size)
        # weight with score >= thr[k], listed for decreasing thresholds
        pos_cum = np.cumsum(pos_hist[::-1])
        neg_cum = np.cumsum(neg_hist[::-1])
        thr = thr[::-1]
    fpr = np.r_[0.0, neg_cum / n_neg]
    y = np.minimum(np.r_[0.0, pos_cum / n_pos], 1.0)  # cumulative rounding may pass 1
    return fpr, y, np.r_[np.inf, thr]


def pixel_auroc(masks, maps, *, num_thresholds: int | None = None) -> float:
    """Pixel-level AUROC over all pixels of all images pooled together.

    Exact by default (equal to ``roc_auc_score`` on the flattened pixels): one sort of all
    pixel scores, about 40 bytes per pixel of temporary memory. For very large sets pass
    ``num_thresholds``: the ROC curve is then evaluated only at that many evenly spaced
    thresholds between the lowest and highest score, accumulated image by image with
    histograms (memory independent of the number of pixels; the area is slightly
    underestimated, by at most the area lost between curve points).

    Args:
        masks: sequence of ``(H_i, W_i)`` bool masks (nonzero = defect); sizes may differ
            between images but must match the map of the same index.
        maps: sequence of ``(H_i, W_i)`` anomaly maps, higher = more anomalous.
        num_thresholds: ``None`` for the exact value, else an integer >= 2.

    Raises:
        ValueError: no defect pixel or no normal pixel, mismatched shapes, non-finite maps.
    """
    pairs = _masks_and_maps(masks, maps)
    fpr, tpr, _ = _pixel_curve(pairs, num_thresholds, region_overlap=False)
    return trapezoid(fpr, tpr)


def pro_curve(
    masks, maps, *, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against pixel false positive rate, as in MVTec AD.

    Each connected defect region (8-connectivity, ``scipy.ndimage.label``) of each mask counts
    once: at threshold ``t`` its overlap is the fraction of its pixels with
    ``score >= t``, and PRO is the mean overlap over all regions of all images, so a small
    defect weighs as much as a large one. The FPR is the fraction of all defect-free pixels
    (including every pixel of images with an empty mask) with ``score >= t``.

    Exact by default: like the reference MVTec implementation, every pixel adds
    ``1 / size of its region`` to the PRO sum when the threshold drops to its score, so one
    sort of all pixel scores yields the curve at every distinct score. With ``num_thresholds``
    the curve is evaluated only at that many evenly spaced thresholds, accumulated image by
    image with histograms (memory independent of the number of pixels).

    Args:
        masks: sequence of ``(H_i, W_i)`` bool masks (nonzero = defect).
        maps: sequence of ``(H_i, W_i)`` anomaly maps, higher = more anomalous.
        num_thresholds: ``None`` for every distinct score, else an integer >= 2.

    Returns:
        ``(fpr, pro, thresholds)``, each ``(m + 1,)``; thresholds decrease from ``inf`` (point
        ``(0, 0)``) to the lowest score (point ``(1, 1)``).

    Raises:
        ValueError: no defect region or no defect-free pixel, mismatched shapes, non-finite
            maps.
    """
    pairs = _masks_and_maps(masks, maps)
    return _pixel_curve(pairs, num_thresholds, region_overlap=True)


def aupro(masks, maps, max_fpr: float = 0.3, *, num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (MVTec AD, Bergmann et al.).

    The area under :func:`pro_curve` for FPR in ``[0, max_fpr]`` (trapezoids, with the PRO
    linearly interpolated at ``max_fpr``) divided by ``max_fpr``, so a perfect map scores 1.0
    and the chance level is about ``max_fpr / 2``.

    Args:
        masks: sequence of ``(H_i, W_i)`` bool masks (nonzero = defect).
        maps: sequence of ``(H_i, W_i)`` anomaly maps, higher = more anomalous.
        max_fpr: integration limit in ``(0, 1]``; 0.3 in the MVTec AD papers.
        num_thresholds: see :func:`pro_curve`.

    Raises:
        ValueError: ``max_fpr`` outside ``(0, 1]``, plus the cases of :func:`pro_curve`.
    """
    if not 0.0 < float(max_fpr) <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr!r}")
    fpr, pro, _ = pro_curve(masks, maps, num_thresholds=num_thresholds)
    return trapezoid(fpr, pro, x_max=float(max_fpr)) / float(max_fpr)


def pixel_threshold(masks, maps, *, num_thresholds: int | None = 2000) -> float:
    """The map threshold of maximum pixel F1 over all pixels of all images pooled together.

    A pixel is predicted defective iff its map value ``>= threshold``; F1 is
    ``2 TP / (2 TP + FP + FN)`` over the pooled pixels. Ties keep the highest threshold.

    Args:
        masks: sequence of ``(H_i, W_i)`` bool masks (nonzero = defect); normal images have
            empty masks and contribute only false positives.
        maps: sequence of ``(H_i, W_i)`` anomaly maps, higher = more anomalous.
        num_thresholds: candidate thresholds evenly spaced between the lowest and highest
            map value (histograms, memory independent of the pixel count); ``None``: every
            distinct value (one sort of all pixels, about 40 bytes per pixel).

    Raises:
        ValueError: no defect pixel or no normal pixel, mismatched shapes, non-finite maps.
    """
    pairs = _masks_and_maps(masks, maps)
    fpr, tpr, thr = _pixel_curve(pairs, num_thresholds, region_overlap=False)
    n_pos = sum(int(np.count_nonzero(m)) for m, _ in pairs)
    n_neg = sum(int(m.size) for m, _ in pairs) - n_pos
    tp, fp = tpr[1:] * n_pos, fpr[1:] * n_neg
    f1 = 2.0 * tp / (n_pos + tp + fp)
    return float(thr[1:][int(np.argmax(f1))])


@dataclass(frozen=True)
class RegionScores:
    """Predicted defect regions against ground-truth regions (see :func:`region_scores`).

    Attributes:
        images: images compared.
        gt_regions: ground-truth regions (8-connected components of the masks).
        found: ground-truth regions that a predicted region overlaps (see ``min_overlap``).
        predicted_regions: predicted regions (8-connected components of the predictions).
        false_regions: predicted regions that touch no ground-truth pixel.
        min_overlap: the overlap rule used.
    """

    images: int
    gt_regions: int
    found: int
    predicted_regions: int
    false_regions: int
    min_overlap: float

    @property
    def region_recall(self) -> float:
        """``found / gt_regions`` (0.0 without ground-truth regions)."""
        return ratio(self.found, self.gt_regions)

    @property
    def false_regions_per_image(self) -> float:
        """``false_regions / images``."""
        return ratio(self.false_regions, self.images)

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "gt_regions": self.gt_regions,
            "found": self.found,
            "region_recall": self.region_recall,
            "predicted_regions": self.predicted_regions,
            "false_regions": self.false_regions,
            "false_regions_per_image": self.false_regions_per_image,
            "min_overlap": self.min_overlap,
        }


def region_scores(masks, predicted, *, min_overlap: float = 0.0) -> RegionScores:
    """Region-level recall and false regions of predicted defect pixels against masks.

    Both sides are split into 8-connected regions (``scipy.ndimage.label``). A ground-truth
    region counts as found when the predicted pixels cover more than ``min_overlap`` of its
    area (the default 0.0: at least one shared pixel); a predicted region is false when it
    shares no pixel with any ground-truth region.

    Args:
        masks: sequence of ``(H_i, W_i)`` bool masks (nonzero = defect; empty for normals).
        predicted: sequence of ``(H_i, W_i)`` bool predictions, e.g. the pixels of the kept
            regions (:func:`patchcore.lean.regions.region_mask`).
        min_overlap: in ``[0, 1)``: share of a ground-truth region's pixels that must be
            covered (strictly more than it) for the region to count as found.

    Raises:
        ValueError: counts or shapes differ, empty input, ``min_overlap`` outside ``[0, 1)``.
    """
    if not 0.0 <= float(min_overlap) < 1.0:
        raise ValueError(f"min_overlap must be in [0, 1), got {min_overlap!r}")
    if len(masks) != len(predicted):
        raise ValueError(f"got {len(masks)} masks but {len(predicted)} predictions")
    if len(masks) == 0:
        raise ValueError("masks and predictions are empty")
    gt_n = found = pred_n = false_n = 0
    for i, (mask, pred) in enumerate(zip(masks, predicted, strict=True)):
        m, p = np.asarray(mask) != 0, np.asarray(pred) != 0
        if m.ndim != 2 or m.shape != p.shape:
            raise ValueError(
                f"masks[{i}] has shape {m.shape} but predicted[{i}] has shape {p.shape}"
            )
        gt, n_gt = ndimage.label(m, structure=REGION_STRUCTURE)
        pr, n_pr = ndimage.label(p, structure=REGION_STRUCTURE)
        gt_n += n_gt
        pred_n += n_pr
        if n_gt:
            area = np.bincount(gt.ravel(), minlength=n_gt + 1)[1:]
            hit = np.bincount(gt[p], minlength=n_gt + 1)[1:]
            found += int(np.count_nonzero((hit > 0) & (hit > min_overlap * area)))
        if n_pr:
            touching = np.bincount(pr[m], minlength=n_pr + 1)[1:]
            false_n += int(np.count_nonzero(touching == 0))
    return RegionScores(len(masks), gt_n, found, pred_n, false_n, float(min_overlap))


def region_threshold(
    masks, maps, *, min_area: int = 16, num_thresholds: int = 32, min_overlap: float = 0.0
) -> float:
    """The map threshold of maximum region F1: found regions against false regions.

    For each candidate threshold (evenly spaced between the lowest and the highest per-image
    map maximum) the maps are cut into regions (:func:`patchcore.lean.regions.region_mask`, at
    least ``min_area`` pixels) and scored with :func:`region_scores`: region recall =
    found / ground-truth regions, region precision = 1 - false / predicted regions, F1 their
    harmonic mean. Ties keep the highest threshold.

    Args:
        masks: sequence of ``(H_i, W_i)`` bool masks (nonzero = defect; empty for normals).
        maps: sequence of ``(H_i, W_i)`` anomaly maps, higher = more anomalous.
        min_area: smallest region kept, pixels.
        num_thresholds: candidate thresholds (>= 2).
        min_overlap: the found rule of :func:`region_scores`.

    Raises:
        ValueError: no ground-truth region, mismatched shapes, non-finite maps.
    """
    pairs = _masks_and_maps(masks, maps)
    if int(num_thresholds) != num_thresholds or num_thresholds < 2:
        raise ValueError(f"num_thresholds must be an integer >= 2, got {num_thresholds!r}")
    peaks = [float(a.max()) for _, a in pairs]
    best_f1, best_t = -1.0, peaks[0]
    for t in np.linspace(min(peaks), max(peaks), int(num_thresholds))[::-1]:
        pred = [region_mask(a, float(t), min_area=min_area) for _, a in pairs]
        r = region_scores([m for m, _ in pairs], pred, min_overlap=min_overlap)
        if r.gt_regions == 0:
            raise ValueError("no mask contains a defect region: the threshold needs one")
        precision = 1.0 - ratio(r.false_regions, r.predicted_regions)
        recall = r.region_recall
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if f1 > best_f1:
            best_f1, best_t = f1, float(t)
    return best_t
