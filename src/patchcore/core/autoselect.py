"""The ``auto`` preset: choose a configuration on the user's own labelled images.

Each candidate (at most four, :data:`CANDIDATES`, cheapest first) is fitted on the training
images and scored on a labelled *calibration* set; the one with the highest image AUROC there
is kept (ties go to the cheaper). The images it is judged on must not be the ones its accuracy
is later reported on: the workflow (``patchcore fit --preset auto``) splits the labelled images
per label, chooses and calibrates on one half and leaves the other for ``evaluate``.

A time budget bounds the search: the first candidate always runs; each later one only when its
expected time (the first one's measured time x its relative cost) fits in what is left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from patchcore.core.detector import PatchCore
from patchcore.core.inputs import as_list
from patchcore.core.metrics import auroc
from patchcore.core.presets import preset_params

__all__ = ["CANDIDATES", "AutoCandidate", "CandidateResult", "Selection", "auto_select"]


@dataclass(frozen=True)
class AutoCandidate:
    """One configuration the ``auto`` preset may choose.

    Attributes:
        name: short label shown in summaries.
        params: PatchCore keyword arguments (the defaults for the others).
        cost: expected fit + scoring time relative to the first candidate (for the budget).
        summary: what it is for.
    """

    name: str
    params: MappingProxyType = field(repr=False)
    cost: float
    summary: str


def _candidate(name: str, cost: float, summary: str, **params: Any) -> AutoCandidate:
    return AutoCandidate(name, MappingProxyType(params), cost, summary)


CANDIDATES: tuple[AutoCandidate, ...] = (
    _candidate("balanced", 1.0, "a smaller backbone", **preset_params("balanced")),
    _candidate("accurate", 1.2, "the defaults", **preset_params("accurate")),
    _candidate(
        "accurate x1.5",
        2.5,
        "images upsampled 1.5x: defects a few pixels wide",
        **preset_params("accurate"),
        scale=1.5,
    ),
    _candidate(
        "accurate+rot90",
        4.0,
        "the bank also holds the training images turned: parts seen in any orientation",
        **preset_params("accurate"),
        augment="rot90",
    ),
)
"""The candidates, cheapest first, and their expected cost relative to the first
(benchmarks/RESULTS.md, "Paired cost of the leads": rot90 fits 4x the patches; x1.5 2.25x)."""


@dataclass
class CandidateResult:
    """How one candidate did: ``status`` is ``"chosen"``, ``"fitted"`` or ``"skipped: ..."``."""

    name: str
    params: dict[str, Any]
    status: str
    calibration_auroc: float | None = None
    fit_seconds: float = 0.0
    score_seconds: float = 0.0
    ms_per_image: float = 0.0


@dataclass
class Selection:
    """The outcome of :func:`auto_select`: the chosen, fitted detector and every candidate's row."""

    detector: PatchCore
    chosen: str
    candidates: list[CandidateResult]
    calibration_images: int
    seconds: float
    budget_seconds: float | None

    def record(self) -> dict[str, Any]:
        """JSON-able facts for the model's metadata (``metadata_["auto_preset"]``)."""
        return {
            "chosen": self.chosen,
            "candidates": [asdict(c) for c in self.candidates],
            "calibration_images": self.calibration_images,
            "seconds": round(self.seconds, 1),
            "budget_seconds": self.budget_seconds,
        }


ProgressFn = Callable[[str], None]


def _run(
    cand: AutoCandidate,
    train: Any,
    calib: list[Any],
    y: np.ndarray,
    on_error: str,
    params: dict[str, Any],
) -> tuple[PatchCore, CandidateResult]:
    """Fit ``cand`` on ``train``, score ``calib``: the detector and its row."""
    t0 = time.perf_counter()
    det = PatchCore(**params).fit(train, on_error=on_error)
    t1 = time.perf_counter()
    scores = det.score(calib, on_error=on_error).scores
    t2 = time.perf_counter()
    ok = np.isfinite(scores)
    area = float(auroc(y[ok], scores[ok])) if len(set(y[ok].tolist())) == 2 else None
    row = CandidateResult(
        cand.name,
        dict(cand.params),
        "fitted",
        calibration_auroc=None if area is None else round(area, 6),
        fit_seconds=round(t1 - t0, 2),
        score_seconds=round(t2 - t1, 2),
        ms_per_image=round((t2 - t1) / max(1, len(calib)) * 1000, 1),
    )
    return det, row


def auto_select(
    train: Any,
    calibration: Any,
    labels: Sequence[int] | np.ndarray,
    *,
    candidates: Sequence[AutoCandidate] | None = None,
    budget_seconds: float | None = None,
    on_error: str = "skip",
    report: ProgressFn | None = None,
    **params: Any,
) -> Selection:
    """Fit every candidate on ``train``, keep the best by image AUROC on ``calibration``.

    Args:
        train: normal training images (anything :meth:`PatchCore.fit` takes).
        calibration: labelled images to choose on, none of them in ``train``; never the
            images the chosen model's accuracy is reported on.
        labels: (N,) 1 = anomalous, for ``calibration``; both labels must occur.
        candidates: the configurations, cheapest first (default :data:`CANDIDATES`).
        budget_seconds: time box for the whole search (``None``: run every candidate); the
            first candidate always runs.
        on_error: for unreadable images, as in :meth:`PatchCore.fit` (default ``"skip"``).
        report: called with a line of text as each candidate starts and ends.
        **params: PatchCore keyword arguments applied to every candidate (``seed``,
            ``device``, ``batch_size``, ``progress``...); a candidate's own settings win for
            the parameters it names.

    Returns:
        :class:`Selection`; its detector's ``metadata_["auto_preset"]`` holds the record.

    Raises:
        ValueError: no candidate, more than four, labels of the wrong length or a single label.
    """
    cands = list(CANDIDATES if candidates is None else candidates)
    if not 1 <= len(cands) <= 4:
        raise ValueError(f"auto needs 1 to 4 candidates, got {len(cands)}")
    y = np.asarray(labels).astype(int)
    calib = as_list(calibration)
    if len(y) != len(calib):
        raise ValueError(f"{len(calib)} calibration images but {len(y)} labels")
    if len(set(y.tolist())) < 2:
        raise ValueError("calibration images need both labels (normal and anomalous)")
    if budget_seconds is not None and not budget_seconds > 0:
        raise ValueError(f"budget_seconds must be > 0 or None, got {budget_seconds!r}")
    say = report or (lambda _line: None)
    start = time.perf_counter()
    rows: list[CandidateResult] = []
    best: tuple[float, int, PatchCore] | None = None
    unit: float | None = None  # seconds per unit of cost, from the first candidate
    for i, cand in enumerate(cands):
        left = None if budget_seconds is None else budget_seconds - (time.perf_counter() - start)
        if unit is not None and left is not None and unit * cand.cost > left:
            why = f"skipped: about {unit * cand.cost:.0f} s expected, {max(left, 0):.0f} s left"
            rows.append(CandidateResult(cand.name, dict(cand.params), why))
            say(f"auto: [{i + 1}/{len(cands)}] {cand.name} {why} of the budget")
            continue
        say(f"auto: [{i + 1}/{len(cands)}] {cand.name}: fitting on the training images")
        det, row = _run(cand, train, calib, y, on_error, {**params, **cand.params})
        unit = unit or (row.fit_seconds + row.score_seconds) / cand.cost
        rows.append(row)
        area = row.calibration_auroc
        say(
            f"auto: [{i + 1}/{len(cands)}] {cand.name}: calibration image AUROC "
            f"{'n/a' if area is None else f'{area:.4f}'} ({row.fit_seconds:.0f} s fit, "
            f"{row.ms_per_image:.0f} ms per image)"
        )
        rank = -math.inf if area is None else area  # ties: the earlier (cheaper) stays
        if best is None or rank > best[0]:
            best = (rank, len(rows) - 1, det)
        del det
    if best is None:  # the first candidate always runs (the budget is checked after it)
        raise RuntimeError("no candidate was fitted")
    rows[best[1]].status = "chosen"
    chosen = best[2]
    selection = Selection(
        detector=chosen,
        chosen=rows[best[1]].name,
        candidates=rows,
        calibration_images=len(calib),
        seconds=time.perf_counter() - start,
        budget_seconds=budget_seconds,
    )
    chosen.metadata_ = {**chosen.metadata_, "auto_preset": selection.record()}
    return selection
