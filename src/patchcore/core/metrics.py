"""Image-level metrics and threshold selection for anomaly detection; the pixel- and
region-level ones live in :mod:`patchcore.core.pixel_metrics` and are importable from here too.

Pure numpy functions; no torch and no scikit-learn at runtime. The image-level curves follow
``sklearn.metrics`` exactly so that results can be checked against it.

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

from patchcore.core.curves import (
    as_binary,
    descending_counts,
    labels_and_scores,
    ratio,
    require_both_classes,
    trapezoid,
)
from patchcore.core.pixel_metrics import (
    RegionScores,
    aupro,
    pixel_auroc,
    pixel_threshold,
    pro_curve,
    region_scores,
    region_threshold,
)

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
    y, s = labels_and_scores(labels, scores)
    require_both_classes(y, "roc_curve")
    fps, tps, thr = descending_counts(s, y, ~y)
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
    return trapezoid(fpr, tpr)


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
    y, s = labels_and_scores(labels, scores)
    if not y.any():
        raise ValueError(
            f"precision_recall_curve needs at least one anomalous (1) sample; "
            f"all {y.size} labels are normal (0)"
        )
    fps, tps, thr = descending_counts(s, y, ~y)
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
    y, s = labels_and_scores(labels, scores)
    require_both_classes(y, "anomaly_threshold")

    fps, tps, thr = descending_counts(s, y, ~y)
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
    pred = as_binary("predicted", predicted)
    true = as_binary("truth", truth)
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
    recall, specificity = ratio(tp, n_pos), ratio(tn, n_neg)
    class_recalls = [r for r, count in ((specificity, n_neg), (recall, n_pos)) if count]

    result: dict = {
        "NumSamples": n,
        "NumAnomalous": n_pos,
        "NumNormal": n_neg,
        "TruePositives": tp,
        "FalsePositives": fp,
        "TrueNegatives": tn,
        "FalseNegatives": fn,
        "GlobalAccuracy": ratio(tp + tn, n),
        "MeanAccuracy": float(sum(class_recalls) / len(class_recalls)),
        "Precision": ratio(tp, tp + fp),
        "Recall": recall,
        "Specificity": specificity,
        "F1Score": ratio(2 * tp, 2 * tp + fp + fn),
        "FalsePositiveRate": ratio(fp, n_neg),
        "FalseNegativeRate": ratio(fn, n_pos),
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
            recalls[name] = ratio(int(np.count_nonzero(correct & of_type)), counts[name])
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
