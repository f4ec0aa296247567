// patchcore review: the metrics of a threshold, computed in the page from the cached scores.
// Pure functions (no DOM), loaded by the page and by the tests (node). They mirror
// patchcore.lean.record.judge (the one verdict rule: score >= threshold is anomalous; a score
// that is not finite is an error) and patchcore.core.metrics.evaluate / roc_curve / auroc;
// tests/test_review.py checks that both sides agree.
"use strict";

const ANOMALOUS = "anomalous";
const NORMAL = "normal";
const ERROR = "error";

/** The verdict of one score at a threshold (record.judge). */
function judge(score, threshold) {
  if (score === null || score === undefined || !Number.isFinite(score)) return ERROR;
  return score >= threshold ? ANOMALOUS : NORMAL;
}

/** Index of the first value >= x in an ascending array. */
function lowerBound(sorted, x) {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] >= x) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

/** How many values of an ascending array are flagged (>= t), by binary search. */
function flagged(sorted, t) {
  return sorted.length - lowerBound(sorted, t);
}

/**
 * Sorted views of the counted images (finite score, not excluded), built once per state.
 * items: {score: [...], label: [...], type: [...], excluded: [...]} columns.
 */
function prepare(items) {
  const normal = [];
  const anomalous = [];
  const byType = new Map();
  const counted = [];
  for (let i = 0; i < items.score.length; i++) {
    const s = items.score[i];
    if (s === null || !Number.isFinite(s) || items.excluded[i]) continue;
    counted.push(i);
    (items.label[i] ? anomalous : normal).push(s);
    const t = items.type[i];
    if (!byType.has(t)) byType.set(t, { label: items.label[i], scores: [] });
    byType.get(t).scores.push(s);
  }
  const asc = (a, b) => a - b;
  normal.sort(asc);
  anomalous.sort(asc);
  for (const v of byType.values()) v.scores.sort(asc);
  const all = normal.concat(anomalous).sort(asc);
  const distinct = [];
  for (const s of all) if (!distinct.length || distinct[distinct.length - 1] !== s) distinct.push(s);
  return { normal, anomalous, byType, counted, distinct, roc: rocCurve(normal, anomalous) };
}

const ratio = (num, den) => (den ? num / den : 0);

/**
 * MATLAB's metrics at threshold t (patchcore.core.metrics.evaluate): counts, the eight
 * columns, the confusion matrix [[TN, FP], [FN, TP]] and recall per type (the share of a
 * type's images whose verdict matches the truth; for "good" that is the specificity).
 */
function evaluateAt(prep, t) {
  const nPos = prep.anomalous.length;
  const nNeg = prep.normal.length;
  const tp = flagged(prep.anomalous, t);
  const fp = flagged(prep.normal, t);
  const fn = nPos - tp;
  const tn = nNeg - fp;
  const recall = ratio(tp, nPos);
  const specificity = ratio(tn, nNeg);
  const classes = [];
  if (nNeg) classes.push(specificity);
  if (nPos) classes.push(recall);
  const perType = {};
  const names = Array.from(prep.byType.keys()).sort();
  for (const name of names) {
    const v = prep.byType.get(name);
    const hit = flagged(v.scores, t);
    const correct = v.label ? hit : v.scores.length - hit;
    perType[name] = { recall: ratio(correct, v.scores.length), n: v.scores.length, correct };
  }
  return {
    NumSamples: nPos + nNeg,
    NumAnomalous: nPos,
    NumNormal: nNeg,
    TruePositives: tp,
    FalsePositives: fp,
    TrueNegatives: tn,
    FalseNegatives: fn,
    GlobalAccuracy: ratio(tp + tn, nPos + nNeg),
    MeanAccuracy: classes.length ? classes.reduce((a, b) => a + b, 0) / classes.length : 0,
    Precision: ratio(tp, tp + fp),
    Recall: recall,
    Specificity: specificity,
    F1Score: ratio(2 * tp, 2 * tp + fp + fn),
    FalsePositiveRate: ratio(fp, nNeg),
    FalseNegativeRate: ratio(fn, nPos),
    ConfusionMatrix: [[tn, fp], [fn, tp]],
    DefectTypeRecall: perType,
  };
}

/** ROC points from flagging nothing to flagging everything (metrics.roc_curve) and AUROC. */
function rocCurve(normal, anomalous) {
  if (!normal.length || !anomalous.length) return { fpr: [], tpr: [], auroc: null };
  const events = [];
  for (const s of normal) events.push([s, 0]);
  for (const s of anomalous) events.push([s, 1]);
  events.sort((a, b) => b[0] - a[0]);
  const fpr = [0];
  const tpr = [0];
  let fp = 0;
  let tp = 0;
  for (let k = 0; k < events.length; k++) {
    if (events[k][1]) tp++;
    else fp++;
    if (k + 1 === events.length || events[k + 1][0] !== events[k][0]) {
      fpr.push(fp / normal.length);
      tpr.push(tp / anomalous.length);
    }
  }
  let area = 0;
  for (let k = 1; k < fpr.length; k++) area += ((fpr[k] - fpr[k - 1]) * (tpr[k] + tpr[k - 1])) / 2;
  return { fpr, tpr, auroc: area };
}

/**
 * The thresholds that change the verdicts: one below every score, one between each pair of
 * neighbouring distinct scores (the midpoint), one above the highest. Ascending.
 */
function stops(prep) {
  const d = prep.distinct;
  if (!d.length) return [0];
  const out = [d[0]];
  for (let k = 1; k < d.length; k++) out.push(d[k - 1] / 2 + d[k] / 2);
  const top = d[d.length - 1];
  out.push(top + Math.max(Math.abs(top) * 1e-6, 1e-12));
  return out;
}

/**
 * The stop that gives threshold t's verdicts: t flags the scores >= the first distinct score
 * d_k >= t, and so does stop k (which lies in (d_{k-1}, d_k]).
 */
function stopIndex(prep, t) {
  return lowerBound(prep.distinct, t);
}

const ReviewMetrics = { ANOMALOUS, NORMAL, ERROR, judge, lowerBound, flagged, prepare,
  evaluateAt, rocCurve, stops, stopIndex };
if (typeof module !== "undefined") module.exports = ReviewMetrics;
else window.ReviewMetrics = ReviewMetrics;
