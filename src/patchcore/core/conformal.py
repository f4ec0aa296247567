"""A threshold from normal images alone, with a finite-sample bound on the false-alarm rate.

Split conformal prediction (Vovk et al. 2005; Angelopoulos & Bates 2021, sec. 1): score ``n``
held-out normal images (never used to fit the model), sort their scores ``s_(1) <= ... <=
s_(n)`` and flag an image as anomalous when its score is *above* ``s_(k)``, the ``k``-th
smallest, with ``k = ceil((n + 1) (1 - alpha))``. When the calibration images and a new normal
image are exchangeable (drawn the same way from the same process), the rank of the new score
among the ``n + 1`` is uniform, so

    P(false alarm) = P(score_new > s_(k)) <= alpha,

marginally over the draw of the calibration images, and, without tied scores,
``P(false alarm) >= alpha - 1 / (n + 1)``. The bound is on the *expected* rate: the rate one
calibration set realises on later normals scatters around it (a Beta distribution of width
about ``sqrt(alpha / n)``), and it says nothing about images from a drifted process.

If ``k > n`` no threshold reaches the rate: it needs ``n >= 1 / alpha - 1`` normal images (99
for 1 %), and :class:`TooFewNormalImagesError` says so.

numpy only, like :mod:`patchcore.lean.normalization`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from patchcore.lean.record import ANOMALOUS, judge

__all__ = [
    "ConformalThreshold",
    "TooFewNormalImagesError",
    "conformal_rank",
    "conformal_threshold",
    "normal_images_needed",
]

#: Slack on ``(n + 1)(1 - alpha)`` before rounding up, so that 100 x 0.99 = 98.99999999999999
#: in binary floating point still gives rank 99 (the rank of the exact decimal rate).
_EPS = 1e-9


class TooFewNormalImagesError(ValueError):
    """Fewer held-out normal scores than the requested false-alarm rate needs.

    Attributes:
        needed: the smallest number of normal images that reaches the rate.
        given: how many (finite) scores there were.
    """

    def __init__(self, message: str, needed: int, given: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.given = given


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not (math.isfinite(a) and 0.0 < a < 1.0):
        raise ValueError(f"max_fpr (the false-alarm rate) must be in (0, 1), got {alpha!r}")
    return a


def conformal_rank(n: int, alpha: float) -> int:
    """``k = ceil((n + 1)(1 - alpha))``: the rank (1-based, ascending) of the threshold score.

    ``k > n`` means ``n`` scores cannot reach ``alpha`` (see :func:`normal_images_needed`).
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a count, got {n!r}")
    x = (int(n) + 1) * (1.0 - _check_alpha(alpha))
    return max(1, math.ceil(x - _EPS * max(1.0, x)))


def normal_images_needed(alpha: float) -> int:
    """The fewest held-out normal images for which a threshold reaches rate ``alpha``.

    The smallest ``n`` with ``conformal_rank(n, alpha) <= n``, i.e. ``n >= 1 / alpha - 1``
    (99 for 0.01, 19 for 0.05).
    """
    a = _check_alpha(alpha)
    n = max(1, math.floor(1.0 / a - 1.0) - 1)
    while conformal_rank(n, a) > n:
        n += 1
    return n


@dataclass(frozen=True)
class ConformalThreshold:
    """A split-conformal threshold and the facts it rests on.

    Attributes:
        threshold: verdict anomalous iff ``score >= threshold``; the next float64 above
            ``s_(rank)``, so an image scoring exactly ``s_(rank)`` is normal.
        max_fpr: the requested false-alarm rate ``alpha``.
        n: the calibration (normal) scores used.
        rank: ``k``, the rank of the score the threshold sits just above.
        fpr_bounds: ``(alpha - 1/(n+1), (n + 1 - k) / (n + 1))``: the expected false-alarm
            rate on a new exchangeable normal image lies in it (the upper end is <= alpha;
            the lower end holds when scores do not tie).
        calibration_fpr: share of the calibration scores at or above the threshold,
            ``(n - k) / n``.
    """

    threshold: float
    max_fpr: float
    n: int
    rank: int
    fpr_bounds: tuple[float, float]
    calibration_fpr: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-able fields (``fpr_bounds`` as a list), as stored in a model file."""
        d = asdict(self)
        d["fpr_bounds"] = list(self.fpr_bounds)
        return d


def conformal_threshold(scores: Any, max_fpr: float) -> ConformalThreshold:
    """The split-conformal threshold for false-alarm rate ``max_fpr`` on normal ``scores``.

    Args:
        scores: (n,) anomaly scores of held-out normal images (not used to fit the model),
            higher = more anomalous. All must be finite: drop unreadable images first.
        max_fpr: the false-alarm rate ``alpha``, in (0, 1).

    Returns:
        A :class:`ConformalThreshold`.

    Raises:
        ValueError: ``max_fpr`` outside (0, 1), scores not 1-D, empty or not finite.
        TooFewNormalImagesError: ``n < 1 / max_fpr - 1``; the message gives the number needed.
    """
    alpha = _check_alpha(max_fpr)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise ValueError(
            f"{bad} of {s.size} calibration scores are NaN or infinite; no threshold can be "
            "verified on them (drop unreadable images, check the model)"
        )
    n = int(s.size)
    k = conformal_rank(n, alpha)
    if k > n:
        need = normal_images_needed(alpha)
        raise TooFewNormalImagesError(
            f"a false-alarm rate of {alpha:g} needs at least {need} held-out normal images "
            f"(n >= 1/rate - 1); got {n}: add normal images that were not used for fitting, "
            f"or ask for a rate of at least {1.0 / (n + 1) if n else 1.0:.3g}",
            needed=need,
            given=n,
        )
    kth = float(np.partition(s, k - 1)[k - 1])
    t = float(np.nextafter(kth, np.inf))
    return ConformalThreshold(
        threshold=t,
        max_fpr=alpha,
        n=n,
        rank=k,
        fpr_bounds=(max(0.0, alpha - 1.0 / (n + 1)), (n + 1 - k) / (n + 1)),
        calibration_fpr=float((judge(s, t) == ANOMALOUS).mean()),
    )
