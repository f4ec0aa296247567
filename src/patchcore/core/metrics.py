"""Image- and pixel-level metrics and threshold selection for anomaly detection.

Pure numpy functions (scipy only for connected components in :func:`aupro` and
:func:`region_scores`); no torch and
no scikit-learn at runtime. The image-level curves follow ``sklearn.metrics`` exactly so that
results can be checked against it.

Conventions used everywhere in this module:

* scores: higher means more anomalous.
* labels / truth / masks: ``1`` or ``True`` means anomalous (defect), ``0`` / ``False`` normal.
* verdict: a sample is anomalous iff ``score >= threshold``.
* a ratio whose denominator is zero is reported as ``0.0`` (no warning), see :func:`evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "MATLAB_METRICS",
    "THRESHOLD_METHODS",
    "Metrics",
    "RegionScores",
    "anomaly_threshold",
    "aupro",
    "auroc",
    "average_precision",
    "evaluate",
    "f1_curve",
    "pixel_auroc",
    "pixel_threshold",
    "precision_recall_curve",
    "pro_curve",
    "region_scores",
    "region_threshold",
    "roc_curve",
]

THRESHOLD_METHODS = ("max_f1", "youden", "nearest_zero_one")

#: Column order of MATLAB's ``DataSetMetrics`` table (keys of :meth:`Metrics.as_dict`).
MATLAB_METRICS: tuple[str, ...] = (
    "GlobalAccuracy",
    "MeanAccuracy",
    "Precision",
    "Recall",
    "Specificity",
    "F1Score",
    "FalsePositiveRate",
    "FalseNegativeRate",
)

# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_binary(name: str, values, ndim: int | None = 1) -> np.ndarray:
    """Return ``values`` as a bool array; accepts bool or numbers that are all 0 or 1."""
    arr = np.asarray(values)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean or 0/1 numbers, got dtype {arr.dtype}")
    bad = np.setdiff1d(np.unique(arr), [0, 1])
    if bad.size:
        shown = ", ".join(repr(v.item()) for v in bad[:5])
        raise ValueError(
            f"{name} must contain only 0/1 (or False/True, 1 = anomalous); found {shown}"
        )
    return arr.astype(bool)


def _as_scores(name: str, values, ndim: int | None = 1) -> np.ndarray:
    """Return ``values`` as a finite floating array (float dtypes kept, others -> float64)."""
    arr = np.asarray(values)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")
    return arr


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary("labels", labels)
    s = _as_scores("scores", scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    return y, s


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        present = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{what} needs both normal (0) and anomalous (1) samples, "
            f"but all {y.size} labels are {present}"
        )


# --------------------------------------------------------------------------------------------
# curve machinery shared by image and pixel level
# --------------------------------------------------------------------------------------------


def _descending_counts(
    scores: np.ndarray, pos: np.ndarray, neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative positive / negative weight flagged at each distinct score, high to low.

    Args:
        scores: ``(n,)`` scores.
        pos: ``(n,)`` weight each sample adds to the positives when flagged (bool or float).
        neg: ``(n,)`` weight each sample adds to the negatives when flagged (bool or float).

    Returns:
        ``(neg_cum, pos_cum, thresholds)``, each ``(m,)`` for the ``m`` distinct scores in
        decreasing order; entry ``k`` is the total weight of samples with
        ``score >= thresholds[k]``.
    """
    order = np.argsort(scores, kind="mergesort")[::-1]
    s = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    acc = np.int64 if pos.dtype == bool else np.float64
    pos_cum = np.cumsum(pos[order], dtype=acc)[last_of_tie]
    acc = np.int64 if neg.dtype == bool else np.float64
    neg_cum = np.cumsum(neg[order], dtype=acc)[last_of_tie]
    return neg_cum, pos_cum, s[last_of_tie]


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under the polyline ``(x, y)`` (``x`` non-decreasing), optionally up to ``x_max``.

    When ``x_max`` falls inside a segment, ``y`` is linearly interpolated there.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x_max is not None:
        inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
        if inside < x.size and x[inside - 1] < x_max:
            x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
            y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            x = np.r_[x[:inside], x_max]
            y = np.r_[y[:inside], y_at]
        else:
            x, y = x[:inside], y[:inside]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


# --------------------------------------------------------------------------------------------
# image level
# --------------------------------------------------------------------------------------------


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, like ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

    Args:
        labels: ``(n,)`` bool or 0/1, 1 = anomalous.
        scores: ``(n,)`` anomaly scores, higher = more anomalous.

    Returns:
        ``(fpr, tpr, thresholds)``, each ``(m + 1,)`` where ``m`` is the number of distinct
        scores. ``thresholds`` decreases from ``inf`` (nothing flagged) through every distinct
        score; ``fpr[k]`` / ``tpr[k]`` are the rates of the verdict ``score >= thresholds[k]``.

    Raises:
        ValueError: bad shapes or values, or only one class present (a rate would be 0 / 0).
    """
    y, s = _labels_and_scores(labels, scores)
    _require_both_classes(y, "roc_curve")
    fps, tps, thr = _descending_counts(s, y, ~y)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thr.astype(np.float64)]


def auroc(labels, scores) -> float:
    """Area under the ROC curve (ties count one half), equal to ``sklearn.metrics.roc_auc_score``.

    Args:
        labels: ``(n,)`` bool or 0/1, 1 = anomalous.
        scores: ``(n,)`` anomaly scores, higher = more anomalous.

    Raises:
        ValueError: only one class present, or bad shapes / values.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    return _trapezoid(fpr, tpr)


def precision_recall_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall pairs, like ``sklearn.metrics.precision_recall_curve`` (sklearn >= 1.1).

    Args:
        labels: ``(n,)`` bool or 0/1, 1 = anomalous.
        scores: ``(n,)`` anomaly scores, higher = more anomalous.

    Returns:
        ``(precision, recall, thresholds)``: ``thresholds`` ``(m,)`` are the distinct scores in
        increasing order; ``precision`` / ``recall`` ``(m + 1,)`` hold the values of the verdict
        ``score >= thresholds[k]``, followed by the conventional end point ``(1, 0)``.
        Precision with nothing flagged is 0.

    Raises:
        ValueError: no anomalous sample (recall undefined), or bad shapes / values.
    """
    y, s = _labels_and_scores(labels, scores)
    if not y.any():
        raise ValueError(
            f"precision_recall_curve needs at least one anomalous (1) sample; "
            f"all {y.size} labels are normal (0)"
        )
    fps, tps, thr = _descending_counts(s, y, ~y)
    precision = tps / (tps + fps)  # tps + fps >= 1: every threshold flags a sample
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1].astype(np.float64)


def f1_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """F1 score of the verdict ``score >= t`` for every distinct score ``t``.

    Args:
        labels: ``(n,)`` bool or 0/1, 1 = anomalous.
        scores: ``(n,)`` anomaly scores, higher = more anomalous.

    Returns:
        ``(f1, thresholds)``, each ``(m,)``, thresholds increasing (as in
        :func:`precision_recall_curve`). F1 is 0 where precision + recall is 0.

    Raises:
        ValueError: no anomalous sample, or bad shapes / values.
    """
    precision, recall, thr = precision_recall_curve(labels, scores)
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return f1, thr


def average_precision(labels, scores) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score``.

    ``sum_k (R_k - R_{k+1}) P_k`` over the distinct thresholds (step-wise, no interpolation).

    Raises:
        ValueError: no anomalous sample, or bad shapes / values.
    """
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def _check_rate_bound(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _threshold_between(above, below, dtype: np.dtype) -> float:
    """A value ``t`` of ``dtype`` with ``below < t <= above``, halfway when representable."""
    a, b = dtype.type(above), dtype.type(below)
    mid = a / dtype.type(2) + b / dtype.type(2)
    if not (b < mid <= a):  # rounding collapsed the midpoint onto an end (adjacent floats)
        mid = a
    return float(mid)


def anomaly_threshold(
    labels,
    scores,
    method: str = "max_f1",
    *,
    max_fpr: float | None = None,
    max_fnr: float | None = None,
) -> float:
    """Choose an anomaly-score threshold from calibration data (like MATLAB ``anomalyThreshold``).

    Every distinct way of splitting the sorted scores is an operating point: flag nothing, or
    flag every sample with ``score >= s`` for each distinct score ``s``. The method picks one:

    * ``"max_f1"`` (MATLAB ``MaxF1Score``): largest F1 score.
    * ``"youden"`` (``YoudensIndexROC``): largest ``tpr - fpr``.
    * ``"nearest_zero_one"`` (``NearestZeroOneROC``): ROC point nearest to ``(fpr, tpr) = (0, 1)``.

    ``max_fpr`` / ``max_fnr`` first discard the operating points whose false positive / false
    negative rate exceeds the bound (e.g. best F1 among points with FPR <= 1 %). Ties in the
    criterion go to the higher threshold (fewer samples flagged).

    The returned value sits *between* scores so that it generalises: the midpoint between the
    lowest flagged score and the next lower distinct score. If every sample is flagged it is
    the lowest score itself; if none is, the next representable number above the highest score.
    The midpoint is computed in the floating dtype of ``scores`` (float32 scores give a
    threshold exactly representable in float32), so ``scores >= threshold`` on the calibration
    scores reproduces the chosen operating point in that dtype as well as in float64.

    Args:
        labels: ``(n,)`` bool or 0/1, 1 = anomalous; both classes must be present.
        scores: ``(n,)`` anomaly scores, higher = more anomalous.
        method: one of ``THRESHOLD_METHODS``.
        max_fpr: optional upper bound on the false positive rate, in [0, 1].
        max_fnr: optional upper bound on the false negative rate, in [0, 1].

    Returns:
        The threshold, a python float; verdict anomalous iff ``score >= threshold``.

    Raises:
        ValueError: unknown method, a bound outside [0, 1], no operating point meeting both
            bounds, a single class, or bad shapes / values.
    """
    if method not in THRESHOLD_METHODS:
        valid = ", ".join(repr(m) for m in THRESHOLD_METHODS)
        raise ValueError(f"unknown threshold method {method!r}; valid methods: {valid}")
    max_fpr = _check_rate_bound("max_fpr", max_fpr)
    max_fnr = _check_rate_bound("max_fnr", max_fnr)
    y, s = _labels_and_scores(labels, scores)
    _require_both_classes(y, "anomaly_threshold")

    fps, tps, thr = _descending_counts(s, y, ~y)
    # operating point 0 flags nothing; point k + 1 flags score >= thr[k]
    tp = np.r_[0, tps].astype(np.float64)
    fp = np.r_[0, fps].astype(np.float64)
    n_pos, n_neg = tp[-1], fp[-1]
    fpr, tpr = fp / n_neg, tp / n_pos

    if method == "max_f1":
        criterion = 2 * tp / (tp + fp + n_pos)
    elif method == "youden":
        criterion = tpr - fpr
    else:
        criterion = -(fpr**2 + (1.0 - tpr) ** 2)

    feasible = np.ones(tp.shape, dtype=bool)
    if max_fpr is not None:
        feasible &= fpr <= max_fpr
    if max_fnr is not None:
        feasible &= 1.0 - tpr <= max_fnr
    if not feasible.any():
        raise ValueError(
            f"no threshold meets both max_fpr={max_fpr} and max_fnr={max_fnr} on these "
            f"{y.size} samples (smallest FNR at FPR <= max_fpr: "
            f"{float(np.min(1.0 - tpr[fpr <= max_fpr])):.4g}); loosen a bound"
        )
    criterion = np.where(feasible, criterion, -np.inf)
    best = criterion.max()
    # tolerance so that mathematically equal criteria rounded differently count as a tie
    k = int(np.flatnonzero(criterion >= best - 1e-12 * max(1.0, abs(best)))[0])

    if k == 0:
        return float(np.nextafter(s.dtype.type(thr[0]), s.dtype.type(np.inf)))
    if k == thr.size:
        return float(thr[-1])
    return _threshold_between(thr[k - 1], thr[k], s.dtype)


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else 0.0


def evaluate(predicted, truth, defect_types=None) -> dict:
    """Classification metrics of binary verdicts (like MATLAB ``evaluateAnomalyDetection``).

    Any ratio whose denominator is zero is 0.0 (no warning): e.g. ``Precision`` when nothing is
    flagged, ``Recall`` and ``FalseNegativeRate`` when there is no anomalous sample,
    ``Specificity`` and ``FalsePositiveRate`` when there is no normal one. ``MeanAccuracy``
    averages the per-class recall over the classes present in ``truth`` (as
    ``sklearn.metrics.balanced_accuracy_score``).

    Args:
        predicted: ``(n,)`` bool or 0/1 verdicts, 1 = anomalous.
        truth: ``(n,)`` bool or 0/1 ground truth, 1 = anomalous.
        defect_types: optional ``(n,)`` strings naming each sample's type (normal samples e.g.
            ``"good"``).

    Returns:
        A JSON-serialisable dict (python ints / floats / lists) with keys ``NumSamples``,
        ``NumAnomalous``, ``NumNormal``, ``TruePositives``, ``FalsePositives``,
        ``TrueNegatives``, ``FalseNegatives``, ``GlobalAccuracy``, ``MeanAccuracy``,
        ``Precision``, ``Recall``, ``Specificity``, ``F1Score``, ``FalsePositiveRate``,
        ``FalseNegativeRate`` and ``ConfusionMatrix`` (``[[TN, FP], [FN, TP]]``, rows = truth
        normal / anomalous, columns = predicted normal / anomalous). With ``defect_types`` also
        ``DefectTypeCounts`` and ``DefectTypeRecall`` (dicts keyed by type, sorted by name):
        the fraction of that type's samples whose verdict matches the truth, i.e. the
        detection rate for a defect type and the specificity for the normal type.

    Raises:
        ValueError: empty input, mismatched lengths, or values other than 0/1.
    """
    pred = _as_binary("predicted", predicted)
    true = _as_binary("truth", truth)
    if pred.shape != true.shape:
        raise ValueError(
            f"predicted and truth must have the same length, got {pred.size} and {true.size}"
        )
    if pred.size == 0:
        raise ValueError("predicted and truth are empty")

    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred & ~true))
    fn = int(np.count_nonzero(~pred & true))
    tn = int(np.count_nonzero(~pred & ~true))
    n_pos, n_neg, n = tp + fn, tn + fp, pred.size
    recall, specificity = _ratio(tp, n_pos), _ratio(tn, n_neg)
    class_recalls = [r for r, count in ((specificity, n_neg), (recall, n_pos)) if count]

    result: dict = {
        "NumSamples": n,
        "NumAnomalous": n_pos,
        "NumNormal": n_neg,
        "TruePositives": tp,
        "FalsePositives": fp,
        "TrueNegatives": tn,
        "FalseNegatives": fn,
        "GlobalAccuracy": _ratio(tp + tn, n),
        "MeanAccuracy": float(sum(class_recalls) / len(class_recalls)),
        "Precision": _ratio(tp, tp + fp),
        "Recall": recall,
        "Specificity": specificity,
        "F1Score": _ratio(2 * tp, 2 * tp + fp + fn),
        "FalsePositiveRate": _ratio(fp, n_neg),
        "FalseNegativeRate": _ratio(fn, n_pos),
        "ConfusionMatrix": [[tn, fp], [fn, tp]],
    }
    if defect_types is not None:
        types = np.asarray(defect_types)
        if types.shape != pred.shape:
            raise ValueError(
                f"defect_types must have one entry per sample ({pred.size}), "
                f"got shape {types.shape}"
            )
        types = types.astype(str)
        correct = pred == true
        counts, recalls = {}, {}
        for name in sorted(set(types.tolist())):
            of_type = types == name
            counts[name] = int(np.count_nonzero(of_type))
            recalls[name] = _ratio(int(np.count_nonzero(correct & of_type)), counts[name])
        result["DefectTypeCounts"] = counts
        result["DefectTypeRecall"] = recalls
    return result


def _key(name: str) -> Any:
    """Field metadata: the key of a field whose name does not spell it in CamelCase."""
    return field(default=None, metadata={"key": name})


@dataclass(frozen=True)
class Metrics:
    """What one evaluation measured: one attribute per metric, one key per attribute.

    :meth:`as_dict` gives the keys of ``metrics.json``: the attribute name in CamelCase
    (``global_accuracy`` -> ``GlobalAccuracy``, as MATLAB's ``DataSetMetrics``), except
    ``auroc`` -> ``AUROC``, ``pixel_auroc`` -> ``PixelAUROC`` and ``aupro`` -> ``AUPRO``
    (area under the per-region overlap curve up to a false positive rate of 0.3). Optional
    metrics left at None are omitted from the dict, except ``auroc``, ``threshold`` and
    ``threshold_method``.
    """

    num_samples: int
    num_anomalous: int
    num_normal: int
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int
    global_accuracy: float
    mean_accuracy: float
    precision: float
    recall: float
    specificity: float
    f1_score: float
    false_positive_rate: float
    false_negative_rate: float
    confusion_matrix: list[list[int]]
    defect_type_counts: dict[str, int] | None = None
    defect_type_recall: dict[str, float] | None = None
    auroc: float | None = _key("AUROC")
    threshold: float | None = None
    threshold_method: str | None = None
    pixel_auroc: float | None = _key("PixelAUROC")
    aupro: float | None = _key("AUPRO")
    pixel_metric_images: int | None = None

    @staticmethod
    def key(attribute: str) -> str:
        """The ``metrics.json`` key of an attribute (``"f1_score"`` -> ``"F1Score"``)."""
        return _KEYS[attribute]

    def as_dict(self) -> dict[str, Any]:
        """The metrics by their ``metrics.json`` keys (JSON-serialisable values)."""
        always = ("auroc", "threshold", "threshold_method")
        return {
            _KEYS[f.name]: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None or f.name in always
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Metrics:
        """The inverse of :meth:`as_dict` (e.g. of :func:`evaluate`'s result).

        Raises:
            ValueError: a key that names no metric.
        """
        attribute = {k: a for a, k in _KEYS.items()}
        unknown = sorted(set(values) - set(attribute))
        if unknown:
            raise ValueError(
                f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(attribute)}"
            )
        return cls(**{attribute[k]: v for k, v in values.items()})


_KEYS: dict[str, str] = {
    f.name: f.metadata.get("key") or "".join(p.capitalize() for p in f.name.split("_"))
    for f in fields(Metrics)
}


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
        a = _as_scores(f"maps[{i}]", amap, ndim=2)
        if m.shape != a.shape:
            raise ValueError(f"masks[{i}] has shape {m.shape} but maps[{i}] has shape {a.shape}")
        pairs.append((m, a))
    return pairs


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel ``1 / size of its connected defect region`` (0 outside), and region count."""
    labeled, n_regions = ndimage.label(mask, structure=_REGION_STRUCTURE)
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
        neg_cum, pos_cum, thr = _descending_counts(scores, pos, neg)
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
    return _trapezoid(fpr, tpr)


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
    return _trapezoid(fpr, pro, x_max=float(max_fpr)) / float(max_fpr)


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
        return _ratio(self.found, self.gt_regions)

    @property
    def false_regions_per_image(self) -> float:
        """``false_regions / images``."""
        return _ratio(self.false_regions, self.images)

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
        gt, n_gt = ndimage.label(m, structure=_REGION_STRUCTURE)
        pr, n_pr = ndimage.label(p, structure=_REGION_STRUCTURE)
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
    from patchcore.lean.regions import region_mask

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
        precision = 1.0 - _ratio(r.false_regions, r.predicted_regions)
        recall = r.region_recall
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if f1 > best_f1:
            best_f1, best_t = f1, float(t)
    return best_t
