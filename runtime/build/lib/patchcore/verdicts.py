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

__all__ = ["NonFiniteScoreError", "VerdictMixin", "nonfinite_parts"]


class NonFiniteScoreError(ValueError):
    """A readable image scored NaN or infinite: the model (bank, backbone) holds non-finite
    values or overflowed. Never read as a verdict: ``NaN >= threshold`` would be "normal"."""


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
