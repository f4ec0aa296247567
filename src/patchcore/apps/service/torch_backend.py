"""The torch backend: a fitted :class:`~patchcore.core.detector.PatchCore` behind the service.

Imported only when it is built (:func:`patchcore.apps.service.backends.open_backend`), so the
service package itself loads without torch. Records come from :meth:`PatchCore.iter_inspect`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps.service.backends import check_warm_up
from patchcore.core.detector import PatchCore
from patchcore.lean import record
from patchcore.lean.pixels import output_size

__all__ = ["TorchBackend"]

logger = logging.getLogger("patchcore.apps.service")


def _box(b: Any) -> dict[str, int]:
    return {"top": int(b[0]), "left": int(b[1]), "bottom": int(b[2]), "right": int(b[3])}


class TorchBackend:
    """A fitted :class:`PatchCore`, or the path of a saved one (loaded by :meth:`load`).

    Args:
        model: the detector (already loaded) or its ``.pt`` file.
        threshold: overrides the model's ``threshold_`` (set on the detector).
    """

    kind = "torch"

    def __init__(self, model: PatchCore | str | os.PathLike, *, threshold: float | None = None):
        self._override = record.check_threshold(threshold)
        self._loaded = False
        self.detector: PatchCore | None = None
        self.path: Path | None = None
        if isinstance(model, PatchCore):
            self._adopt(model)
        else:
            self.path = Path(model)
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no such model file")

    def _adopt(self, det: PatchCore) -> None:
        if not hasattr(det, "memory_bank_"):
            raise ValueError("the detector is not fitted; fit or load one before serving it")
        if self._override is not None:
            det.set_threshold(self._override, method="manual (service)")
        if getattr(det, "threshold_", None) is None:
            raise ValueError(
                "the model has no threshold, so it cannot give verdicts; calibrate it "
                "(PatchCore.calibrate / set_threshold) and save it again, or pass a threshold"
            )
        self.detector = det

    def load(self) -> None:
        """Load (from a path), check every tensor is finite, warm up on a grey image; once."""
        if self._loaded:
            return
        if self.detector is None:
            assert self.path is not None
            self._adopt(PatchCore.load(self.path))
        det = self.detector
        assert det is not None
        det.check_finite()  # a NaN in the bank, backbone or threshold: never ready
        t0 = time.perf_counter()
        check_warm_up(self)
        logger.info(
            "model ready: %s, bank %d, threshold %.6g (warm-up %.2f s)",
            det.backbone,
            det.memory_bank_.shape[0],
            det.threshold_,
            time.perf_counter() - t0,
        )
        self._loaded = True

    @property
    def threshold(self) -> float:
        assert self.detector is not None
        return float(self.detector.threshold_)  # type: ignore[arg-type]

    def stored_display_range(self) -> tuple[float, float] | None:
        assert self.detector is not None
        stored = getattr(self.detector, "display_range_", None)
        if stored is None:  # the range the workflow's calibrate stored before it had its own
            stored = (self.detector.metadata_ or {}).get("display_range")
        return None if stored is None else (float(stored[0]), float(stored[1]))

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        assert self.detector is not None
        return output_size(height, width, self.detector.image_size, self.detector.scale)

    def inspect(self, images: list[tuple[str, np.ndarray]]) -> list[record.Inspection]:
        assert self.detector is not None
        stream = self.detector.iter_inspect([a for _, a in images], on_error="skip", progress=False)
        return [replace(r, image=images[r.index][0]) for r in stream]

    def explain(self, name: str, image: np.ndarray) -> tuple[record.Inspection, dict[str, Any]]:
        det = self.detector
        assert det is not None
        [e] = det.explain([image], on_error="skip", progress=False)
        if e.error is not None:
            return record.error_record(name, 0, e.error, threshold=self.threshold), {}
        rec = record.inspection(
            name,
            0,
            e.score,
            threshold=self.threshold,
            normalization_map=det.state_.normalization,
            size=image.shape[:2],
        )
        return rec, {
            "distance": e.distance,
            "worst_patch": _box(e.box),
            "nearest": {
                "bank_row": int(e.bank_row),  # type: ignore[arg-type]
                "training_image": e.train_index,
                "training_file": Path(e.train_name).name if e.train_name else None,
                "box": _box(e.train_box) if e.train_box else None,
            },
            "note": e.note,
        }

    def card(self) -> dict[str, Any]:
        assert self.detector is not None
        return self.detector.card()
