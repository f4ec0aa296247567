"""PatchCore anomaly detection and defect localisation for industrial inspection images.

Example:
    >>> from patchcore import PatchCore
    >>> det = PatchCore().fit(["good1.png", "good2.png"])
    >>> det.score_samples(["part.png"])  # higher = more anomalous

Names are imported lazily so that light modules (metrics, plots) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PatchCore": "core.detector",
    "Classification": "core.results",
    "ImageResult": "core.results",
    "ScoreResult": "core.results",
    "Skipped": "core.inputs",
    "FittedState": "core.state",
    "ModelFileError": "core.persistence",
    "NotFittedError": "core.state",
    "NonFiniteScoreError": "core.verdicts",
    "FeatureExtractor": "core.backbones",
    "BackboneWeightsError": "core.backbones",
    "BACKBONES": "core.backbones",
    "ImageReadError": "core.images",
    "Region": "lean.regions",
    "ImageRegions": "lean.regions",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'patchcore' has no attribute {name!r}")
