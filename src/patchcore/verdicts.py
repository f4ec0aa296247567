"""Verdicts: a learned threshold on the anomaly score, and the methods that use it.

Mixed into :class:`patchcore.PatchCore` (as scikit-learn's mixins add ``fit_predict`` and the
like): it needs the estimator's ``score()`` path (``_scored``), ``_check_fitted`` and ``state_``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from .results import Classification
from .state import NotFittedError

__all__ = ["VerdictMixin"]


class VerdictMixin:
    """``set_threshold`` and ``calibrate`` choose ``threshold_``; ``predict`` and ``classify``
    give verdicts with it (score >= threshold = anomalous)."""

    def _check_threshold(self, what: str) -> float:
        self._check_fitted(what)
        if self.state_.threshold is None:
            raise NotFittedError(
                f"no threshold set; call calibrate(images, labels) or set_threshold(value) "
                f"before {what}"
            )
        return float(self.state_.threshold)

    def predict(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> np.ndarray:
        """Verdicts, True = anomalous (score >= ``threshold_``). (N,) bool."""
        t = self._check_threshold("predict")
        return self._scored(images, None, on_error, progress).scores >= t

    def classify(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> Classification:
        """Verdicts, scores and anomaly maps (at each input's own size) in one pass."""
        t = self._check_threshold("classify")
        r = self._scored(images, "native", on_error, progress)
        return Classification(r.scores >= t, r.scores, r.maps)  # type: ignore[arg-type]

    def set_threshold(self, value: float, method: str = "manual") -> Any:
        """Set ``threshold_`` by hand."""
        self._check_fitted("set_threshold")
        if not math.isfinite(float(value)):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        self.state_.threshold = float(value)
        self.state_.threshold_method = method
        return self

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
        from .metrics import anomaly_threshold

        self._check_fitted("calibrate")
        y = np.asarray(list(labels)).astype(int)
        s = self.score_samples(images) if scores is None else np.asarray(scores, dtype=float)
        if len(s) != len(y):
            raise ValueError(f"{len(s)} images but {len(y)} labels")
        ok = np.isfinite(s)
        self.state_.threshold = float(
            anomaly_threshold(y[ok], s[ok], method=method, max_fpr=max_fpr, max_fnr=max_fnr)
        )
        self.state_.threshold_method = method
        return self
