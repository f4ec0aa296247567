"""Verdicts: a learned threshold on the anomaly score, and the methods that use it.

Mixed into :class:`patchcore.PatchCore` (as scikit-learn's mixins add ``fit_predict`` and the
like): it needs the estimator's ``score()`` path (``_scored``), ``_check_fitted`` and ``state_``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from patchcore.core.calibration import (
    MapFacts,
    history_entry,
    map_facts,
    map_summary,
)
from patchcore.core.conformal import conformal_threshold
from patchcore.core.inputs import as_list
from patchcore.core.metrics import anomaly_threshold
from patchcore.core.results import Classification
from patchcore.core.state import NotFittedError
from patchcore.lean import ood
from patchcore.lean.normalization import fit_normalization, normalize
from patchcore.lean.record import ANOMALOUS, NonFiniteScoreError, judge

__all__ = ["NonFiniteScoreError", "VerdictMixin", "nonfinite_parts"]


def nonfinite_parts(
    memory_bank: Any, tensors: dict[str, Any], threshold: float | None
) -> list[str]:
    """Names of the model parts holding NaN or infinite values (empty when all are finite).

    Args:
        memory_bank: the (M, D) bank tensor.
        tensors: the backbone's state dict (integer buffers are ignored).
        threshold: the verdict threshold, or None when unset.
    """
    bad = []
    if memory_bank.is_floating_point() and not bool(torch.isfinite(memory_bank).all()):
        bad.append("memory_bank")
    bad += [
        f"backbone tensor {k!r}"
        for k, v in tensors.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if threshold is not None and not math.isfinite(float(threshold)):
        bad.append(f"threshold ({threshold!r})")
    return bad


def _check_scores(scores: np.ndarray, names: list[str], skipped: set[int]) -> None:
    bad = [i for i in range(len(scores)) if i not in skipped and not np.isfinite(scores[i])]
    if bad:
        shown = ", ".join(names[i] for i in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise NonFiniteScoreError(
            f"{len(bad)} image(s) scored {float(scores[bad[0]])!r} ({shown}): the model gives no "
            "verdict on them; it holds non-finite values or overflowed (check the model file, "
            "or fit it again)"
        )


class VerdictMixin:
    """``set_threshold`` and ``calibrate`` choose ``threshold_``; ``predict`` and ``classify``
    give verdicts with it (score >= threshold = anomalous)."""

    def check_finite(self) -> Any:
        """Raise :class:`NonFiniteScoreError` naming every part (memory bank, backbone tensor,
        threshold) that holds NaN or infinite values; such a model cannot give verdicts.
        Returns ``self``."""
        self._check_fitted("check_finite")
        bad = nonfinite_parts(
            self.state_.memory_bank, self.extractor_.state_dict(), self.state_.threshold
        )
        if bad:
            raise NonFiniteScoreError(
                "the model holds non-finite values in "
                + ", ".join(bad[:4])
                + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                + "; it cannot give verdicts (fit it again or load an intact file)"
            )
        return self

    def _check_threshold(self, what: str) -> float:
        self._check_fitted(what)
        if self.state_.threshold is None:
            raise NotFittedError(
                f"no threshold set; call calibrate(images, labels) or set_threshold(value) "
                f"before {what}"
            )
        t = float(self.state_.threshold)
        if not math.isfinite(t):
            raise NonFiniteScoreError(
                f"threshold_ is {t!r}, so no score can be judged; set_threshold(value) or "
                f"calibrate again before {what}"
            )
        return t

    def _verdicts(self, images: Any, maps: Any, on_error: str, progress: bool | None) -> Any:
        """The scores of ``images`` with a finite threshold: ``(threshold, ScoreResult)``."""
        what = "predict" if maps is None else "classify"
        t = self._check_threshold(what)
        r = self._scored(images, maps, on_error, progress)
        names = [f"image #{i}" for i in range(len(r.scores))]
        for s in r.skipped:
            names[s.index] = s.name
        _check_scores(r.scores, names, {s.index for s in r.skipped})
        return t, r

    def predict(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> np.ndarray:
        """Verdicts, True = anomalous (score >= ``threshold_``). (N,) bool.

        Fails closed: a readable image that scores NaN or infinite (a model holding non-finite
        values), or a non-finite ``threshold_``, raises :class:`NonFiniteScoreError` instead of
        giving a verdict. Images skipped with ``on_error="skip"`` score NaN and read False, with
        a warning naming them.
        """
        t, r = self._verdicts(images, None, on_error, progress)
        return judge(r.scores, t) == ANOMALOUS

    def classify(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> Classification:
        """Verdicts, scores and anomaly maps (at each input's own size) in one pass.

        Fails closed as :meth:`predict` (:class:`NonFiniteScoreError`).
        """
        t, r = self._verdicts(images, "native", on_error, progress)
        labels = judge(r.scores, t) == ANOMALOUS
        return Classification(labels, r.scores, r.maps)  # type: ignore[arg-type]

    def set_threshold(
        self,
        value: float,
        method: str = "manual",
        *,
        images: Any = None,
        progress: bool | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> Any:
        """Set ``threshold_`` by hand; the normalised scores then map [0, 2 x value] onto
        [0, 1] (no calibration scores to spread them by).

        Args:
            value: the threshold (finite).
            method: stored as ``threshold_method_``.
            images: optional images (normal or not) whose scores and maps choose the map scale
                of the region cut and the heatmap display range (:mod:`patchcore.core.
                calibration`). Without them, those chosen at an earlier calibration are kept
                (the region cut follows the new threshold: ``value x map_scale_``); a model
                never calibrated on images cuts its regions at ``value`` itself, and the
                record's rule still shows every anomalous image's peak region.
            progress: progress bar while scoring ``images``.
            context: facts for the threshold's history entry (see :meth:`calibrate`).
        """
        self._check_fitted("set_threshold")
        if not math.isfinite(float(value)):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        facts = map_stats = None
        if images is not None:
            _, facts, map_stats = self._calibration_pass(images, None, None, progress)
        mapping = fit_normalization(None, float(value))
        self._set_threshold(float(value), method, None, mapping, facts, map_stats, context)
        return self

    def clear_threshold(self) -> Any:
        """Forget the threshold and all that was chosen with it (normalisation, calibration
        facts, map scale, display range, region threshold): the model scores and maps but gives
        no verdicts until calibrated again. Needed before changing ``top_k``,
        ``num_neighbors`` or ``sigma`` on a calibrated model. Returns ``self``."""
        self._check_fitted("clear_threshold")
        self._set_threshold(None, None, None, None, (None, None), [])  # type: ignore[arg-type]
        self.state_.region_threshold = self.state_.region_threshold_method = None
        return self

    def _set_threshold(
        self,
        t: float,
        method: str,
        calibration: dict[str, Any] | None,
        mapping: dict[str, Any],
        facts: MapFacts | None = None,
        map_stats: Any = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Install a threshold with its calibration facts and normalisation (all together),
        the map scale and display range of the calibration maps (``facts``; None: keep), the
        map reference of the out-of-distribution hints (``map_stats`` of the calibration's
        normal maps; None: keep), and record it in the threshold history (one entry per
        threshold, :func:`~patchcore.core.calibration.history_entry`, with the threshold it
        replaced; ``t`` None records nothing)."""
        state = self.state_
        last = state.threshold_history[-1] if state.threshold_history else {}
        replaced = {"value": state.threshold, "method": state.threshold_method}
        replaced["time"] = last.get("time") if last.get("value") == state.threshold else None
        state.threshold = t
        state.threshold_method = method
        state.calibration = calibration
        state.normalization = mapping
        if facts is not None:
            state.map_scale, state.display_range = facts
        if map_stats is not None and state.input_profile is not None:
            state.input_profile = ood.with_map_reference(state.input_profile, map_stats)
        if t is not None:
            entry = history_entry(method, t, calibration, {"replaced": replaced, **(context or {})})
            state.threshold_history = [*state.threshold_history, entry]

    def _calibration_pass(
        self,
        images: Any,
        scores: Any,
        map_extremes: Any,
        progress: bool | None,
        map_stats: Any = None,
    ) -> tuple[np.ndarray, MapFacts | None, np.ndarray | None]:
        """(N,) scores of ``images``, the map facts of the calibration maps and each map's
        statistic (:func:`~patchcore.lean.ood.map_statistic`): from one scoring pass with
        native-size maps when no ``scores`` are given (unreadable images raise); from
        ``map_extremes`` (and ``map_stats``) when given; else None (``scores`` alone:
        ``images`` are not read, and what was chosen before is kept)."""
        if scores is not None:
            s = np.asarray(scores, dtype=np.float64)
            if map_extremes is None:
                return s, None, None
            e = np.asarray(map_extremes, dtype=np.float64)
            if e.shape != (len(s), 2):
                raise ValueError(f"map_extremes must have shape ({len(s)}, 2), got {e.shape}")
            m = None if map_stats is None else np.asarray(map_stats, dtype=np.float64)
            if m is not None and m.shape != s.shape:
                raise ValueError(f"map_statistics must have shape ({len(s)},), got {m.shape}")
            return s, map_facts(s, e), m
        items = as_list(images)
        s, e = np.full(len(items), np.nan), np.full((len(items), 2), np.nan)
        m = np.full(len(items), np.nan)
        for r in self.iter_score(items, maps="native", progress=progress):
            s[r.index] = r.score
            lo, hi, m[r.index] = map_summary(r.map)
            e[r.index] = (lo, hi)
        return s, map_facts(s, e), m

    def normalize(self, scores: Any) -> np.ndarray:
        """Normalised scores: raw ``scores`` (or maps) mapped onto [0, 1] with the threshold at
        0.5, linear on each side between the lowest / highest calibration score and the
        threshold, clipped outside (see :mod:`patchcore.lean.normalization`).

        A display *mapping*, not a probability; ``normalized >= 0.5`` exactly when
        ``raw >= threshold_``. NaN stays NaN.

        Args:
            scores: raw scores or maps, any shape.
        Returns:
            float64 array of the same shape.
        Raises:
            NotFittedError: no threshold yet.
            ValueError: the stored mapping belongs to another threshold (``threshold_`` was
                assigned directly); call ``set_threshold`` or calibrate instead.
        """
        t = self._check_threshold("normalize")
        mapping = self.state_.normalization
        if mapping is None or float(mapping.get("threshold", math.nan)) != t:
            raise ValueError(
                f"the stored score normalisation does not belong to threshold_ = {t!r} "
                "(assigned directly?); use set_threshold(value) or calibrate to change it"
            )
        return normalize(scores, mapping)

    def calibrate(
        self,
        images: Any,
        labels: Iterable[int | bool],
        *,
        method: str = "max_f1",
        max_fpr: float | None = None,
        max_fnr: float | None = None,
        scores: np.ndarray | None = None,
        map_extremes: np.ndarray | None = None,
        map_statistics: np.ndarray | None = None,
        progress: bool | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> Any:
        """Choose ``threshold_`` on labelled images (1/True = anomalous), and from the same
        pass the map scale of the region cut, the heatmap display range and the map reference
        of the out-of-distribution hints (:mod:`patchcore.core.calibration`).

        Args:
            images: the calibration images (none used to fit).
            labels: 1/True = anomalous, one per image.
            method, max_fpr, max_fnr: see :func:`patchcore.core.metrics.anomaly_threshold`.
            scores: (N,) already computed scores of ``images``, to reuse a pass.
            map_extremes: (N, 2) each image's anomaly-map minimum and maximum from that pass
                (:func:`patchcore.core.calibration.extremes_of`): the map scale and display
                range are chosen on them. ``scores`` without them: ``images`` are not read
                and the map scale and display range chosen before are kept.
            map_statistics: (N,) each map's :func:`~patchcore.lean.ood.map_statistic` from
                that pass (the normal images' go to the map reference); None with ``scores``:
                the reference chosen before is kept.
            progress: progress bar while scoring.
            context: facts the caller knows (e.g. ``data``, ``seed``, ``fraction``,
                ``warnings``), stored in the threshold's history entry
                (``threshold_history_``) with the time, method, value and counts.
        """
        self._check_fitted("calibrate")
        y = np.asarray(list(labels)).astype(int)
        if scores is not None and len(scores) != len(y):
            raise ValueError(f"{len(scores)} images but {len(y)} labels")
        s, maps, map_stats = self._calibration_pass(
            images, scores, map_extremes, progress, map_statistics
        )
        if len(s) != len(y):
            raise ValueError(f"{len(s)} images but {len(y)} labels")
        ok = np.isfinite(s)
        t = float(anomaly_threshold(y[ok], s[ok], method=method, max_fpr=max_fpr, max_fnr=max_fnr))
        facts = {
            "n_normal": int((y[ok] == 0).sum()),
            "n_anomalous": int((y[ok] != 0).sum()),
            "max_fpr": None if max_fpr is None else float(max_fpr),
            "max_fnr": None if max_fnr is None else float(max_fnr),
        }
        normal = None if map_stats is None else map_stats[ok & (y == 0)]
        self._set_threshold(t, method, facts, fit_normalization(s[ok], t), maps, normal, context)
        return self

    def calibrate_normal(
        self,
        images: Any,
        *,
        max_fpr: float,
        scores: np.ndarray | None = None,
        map_extremes: np.ndarray | None = None,
        map_statistics: np.ndarray | None = None,
        context: Mapping[str, Any] | None = None,
        progress: bool | None = None,
    ) -> Any:
        """Choose ``threshold_`` from normal images alone, for a false-alarm rate ``max_fpr``.

        Split conformal (:mod:`patchcore.core.conformal`): with the ``n`` scores of ``images``, the
        threshold sits just above the ``ceil((n + 1)(1 - max_fpr))``-th smallest. If the
        images are exchangeable with the normal images the line will produce (the same
        process, never used to fit this model), the expected false-alarm rate on them is at
        most ``max_fpr`` (and at least ``max_fpr - 1/(n+1)``). ``threshold_method_`` becomes
        ``"conformal"`` and ``calibration_`` holds ``max_fpr``, ``n``, ``rank``,
        ``fpr_bounds`` and ``calibration_fpr``. The map scale and display range come from the
        same pass (:mod:`patchcore.core.calibration`).

        A separate method rather than ``calibrate(images, labels=None)``: it takes no labels
        and no threshold method, needs a rate, and fails in its own way (too few images).

        Args:
            images: held-out normal images (not the fitting ones); any input ``score`` takes.
            max_fpr: the false-alarm rate, in (0, 1).
            scores: (n,) their scores, to reuse a pass already made; all must be finite.
            map_extremes: (n, 2) their maps' minimum and maximum, as in :meth:`calibrate`.
            map_statistics: (n,) their maps' statistics, as in :meth:`calibrate`.
            context: facts for the threshold's history entry, as in :meth:`calibrate`.
            progress: progress bar while scoring.

        Raises:
            TooFewNormalImagesError: fewer than ``1 / max_fpr - 1`` images; it says how many.
            ValueError: a rate outside (0, 1), or non-finite scores (fails closed).
        """
        self._check_fitted("calibrate_normal")
        s, maps, map_stats = self._calibration_pass(
            images, scores, map_extremes, progress, map_statistics
        )
        c = conformal_threshold(s, max_fpr)
        mapping = fit_normalization(s, c.threshold)
        self._set_threshold(
            c.threshold, "conformal", c.as_dict(), mapping, maps, map_stats, context
        )
        return self
