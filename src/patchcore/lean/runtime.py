"""Torch-free runtime for exported detectors: onnxruntime (or OpenVINO) + numpy + Pillow only.

Reads a folder written by :func:`patchcore.core.export.export` (``patchcore-export.json`` plus the
graph), checks the manifest's format, version and the graph's SHA-256, and scores images with the
same decoding and resizing as the torch path (:mod:`patchcore.lean.pixels`)::

    from patchcore.lean.runtime import ExportedModel
    model = ExportedModel("export_dir")
    r = model.score(["part.png"], maps="native")
    r.scores, r.normalized, r.maps, r.skipped
    model.predict(["part.png"])  # verdicts: score >= threshold

Scores are raw distances, higher = more anomalous; ``normalized`` maps them onto [0, 1] with the
threshold at 0.5 (:mod:`patchcore.lean.normalization`: a mapping, not a probability). Nothing here
imports torch (tests/test_export.py runs it with torch made unimportable).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchcore.lean import normalization
from patchcore.lean.pixels import (
    ImageReadError,
    input_limits,
    output_size,
    pil_to_array,
    read_image,
    resize_array,
    resize_maps,
    to_chw,
)
from patchcore.lean.util import bounded_map

__all__ = [
    "BACKENDS",
    "ExportFileError",
    "ExportedModel",
    "RuntimeResult",
    "RuntimeSkipped",
    "load_manifest",
    "open_session",
]

EXPORT_FORMAT = "patchcore-export"  # patchcore.core.export (which imports torch) imports these
EXPORT_VERSION = 1
MANIFEST = "patchcore-export.json"
BACKENDS = ("onnxruntime", "openvino")
DECODE_THREADS = 2  # as patchcore.core.inputs


class ExportFileError(ValueError):
    """An export folder that cannot be used; the message names the file and the problem."""


def file_sha256(paths: list[Path]) -> str:
    """SHA-256 (hex) over the bytes of ``paths`` in order (each length-prefixed)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        data = Path(p).read_bytes()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``folder/patchcore-export.json`` and the files it lists (SHA-256).

    Raises:
        ExportFileError: missing, foreign, newer, damaged, or a graph file that changed.
    """
    root = Path(folder)
    if root.is_file():  # a path to the manifest or the graph: its folder
        root = root.parent
    path = root / MANIFEST
    if not path.is_file():
        raise ExportFileError(f"{path}: no export manifest (run 'patchcore export' first)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportFileError(f"{path}: cannot read the manifest ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise ExportFileError(f"{path}: not a patchcore export manifest")
    if info.get("version") != EXPORT_VERSION:
        raise ExportFileError(
            f"{path}: export version {info.get('version')!r}; this runtime reads version "
            f"{EXPORT_VERSION} (export the model again with this version of patchcore)"
        )
    files = [root / str(f) for f in info.get("files", [])]
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise ExportFileError(f"{path}: graph file(s) missing: {', '.join(map(str, missing))}")
    if file_sha256(files) != info.get("sha256"):
        raise ExportFileError(
            f"{path}: {', '.join(f.name for f in files)} do not match the manifest's SHA-256 "
            "(damaged or replaced): export again"
        )
    if info.get("normalization") is not None:
        try:
            info["normalization"] = normalization.check_mapping(info["normalization"])
        except ValueError as exc:
            raise ExportFileError(f"{path}: {exc}") from None
    info["_root"] = str(root)
    return info


class _Session:
    """One graph ready to run: ``run(pixels (B, 3, H, W) float32) -> (scores (B,), maps)``."""

    def __init__(self, root: Path, info: dict[str, Any], backend: str, threads: int | None):
        self.backend = backend
        files = [root / f for f in info["files"]]
        if backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads is not None:
                opts.intra_op_num_threads = int(threads)
            onnx = next((f for f in files if f.suffix == ".onnx"), None)
            if onnx is None:
                raise ExportFileError(f"{root}: no .onnx graph for onnxruntime")
            self._ort = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
        elif backend == "openvino":
            try:
                import openvino as ov
            except ImportError:
                raise ExportFileError(
                    "backend 'openvino' needs the openvino package: pip install openvino"
                ) from None
            core = ov.Core()
            xml = next((f for f in files if f.suffix == ".xml"), None)
            graph = xml or next(f for f in files if f.suffix == ".onnx")
            config = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads is not None:
                config["INFERENCE_NUM_THREADS"] = str(int(threads))
            self._ov = core.compile_model(core.read_model(str(graph)), "CPU", config)
        else:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.backend == "onnxruntime":
            scores, maps = self._ort.run(["scores", "maps"], {"pixels": x})
        else:
            res = self._ov(x)
            scores, maps = res[0], res[1]
        return np.asarray(scores), np.asarray(maps)


def open_session(
    folder: str | os.PathLike,
    info: dict[str, Any] | None = None,
    *,
    backend: str | None = None,
    threads: int | None = None,
) -> _Session:
    """A session on an export folder; ``backend`` None: OpenVINO for an OpenVINO export,
    onnxruntime otherwise."""
    info = load_manifest(folder) if info is None else info
    root = Path(info.get("_root", folder))
    if backend is None:
        backend = (
            "openvino" if any(str(f).endswith(".xml") for f in info["files"]) else ("onnxruntime")
        )
    return _Session(root, info, backend, threads)


class RuntimeSkipped:
    """An input left out: its position, name and the problem (as :class:`patchcore.Skipped`)."""

    __slots__ = ("index", "name", "reason")

    def __init__(self, index: int, name: str, reason: str) -> None:
        self.index, self.name, self.reason = index, name, reason

    def __repr__(self) -> str:
        return f"RuntimeSkipped({self.index}, {self.name!r}, {self.reason!r})"


@dataclass
class RuntimeResult:
    """What :meth:`ExportedModel.score` returns.

    Attributes:
        names: each input's name (its path, or ``"image #i"``).
        scores: (N,) float64 raw scores, higher = more anomalous, NaN where skipped.
        normalized: (N,) float64 in [0, 1] (threshold at 0.5), or None without a mapping.
        maps: N float32 maps (None where skipped), or None when no maps were asked for.
        skipped: the inputs that could not be read.
    """

    names: list[str]
    scores: np.ndarray
    normalized: np.ndarray | None
    maps: list[np.ndarray | None] | None
    skipped: list[RuntimeSkipped] = field(default_factory=list)


def _name(image: Any, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image #{index}"


class ExportedModel:
    """An exported detector, scored without torch.

    Args:
        folder: the export folder (or its manifest / graph file).
        backend: ``"onnxruntime"`` or ``"openvino"``; ``None``: by the export's format.
        threads: intra-op threads (``None``: the backend's default, all cores).
        batch_size: images per graph call (``None``: the model's ``batch_size``).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        backend: str | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.info = load_manifest(folder)
        self.session = open_session(folder, self.info, backend=backend, threads=threads)
        self.backend = self.session.backend
        self.batch_size = int(batch_size or self.info.get("batch_size") or 8)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")

    @property
    def threshold(self) -> float | None:
        """The verdict threshold (score >= threshold = anomalous), None if never set."""
        t = self.info.get("threshold")
        return None if t is None else float(t)

    @property
    def normalization(self) -> dict[str, Any] | None:
        """The score normalisation mapping (see :mod:`patchcore.lean.normalization`), or None."""
        return self.info.get("normalization")

    def _target(self, name: str, h: int, w: int) -> tuple[int, int]:
        size = self.info.get("image_size")
        target = output_size(h, w, tuple(size) if size else None, self.info.get("scale"))
        input_limits().check_processed(name, *target)
        fixed = self.info.get("processed_size")
        if fixed is not None and tuple(target) != tuple(fixed):
            raise ImageReadError(name, f"processed size {target} differs from the export's {fixed}")
        radius = int(self.info.get("blur_radius", 0))
        if self.info.get("dynamic") and min(target) <= max(radius, 31):
            raise ImageReadError(
                name,
                f"would be processed at {target[1]}x{target[0]}: the dynamic export needs both "
                f"sides > {max(radius, 31)} pixels",
            )
        return target

    def _decode(self, image: Any, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """One input -> (3, H, W) float32 at the processed size and its own (H, W)."""
        name = _name(image, index)
        try:
            if isinstance(image, (str, os.PathLike)):
                arr = read_image(image)
            elif isinstance(image, Image.Image):
                arr = pil_to_array(image)
            elif isinstance(image, np.ndarray):
                arr = image
            else:
                raise ImageReadError(
                    name,
                    f"unsupported input type {type(image).__name__}; give a path, PIL "
                    "image or numpy array",
                )
            chw = to_chw(arr, name)
        except ImageReadError:
            raise
        except (TypeError, ValueError) as exc:
            raise ImageReadError(name, str(exc)) from None
        size = (int(chw.shape[1]), int(chw.shape[2]))
        return resize_array(chw, self._target(name, *size)), size

    def _decoded(self, items: list[Any]) -> Iterator[tuple[int, Any]]:
        """(index, (pixels, size) or the ImageReadError) in input order; files are decoded in
        :data:`DECODE_THREADS` threads ahead of the graph (at most 4 batches in flight), as the
        torch path's :func:`patchcore.core.inputs.iter_batches` does."""

        def load(i: int) -> tuple[int, Any]:
            try:
                return i, self._decode(items[i], i)
            except ImageReadError as exc:
                return i, exc

        if len(items) < 2:
            yield from map(load, range(len(items)))
            return
        lookahead = 4 * self.batch_size
        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            yield from bounded_map(pool, load, range(len(items)), lookahead)

    def _batches(self, items: list[Any], on_error: str) -> Iterator[tuple[list, list, list]]:
        """(indices, pixels list, own sizes) of consecutive same-size inputs; skipped inline."""
        idx: list[int] = []
        pix: list[np.ndarray] = []
        sizes: list[tuple[int, int]] = []
        for i, decoded in self._decoded(items):
            if isinstance(decoded, ImageReadError):
                if on_error == "raise":
                    raise decoded
                yield [i], [decoded], []
                continue
            x, size = decoded
            if pix and (pix[0].shape != x.shape or len(pix) >= self.batch_size):
                yield idx, pix, sizes
                idx, pix, sizes = [], [], []
            idx.append(i)
            pix.append(x)
            sizes.append(size)
        if pix:
            yield idx, pix, sizes

    def score(self, images: Any, *, maps: Any = None, on_error: str = "raise") -> RuntimeResult:
        """Scores, normalised scores, optional maps and skipped inputs of ``images``.

        Args:
            images: a path, PIL image or numpy array, or a list of them.
            maps: ``None``, ``"processed"``, ``"native"`` (each input's size) or ``(H, W)``.
            on_error: ``"raise"`` (first unreadable input) or ``"skip"`` (NaN, listed).

        Raises:
            ImageReadError: an unreadable input with ``on_error="raise"``.
            FloatingPointError: the graph produced a non-finite score or map (fails closed).
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not (maps is None or maps in ("processed", "native") or _is_size(maps)):
            raise ValueError(f"maps must be None, 'processed', 'native' or (H, W), got {maps!r}")
        if isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim <= 3
        ):
            images = [images]
        items = list(images)
        names = [_name(x, i) for i, x in enumerate(items)]
        scores = np.full(len(items), np.nan)
        out: list[np.ndarray | None] = [None] * len(items)
        skipped: list[RuntimeSkipped] = []
        fixed = tuple(int(v) for v in maps) if _is_size(maps) else None  # a list works too
        for idx, pix, sizes in self._batches(items, on_error):
            if not sizes:  # one unreadable input
                skipped.append(RuntimeSkipped(idx[0], names[idx[0]], pix[0].problem))
                continue
            s, m = self.session.run(np.stack(pix))
            if not (np.isfinite(s).all() and np.isfinite(m).all()):
                bad = [names[i] for i, v in zip(idx, s, strict=True) if not math.isfinite(v)]
                raise FloatingPointError(
                    f"the exported graph gave non-finite scores or maps for "
                    f"{', '.join(bad) or ', '.join(names[i] for i in idx)}: refusing a verdict"
                )
            scores[idx] = s.astype(np.float64)
            if maps is not None:
                for j, i in enumerate(idx):
                    want = fixed or (m.shape[-2:] if maps == "processed" else sizes[j])
                    out[i] = resize_maps(m[j], tuple(int(v) for v in want))
        mapping = self.normalization
        normed = None if mapping is None else normalization.normalize(scores, mapping)
        return RuntimeResult(names, scores, normed, out if maps is not None else None, skipped)

    def score_samples(self, images: Any) -> np.ndarray:
        """(N,) float64 raw scores, higher = more anomalous."""
        return self.score(images).scores

    def anomaly_map(self, image: Any) -> np.ndarray:
        """Per-pixel anomaly map of one image, float32 HxW at the image's own size."""
        m = self.score([image], maps="native").maps
        assert m is not None and m[0] is not None
        return m[0]

    def predict(self, images: Any) -> np.ndarray:
        """(N,) bool verdicts, ``score >= threshold``; needs a threshold in the export."""
        if self.threshold is None:
            raise ValueError(
                "the export has no threshold: calibrate the model ('patchcore calibrate') "
                "and export it again"
            )
        return self.score(images).scores >= self.threshold


def _is_size(maps: Any) -> bool:
    return (
        isinstance(maps, (tuple, list))
        and len(maps) == 2
        and all(isinstance(v, int) and v > 0 for v in maps)
    )
