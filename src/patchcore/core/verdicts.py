"""Verdicts: a learned threshold on the anomaly score, and the methods that use it.

Mixed into :class:`patchcore.PatchCore` (as scikit-learn's mixins add ``fit_predict`` and the
like): it needs the estimator's ``score()`` path (``_scored``), ``_check_fitted`` and ``state_``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from patchcore.core.results import Classification
from patchcore.core.state import NotFittedError
from patchcore.lean.normalization import fit_normalization, normalize
from patchcore.lean.record import NonFiniteScoreError

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
    import torch

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
        return r.scores >= t

    def classify(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> Classification:
        """Verdicts, scores and anomaly maps (at each input's own size) in one pass.

        Fails closed as :meth:`predict` (:class:`NonFiniteScoreError`).
        """
        t, r = self._verdicts(images, "native", on_error, progress)
        return Classification(r.scores >= t, r.scores, r.maps)  # type: ignore[arg-type]

    def set_threshold(self, value: float, method: str = "manual") -> Any:
        """Set ``threshold_`` by hand; the normalised scores then map [0, 2 x value] onto
        [0, 1] (no calibration scores to spread them by)."""
        self._check_fitted("set_threshold")
        if not math.isfinite(float(value)):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        self._set_threshold(float(value), method, None, fit_normalization(None, float(value)))
        return self

    def _set_threshold(
        self, t: float, method: str, calibration: dict[str, Any] | None, mapping: dict[str, Any]
    ) -> None:
        """Install a threshold with its calibration facts and normalisation (all together)."""
        self.state_.threshold = t
        self.state_.threshold_method = method
        self.state_.calibration = calibration
        self.state_.normalization = mapping

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
    ) -> Any:
        """Choose ``threshold_`` on labelled images (1/True = anomalous).

        ``scores`` may be given to reuse already computed scores of ``images``.
        """
        from patchcore.core.metrics import anomaly_threshold

        self._check_fitted("calibrate")
        y = np.asarray(list(labels)).astype(int)
        s = self.score_samples(images) if scores is None else np.asarray(scores, dtype=float)
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
        self._set_threshold(t, method, facts, fit_normalization(s[ok], t))
        return self

    def calibrate_normal(
        self,
        images: Any,
        *,
        max_fpr: float,
        scores: np.ndarray | None = None,
        progress: bool | None = None,
    ) -> Any:
        """Choose ``threshold_`` from normal images alone, for a false-alarm rate ``max_fpr``.

        Split conformal (:mod:`patchcore.core.conformal`): with the ``n`` scores of ``images``, the
        threshold sits just above the ``ceil((n + 1)(1 - max_fpr))``-th smallest. If the
        images are exchangeable with the normal images the line will produce (the same
        process, never used to fit this model), the expected false-alarm rate on them is at
        most ``max_fpr`` (and at least ``max_fpr - 1/(n+1)``). ``threshold_method_`` becomes
        ``"conformal"`` and ``calibration_`` holds ``max_fpr``, ``n``, ``rank``,
        ``fpr_bounds`` and ``calibration_fpr``.

        A separate method rather than ``calibrate(images, labels=None)``: it takes no labels
        and no threshold method, needs a rate, and fails in its own way (too few images).

        Args:
            images: held-out normal images (not the fitting ones); any input ``score`` takes.
            max_fpr: the false-alarm rate, in (0, 1).
            scores: (n,) their scores, to reuse a pass already made; all must be finite.
            progress: progress bar while scoring.

        Raises:
            TooFewNormalImagesError: fewer than ``1 / max_fpr - 1`` images; it says how many.
            ValueError: a rate outside (0, 1), or non-finite scores (fails closed).
        """
        from patchcore.core.conformal import conformal_threshold

        self._check_fitted("calibrate_normal")
        if scores is None:
            s = self.score(images, progress=progress).scores
        else:
            s = np.asarray(scores, dtype=np.float64)
        c = conformal_threshold(s, max_fpr)
        self._set_threshold(
            c.threshold, "conformal", c.as_dict(), fit_normalization(s, c.threshold)
        )
        return self
