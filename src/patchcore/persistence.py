"""Model files: one ``torch.save`` file of plain tensors and a versioned config.

Layout (format ``"patchcore"``, version :data:`FORMAT_VERSION`)::

    {"format": "patchcore", "format_version": 1,
     "config": {constructor arguments..., "layers": [...], "mean": [...], "std": [...]},
     "memory_bank": (M, D) float32, "backbone_state": {name: tensor},
     "state": {"threshold", "threshold_method", "n_train_images", "n_train_patches",
               "feature_seconds", "coreset_seconds", "fit_seconds", "feature_dtype", "metadata"}}

Files are read with ``torch.load(weights_only=True)``: no pickled code runs. ``feature_dtype``
is absent from files written before it existed (read as ``"float32"``); ``backbone_dtype`` is left
out of the config when it is the default, so older readers can load the file.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .backbones import BACKBONE_DTYPES, FeatureExtractor
from .state import FittedState

if TYPE_CHECKING:
    from .detector import PatchCore

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ModelFileError", "config", "load", "save"]

FORMAT_NAME = "patchcore"
FORMAT_VERSION = 1

_STATE_KEYS = (  # FittedState fields written under "state" (skipped inputs are not saved)
    "threshold",
    "threshold_method",
    "n_train_images",
    "n_train_patches",
    "feature_seconds",
    "coreset_seconds",
    "fit_seconds",
    "feature_dtype",
    "metadata",
)


class ModelFileError(ValueError):
    """A saved model file that cannot be used; the message names the file and the problem."""


def config(det: PatchCore) -> dict[str, Any]:
    """The JSON-able configuration written into a model file."""
    p = det.get_params()
    p["layers"] = list(det.state_.layers)
    p["weights"] = None if det.weights is None else str(det.weights)
    if isinstance(p["image_size"], tuple):
        p["image_size"] = list(p["image_size"])
    p["mean"] = list(det.extractor_.mean)
    p["std"] = list(det.extractor_.std)
    p["device"] = det.device if det.device != "cuda" else "auto"
    # Fit-time only, and unknown to older readers' constructor: saved in "state" instead.
    p.pop("feature_dtype", None)
    # defaults unknown to older readers are left out: such files stay readable by them
    for key, default in (
        ("backbone_dtype", "float32"),
        ("search_precision", "auto"),
        ("max_bank_size", 16384),
    ):
        if p[key] == default:
            p.pop(key)
    return p


def save(det: PatchCore, path: str | os.PathLike) -> Path:
    """Write ``det`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    The temporary file is removed on any failure (KeyboardInterrupt included); an existing file
    at ``path`` is only replaced by a complete one.
    """
    path = Path(path)
    state = det.state_
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config(det),
        "memory_bank": state.memory_bank.cpu(),
        "backbone_state": {k: v.cpu() for k, v in det.extractor_.state_dict().items()},
        "state": {k: getattr(state, k) for k in _STATE_KEYS},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name in the same folder (so the rename is atomic), created with the umask's mode
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> dict[str, Any]:
    """The payload of a model file, checked for format and version."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(
            f"{path}: not a readable patchcore model file (damaged or another format: "
            f"{type(exc).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: not a patchcore model file")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by a newer patchcore (model format {version}); this version "
            f"reads format {FORMAT_VERSION} and older: upgrade patchcore"
        )
    missing = [k for k in ("config", "state", "memory_bank", "backbone_state") if k not in payload]
    if missing:
        raise ModelFileError(f"{path}: incomplete model file (missing {missing[0]!r})")
    return payload


def load(cls: type[PatchCore], path: str | os.PathLike, *, device: str | None = None) -> PatchCore:
    """Read a model file written by :func:`save` into a fitted ``cls`` instance.

    Args:
        cls: the detector class.
        path: the model file.
        device: run on this device instead of the saved one (``"cpu"``, ``"cuda"``, ``"auto"``).

    Raises:
        ModelFileError: the file is missing, damaged, foreign, newer, incomplete or invalid.
    """
    path = Path(path)
    payload = _read(path)
    try:
        cfg = dict(payload["config"])
        saved = dict(payload["state"])
        state = FittedState(
            memory_bank=payload["memory_bank"].float().contiguous(),
            layers=tuple(cfg["layers"]),
            n_train_images=saved["n_train_images"],
            n_train_patches=saved["n_train_patches"],
            feature_dtype=str(saved.get("feature_dtype", "float32")),  # older files: float32
            feature_seconds=saved["feature_seconds"],
            coreset_seconds=saved["coreset_seconds"],
            fit_seconds=saved["fit_seconds"],
            threshold=saved["threshold"],
            threshold_method=saved["threshold_method"],
            metadata=dict(saved.get("metadata") or {}),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: incomplete model file (missing {exc})") from None
    for k in ("mean", "std"):
        cfg.pop(k, None)
    if isinstance(cfg.get("image_size"), list):
        cfg["image_size"] = tuple(cfg["image_size"])
    if device is not None:
        cfg["device"] = device
    try:
        cfg["feature_dtype"] = state.feature_dtype  # built with the parameters it was fitted with
        det = cls(**cfg)
        det._validate()
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid model configuration ({exc})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weights come from the file, not from weights=None
        extractor = FeatureExtractor(
            det.backbone, state.layers, weights=None, dtype=BACKBONE_DTYPES[det.backbone_dtype]
        )
    try:
        extractor.load_state_dict(payload["backbone_state"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: backbone tensors do not fit ({exc})") from None
    det._set_fitted(state, extractor)
    return det
