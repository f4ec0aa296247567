"""Model files: one ``torch.save`` file of plain tensors and a versioned config.

Layout (format ``"patchcore"``, version :data:`FORMAT_VERSION`)::

    {"format": "patchcore", "format_version": 1 or 2,
     "config": {constructor arguments..., "layers": [...], "mean": [...], "std": [...]},
     "memory_bank": (M, D) float32, "backbone_state": {name: tensor},
     "state": {"threshold", "threshold_method", "n_train_images", "n_train_patches",
               "feature_seconds", "coreset_seconds", "fit_seconds", "feature_dtype", "metadata"}}

plus ``"digest": {"algorithm": "sha256", "value": hex}``: the SHA-256 of the config and state
(canonical JSON) and of every tensor (name, dtype, shape and bytes), written at save and checked
at load, so one flipped byte anywhere is a :class:`ModelFileError` naming the file. Files written
before the digest existed (same format version) still load, with one warning per process that
damage to them cannot be detected. Every field is validated (types, shapes, finiteness,
version) with a message naming the file and the field.

Optional entries (absent from older files, which load with their defaults): ``"provenance"``,
an (M, 3) int32 tensor (training image, patch row, patch column of each bank row; in the digest
when present), and the state fields ``train_names``, ``train_grids``, ``updates``,
``train_digests`` (content digests of the training images), ``input_profile`` (the profile of
:mod:`patchcore.lean.ood`) and ``threshold_history`` (written only when set, so a file without
them is written back key for key as it was read). A file with
``"provenance"`` is format version 2 (readers of version 1 refuse its extra top-level entry, so
they must say "newer patchcore: upgrade", not "damaged"); one without it stays version 1.

Files are read with ``torch.load(weights_only=True)``: no pickled code runs. ``feature_dtype``
is absent from files written before it existed (read as ``"float32"``); ``backbone_dtype`` is left
out of the config when it is the default, so older readers can load the file. The optional state
entries ``calibration``, ``normalization``, ``region_threshold``, ``region_threshold_method``,
``map_scale`` and ``display_range`` are left out when None (older readers ignore them); a file
with a threshold but no ``normalization`` (written before it existed) gets the hand-set mapping
``fit_normalization(None, threshold)``, as ``set_threshold`` gives; a stored one is checked
with ``check_mapping`` and must map the file's threshold to 0.5. A file without ``map_scale``
cuts its regions at the image threshold, as it did when written; one without
``display_range`` takes the workflow's ``metadata["display_range"]`` when it has one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from patchcore.core.backbones import BACKBONE_DTYPES, FeatureExtractor
from patchcore.core.state import FittedState
from patchcore.core.validation import validate_params
from patchcore.lean.normalization import check_mapping, fit_normalization
from patchcore.lean.util import one_line

if TYPE_CHECKING:
    from patchcore.core.detector import PatchCore

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ModelFileError",
    "config",
    "digest",
    "load",
    "save",
]

FORMAT_NAME = "patchcore"
FORMAT_VERSION = 2  #: the newest version written and read; see the module docstring

#: Optional "state" entries: left out of the file when None (older files lack them).
_OPTIONAL_STATE = (
    "calibration",
    "normalization",
    "region_threshold",
    "region_threshold_method",
    "map_scale",
    "display_range",
)
#: FittedState fields written under "state" (skipped inputs are not saved).
_STATE_KEYS = (
    "threshold",
    "threshold_method",
    "n_train_images",
    "n_train_patches",
    "feature_seconds",
    "coreset_seconds",
    "fit_seconds",
    "feature_dtype",
    "metadata",
    *_OPTIONAL_STATE,
)

#: Written only when set (non-empty), so a file without them is written back as it was read.
_OPTIONAL_STATE_KEYS = (
    "train_names",
    "train_grids",
    "updates",
    "train_digests",
    "input_profile",
    "threshold_history",
)

_KEYS = ("format", "format_version", "config", "memory_bank", "backbone_state", "state")
_OPTIONAL_KEYS = ("provenance",)  # top-level entries a file may lack (older writers)
_legacy_warned = False


class ModelFileError(ValueError):
    """A saved model file that cannot be used; the message names the file and the problem."""


def digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of a payload's config, state and tensors (name, dtype, shape, bytes)."""
    h = hashlib.sha256()

    def text(obj: Any) -> None:
        data = json.dumps(obj, sort_keys=True, allow_nan=True, default=repr).encode()
        h.update(len(data).to_bytes(8, "little") + data)

    def tensor(name: str, t: torch.Tensor) -> None:
        text([name, str(t.dtype), list(t.shape)])
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        h.update(len(raw).to_bytes(8, "little") + raw)

    text([payload["format"], payload["format_version"], payload["config"], payload["state"]])
    tensor("memory_bank", payload["memory_bank"])
    if "provenance" in payload:  # absent from older files: their digests are unchanged
        tensor("provenance", payload["provenance"])
    for name in sorted(payload["backbone_state"]):
        tensor(f"backbone_state.{name}", payload["backbone_state"][name])
    return h.hexdigest()


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
    # values older readers assume are left out: such files stay readable by them
    for key, implied in IMPLIED_WHEN_ABSENT.items():
        if p[key] == implied:
            p.pop(key)
    return p


IMPLIED_WHEN_ABSENT: dict[str, Any] = {
    "backbone_dtype": "float32",
    "search_precision": "auto",
    "max_bank_size": 16384,
    "top_k": 1,  # files from before top_k scored the largest patch (not today's default)
    "augment": None,
}
"""Configuration keys added after the first format: what a file without one of them means.
:func:`config` leaves a key out when it has this value and :func:`load` fills it back in, so a
change of a constructor default never changes how an existing file scores."""


def save(det: PatchCore, path: str | os.PathLike) -> Path:
    """Write ``det`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    The temporary file is removed on any failure (KeyboardInterrupt included); an existing file
    at ``path`` is only replaced by a complete one.
    """
    path = Path(path)
    state = det.state_
    payload = {
        "format": FORMAT_NAME,
        # version 2 only where needed: version-1 readers refuse the "provenance" entry
        "format_version": FORMAT_VERSION if state.provenance is not None else 1,
        "config": config(det),
        "memory_bank": state.memory_bank.cpu(),
        "backbone_state": {k: v.cpu() for k, v in det.extractor_.state_dict().items()},
        "state": {
            k: list(getattr(state, k)) if k == "display_range" else getattr(state, k)
            for k in _STATE_KEYS
            if not (k in _OPTIONAL_STATE and getattr(state, k) is None)
        },
    }
    for k in _OPTIONAL_STATE_KEYS:
        value = getattr(state, k)
        if value:  # None or empty: left out, as older writers did
            payload["state"][k] = [list(v) for v in value] if k == "train_grids" else value
    if state.provenance is not None:
        payload["provenance"] = state.provenance.cpu().to(torch.int32).contiguous()
    payload["digest"] = {"algorithm": "sha256", "value": digest(payload)}
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
    """The payload of a model file, checked for format, version, keys and digest."""
    global _legacy_warned
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
    if "format_version" not in payload:
        raise ModelFileError(f"{path}: no format version (damaged, or not written by patchcore)")
    version = payload["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(
            f"{path}: format version {version!r} is not a positive integer (damaged file)"
        )
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by a newer patchcore (model format {version}); this version "
            f"reads format {FORMAT_VERSION} and older: upgrade patchcore"
        )
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise ModelFileError(f"{path}: incomplete model file (missing {missing[0]!r})")
    unknown = sorted(str(k) for k in set(payload) - {*_KEYS, *_OPTIONAL_KEYS, "digest"})
    if unknown:
        raise ModelFileError(f"{path}: unexpected entries {unknown} (damaged file)")
    _check_types(path, payload)
    if "digest" in payload:
        d = payload["digest"]
        if not (isinstance(d, dict) and d.get("algorithm") == "sha256"):
            raise ModelFileError(f"{path}: unreadable digest entry (damaged file)")
        if d.get("value") != digest(payload):
            raise ModelFileError(
                f"{path}: damaged model file: its contents do not match the SHA-256 digest "
                "written at save (a changed or corrupted byte); use an intact copy"
            )
    elif not _legacy_warned:
        _legacy_warned = True
        warnings.warn(
            f"{path}: written before model files carried a digest, so damage to it cannot be "
            "detected; save it again to add one",
            UserWarning,
            stacklevel=4,
        )
    return payload


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_types(path: Path, payload: dict[str, Any]) -> None:
    """Every field of a payload of the right type, shape and finiteness, or ModelFileError."""

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: invalid model file: {what}")

    cfg, saved, bank, tensors = (
        payload[k] for k in ("config", "state", "memory_bank", "backbone_state")
    )
    if not isinstance(cfg, dict):
        raise bad(f"config is a {type(cfg).__name__}, not a mapping")
    if not isinstance(saved, dict):
        raise bad(f"state is a {type(saved).__name__}, not a mapping")
    if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or not bank.is_floating_point():
        raise bad("memory_bank is not a 2-D float tensor")
    if bank.shape[0] < 1 or bank.shape[1] < 1:
        raise bad(f"memory_bank has shape {tuple(bank.shape)}")
    if not bool(torch.isfinite(bank).all()):
        raise bad("memory_bank holds NaN or infinite values")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise bad("backbone_state is not a mapping of names to tensors")
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise bad(f"backbone tensor {k!r} holds NaN or infinite values")
    layers = cfg.get("layers")
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(x, str) for x in layers)
    ):
        raise bad(f"config 'layers' is {layers!r}, not a list of layer names")
    for k in ("mean", "std"):
        v = cfg.get(k)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_finite_number, v))):
            raise bad(f"config {k!r} is {v!r}, not three finite numbers")
    for k in ("n_train_images", "n_train_patches"):
        v = saved.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"state {k!r} is {v!r}, not a count")
    for k in ("feature_seconds", "coreset_seconds", "fit_seconds"):
        v = saved.get(k)
        if not _finite_number(v) or v < 0:
            raise bad(f"state {k!r} is {v!r}, not a duration in seconds")
    t = saved.get("threshold", "missing")
    if t is not None and not _finite_number(t):
        raise bad(f"state 'threshold' is {t!r}, not a finite number or None")
    m = saved.get("threshold_method", "missing")
    if m is not None and not isinstance(m, str):
        raise bad(f"state 'threshold_method' is {m!r}, not a string or None")
    rt = saved.get("region_threshold")
    if rt is not None and not _finite_number(rt):
        raise bad(f"state 'region_threshold' is {rt!r}, not a finite number or None")
    rm = saved.get("region_threshold_method")
    if rm is not None and not isinstance(rm, str):
        raise bad(f"state 'region_threshold_method' is {rm!r}, not a string or None")
    ms = saved.get("map_scale")
    if ms is not None and not (_finite_number(ms) and ms > 0):
        raise bad(f"state 'map_scale' is {ms!r}, not a positive finite number or None")
    dr = saved.get("display_range")
    if dr is not None and not (
        isinstance(dr, (list, tuple)) and len(dr) == 2 and all(map(_finite_number, dr))
    ):
        raise bad(f"state 'display_range' is {dr!r}, not two finite numbers or None")
    f = saved.get("feature_dtype", "float32")
    if f not in ("float16", "float32"):
        raise bad(f"state 'feature_dtype' is {f!r}, not 'float16' or 'float32'")
    md = saved.get("metadata")
    if md is not None and not isinstance(md, dict):
        raise bad(f"state 'metadata' is a {type(md).__name__}, not a mapping")
    c = saved.get("calibration")
    if c is not None and not isinstance(c, dict):
        raise bad(f"state 'calibration' is a {type(c).__name__}, not a mapping")
    if "normalization" in saved:
        if t is None:
            raise bad("state 'normalization' is stored without a threshold")
        try:
            mapping = check_mapping(saved["normalization"])
        except ValueError as exc:
            raise bad(f"state {exc}") from None
        if mapping["threshold"] != t:
            raise bad(
                f"state 'normalization' maps threshold {mapping['threshold']!r} to 0.5, but "
                f"the threshold is {t!r}"
            )
    _check_provenance(bad, payload, saved)


def _check_provenance(bad: Any, payload: dict[str, Any], saved: dict[str, Any]) -> None:
    """The optional provenance tensor, training names, grids and update records, or ``bad``."""
    names = saved.get("train_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        raise bad("state 'train_names' is not a list of strings")
    grids = saved.get("train_grids")
    if grids is not None and not (
        isinstance(grids, list)
        and all(
            isinstance(g, (list, tuple))
            and len(g) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g)
            for g in grids
        )
    ):
        raise bad("state 'train_grids' is not a list of (H, W, h, w) positive integers")
    if names is not None and grids is not None and len(names) != len(grids):
        raise bad(f"state has {len(names)} 'train_names' but {len(grids)} 'train_grids'")
    for key in ("updates", "threshold_history"):
        entries = saved.get(key)
        if entries is not None and not (
            isinstance(entries, list) and all(isinstance(u, dict) for u in entries)
        ):
            raise bad(f"state {key!r} is not a list of records")
    found = saved.get("train_digests")
    if found is not None and not (
        isinstance(found, list) and all(d is None or isinstance(d, str) for d in found)
    ):
        raise bad("state 'train_digests' is not a list of strings")
    if found is not None and names is not None and len(found) != len(names):
        raise bad(f"state has {len(names)} 'train_names' but {len(found)} 'train_digests'")
    profile = saved.get("input_profile")
    if profile is not None and not isinstance(profile, dict):
        raise bad("state 'input_profile' is not a mapping")
    if "provenance" not in payload:
        return
    prov, bank = payload["provenance"], payload["memory_bank"]
    if not (
        isinstance(prov, torch.Tensor)
        and prov.dtype == torch.int32
        and prov.ndim == 2
        and prov.shape[1] == 3
    ):
        raise bad(f"provenance is not an ({bank.shape[0]}, 3) int32 tensor")
    if prov.numel() and int(prov.min()) < 0:
        raise bad("provenance holds negative indices")
    if grids is not None and prov.numel():
        g = torch.tensor(grids, dtype=torch.int64).view(-1, 4)
        img = prov[:, 0].long()
        if int(img.max()) >= g.shape[0]:
            raise bad(f"provenance names training image {int(img.max())} of {g.shape[0]}")
        if bool((prov[:, 1].long() >= g[img, 2]).any() | (prov[:, 2].long() >= g[img, 3]).any()):
            raise bad("provenance holds a patch outside its training image's grid")


def _display_range(saved: dict[str, Any]) -> tuple[float, float] | None:
    """The stored display range; in files from before it was state, the one the workflow kept
    in ``metadata["display_range"]`` (read leniently: a malformed one is None)."""
    stored = saved.get("display_range")
    if stored is None:
        stored = (saved.get("metadata") or {}).get("display_range")
        ok = isinstance(stored, (list, tuple)) and len(stored) == 2
        if not (ok and all(map(_finite_number, stored))):
            return None
    return (float(stored[0]), float(stored[1]))


def _fitted_state(payload: dict[str, Any], cfg: dict[str, Any]) -> FittedState:
    """The :class:`FittedState` a payload holds (older files: the fields they lack as
    documented beside each). Raises KeyError, TypeError, AttributeError or ValueError."""
    saved = dict(payload["state"])
    return FittedState(
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
        calibration=saved.get("calibration"),
        # files written before normalised scores: the hand-set mapping [0, t, 2t]
        normalization=(
            check_mapping(saved["normalization"])
            if "normalization" in saved
            else None
            if saved["threshold"] is None
            else fit_normalization(None, saved["threshold"])
        ),
        metadata=dict(saved.get("metadata") or {}),
        region_threshold=saved.get("region_threshold"),  # absent from older files
        region_threshold_method=saved.get("region_threshold_method"),
        map_scale=saved.get("map_scale"),  # older files: None, regions cut at threshold
        display_range=_display_range(saved),
        # optional: older files have none of these
        provenance=payload.get("provenance"),
        train_names=saved.get("train_names"),
        train_grids=[tuple(g) for g in saved["train_grids"]]
        if saved.get("train_grids") is not None
        else None,
        updates=list(saved.get("updates") or []),
        train_digests=saved.get("train_digests"),  # older files: None (names only)
        input_profile=saved.get("input_profile"),  # older files: None (no hints)
        threshold_history=list(saved.get("threshold_history") or []),
    )


def load(
    cls: type[PatchCore], path: str | os.PathLike, *, device: str | None = None
) -> tuple[PatchCore, FittedState, FeatureExtractor]:
    """Read a model file written by :func:`save`: an unfitted ``cls`` instance with the saved
    parameters, the fitted state and the backbone holding the saved weights (the detector
    installs them, :meth:`PatchCore.load`).

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
        state = _fitted_state(payload, cfg)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ModelFileError(f"{path}: incomplete model file (missing {exc})") from None
    for k in ("mean", "std"):
        cfg.pop(k, None)
    for k, implied in IMPLIED_WHEN_ABSENT.items():
        cfg.setdefault(k, implied)
    if isinstance(cfg.get("image_size"), list):
        cfg["image_size"] = tuple(cfg["image_size"])
    if device is not None:
        cfg["device"] = device
    try:
        cfg["feature_dtype"] = state.feature_dtype  # built with the parameters it was fitted with
        det = cls(**cfg)
        validate_params(det)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{path}: invalid model configuration ({exc})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weights come from the file, not from weights=None
        try:
            extractor = FeatureExtractor(
                det.backbone,
                state.layers,
                weights=None,
                dtype=BACKBONE_DTYPES[det.backbone_dtype],
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{path}: invalid model configuration ({exc})") from None
    try:
        extractor.load_state_dict(payload["backbone_state"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: backbone tensors do not fit ({one_line(exc, 200)})"
        ) from None
    dim = sum(extractor.channels().values())
    want = min(det.embed_dim, dim) if det.embed_dim else dim
    if state.memory_bank.shape[1] != want:
        raise ModelFileError(
            f"{path}: invalid model file: memory_bank has {state.memory_bank.shape[1]} "
            f"features per row, the backbone gives {want}"
        )
    prov = state.provenance  # rows checked after the bank's own shape (its message first)
    if prov is not None and prov.shape[0] != state.memory_bank.shape[0]:
        raise ModelFileError(
            f"{path}: invalid model file: provenance is not an "
            f"({state.memory_bank.shape[0]}, 3) int32 tensor (it has {prov.shape[0]} rows)"
        )
    return det, state, extractor
