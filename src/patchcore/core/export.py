"""Export a fitted detector's whole scoring path to ONNX or OpenVINO for
:mod:`patchcore.lean.runtime`.

The graph takes ``pixels`` (B, 3, H, W) float32 in [0, 1] at the processed size (the runtime
decodes and resizes in numpy exactly like the torch path, :mod:`patchcore.lean.pixels`) and returns
``scores`` (B,) and ``maps`` (B, H, W) float32. Inside it:

1. the backbone's normalisation, then the backbone up to the deepest tapped layer (the plain
   modules; EfficientNet-Lite's TF-style "same" padding rewritten with shape arithmetic that
   exports for any input size);
2. the patch embedding of :func:`patchcore.core.embedding.embed`;
3. nearest-bank distances as matrix products against the bank in blocks of ``block_rows`` rows
   (each a ``[-2 b, |b|^2]`` initializer, the expansion of :mod:`patchcore.core.search` in float32):
   memory is (patches x block_rows) per block, never a broadcast ``cdist``;
4. the image score: for ``top_k > 1`` (the default and every preset) the mean of the
   ``top_k`` largest patch distances; for ``top_k`` 1 each image's largest patch distance,
   reweighted as the paper's eq. 7 (:meth:`patchcore.core.detector.PatchCore._reweight`): the worst
   patch's nearest bank row m* by one (B x M) product, m*'s k nearest rows looked up in a table
   computed here at export time (the bank's own k-NN, so the graph only gathers);
5. the anomaly map: for a fixed processed size the two axis operators of
   :func:`patchcore.core.anomaly_map.upsample_blur` as constants (``A_h @ grid @ A_w.T``); for
   dynamic
   sizes bilinear upsampling then the separable Gaussian blur with reflected borders (what the
   operators compute; sizes with a side <= the blur radius are refused by the runtime).

Next to the graph, ``patchcore-export.json`` holds what the runtime needs (sizes, threshold,
normalisation, versions, the graph's SHA-256). :func:`export` checks the exported graph against
the torch path in float32 on probe images and refuses to write an export that does not match.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from patchcore.core.graph import ExportError, ScoringGraph
from patchcore.lean.runtime import EXPORT_FORMAT, EXPORT_VERSION, MANIFEST, file_sha256
from patchcore.lean.util import package_version

if TYPE_CHECKING:
    from patchcore.core.detector import PatchCore

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "FORMATS",
    "MANIFEST",
    "ExportError",
    "ExportResult",
    "ScoringGraph",
    "export",
    "file_sha256",
]

FORMATS = ("onnx", "openvino")
OPSET = 18
#: Parity an export must reach on its probe images (relative to the torch path in float32).
SCORE_RTOL = 1e-4
MAP_RTOL = 1e-3


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and measured.

    Attributes:
        manifest: path of ``patchcore-export.json``.
        files: the model files (``model.onnx``, plus ``model.xml`` + ``model.bin`` for OpenVINO).
        seconds: wall time of the export (tracing, conversion and the parity check).
        parity: the probe check: ``score_rel`` (largest relative score difference) and
            ``map_rel`` (largest absolute map difference over the largest map value).
    """

    manifest: Path
    files: tuple[Path, ...]
    seconds: float
    parity: dict[str, float]


def _processed_size(det: PatchCore) -> tuple[int, int] | None:
    if det.image_size is None:
        return None
    s = det.image_size
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def _torch_reference(det: PatchCore, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The torch path's scores and processed-size maps of (B, 3, H, W) pixels, with the search
    (and the backbone, as exported) in float32."""
    from patchcore.core.inputs import Batch
    from patchcore.core.search import NearestNeighborIndex

    index, extractor = det._index, det.extractor_
    det._index = NearestNeighborIndex(det._bank, precision="float32")
    if extractor.dtype != torch.float32:
        det.extractor_ = copy.deepcopy(extractor)
        det.extractor_.dtype = torch.float32
    try:
        b = pixels.shape[0]
        batch = Batch(list(range(b)), pixels, [tuple(pixels.shape[-2:])] * b, [""] * b)
        scores, maps = det._score_batch(batch, "processed")
    finally:
        det._index, det.extractor_ = index, extractor
    return scores, np.stack(maps)


def _probes(size: tuple[int, int] | None) -> list[torch.Tensor]:
    """Deterministic probe batches: smooth random images at the fixed size, or two sizes."""
    g = torch.Generator().manual_seed(0)
    sizes = [size] if size is not None else [(224, 224), (161, 203)]
    out = []
    for h, w in sizes:
        low = torch.rand(2, 3, max(2, h // 16), max(2, w // 16), generator=g)
        out.append(F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False))
    return out


def parity(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> dict:
    """Largest relative score difference and largest map difference relative to the map's
    largest value (per image), between a reference (scores, maps) and another."""
    (rs, rm), (gs, gm) = ref, got
    score_rel = float(np.max(np.abs(gs - rs) / np.maximum(np.abs(rs), 1e-12)))
    scale = np.abs(rm).reshape(len(rm), -1).max(1)
    map_rel = float(np.max(np.abs(gm - rm).reshape(len(rm), -1).max(1) / np.maximum(scale, 1e-12)))
    return {"score_rel": score_rel, "map_rel": map_rel}


def export(
    det: PatchCore,
    out: str | os.PathLike,
    *,
    format: str = "onnx",
    dynamic: bool | None = None,
    block_rows: int = 4096,
    source: str | os.PathLike | None = None,
) -> ExportResult:
    """Export ``det``'s scoring graph and the manifest the runtime reads into folder ``out``.

    Args:
        det: a fitted detector.
        out: folder to write (created; existing export files in it are replaced).
        format: ``"onnx"`` (``model.onnx``) or ``"openvino"`` (``model.xml`` / ``model.bin``,
            converted from the ONNX graph by OpenVINO; ``model.onnx`` is kept beside it).
        dynamic: graph for any image size; ``None``: dynamic unless the model has a fixed
            ``image_size``. A fixed-size graph refuses other sizes.
        block_rows: bank rows per distance block (memory per block: patches x rows x 4 bytes).
        source: the model file exported (its name and size go into the manifest).

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: unsupported format or model, or the export differs from the torch path on
            the probe images by more than 1e-4 (scores, relative) or 1e-3 (maps, relative to the
            map's largest value).
    """
    det._check_fitted("export")
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if int(block_rows) < 1:
        raise ExportError(f"block_rows must be >= 1, got {block_rows!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fixed = _processed_size(det)
    if dynamic is None:
        dynamic = fixed is None
    if not dynamic and fixed is None:
        raise ExportError(
            "a fixed-size export needs a model fitted with image_size=; this one resizes by "
            "scale or keeps each image's size: export it with dynamic=True"
        )
    size = None if dynamic else fixed
    graph = ScoringGraph(det, size, block_rows=block_rows).eval()
    probes = _probes(fixed)
    onnx_path = out / "model.onnx"
    example = probes[0]  # batch 2: torch.export specialises dimensions of size 1
    if dynamic:
        dims = {
            0: torch.export.Dim("batch", min=1, max=4096),
            2: torch.export.Dim("height", min=32, max=16384),
            3: torch.export.Dim("width", min=32, max=16384),
        }
        shapes = {"pixels": dims}
    else:
        shapes = {"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                graph,
                (example,),
                str(onnx_path),
                dynamo=True,
                input_names=["pixels"],
                output_names=["scores", "maps"],
                dynamic_shapes=shapes,
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter's many error types
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    files = [onnx_path]
    if format == "openvino":
        files += _to_openvino(onnx_path, out)
    manifest = _manifest(det, dynamic, fixed, files, source)
    # the parity check runs the files just written through the runtime itself
    from patchcore.lean.runtime import open_session

    session = open_session(out, manifest)
    checks = [parity(_torch_reference(det, p), session.run(p.numpy())) for p in probes]
    result = {k: max(c[k] for c in checks) for k in ("score_rel", "map_rel")}
    if not (result["score_rel"] <= SCORE_RTOL and result["map_rel"] <= MAP_RTOL):
        for f in files:
            f.unlink(missing_ok=True)
        raise ExportError(
            f"the exported graph does not reproduce the torch path on the probe images "
            f"(score {result['score_rel']:.3g} relative, limit {SCORE_RTOL:g}; map "
            f"{result['map_rel']:.3g}, limit {MAP_RTOL:g}); nothing was written"
        )
    manifest["probe_parity"] = result
    seconds = time.perf_counter() - t0
    manifest["export_seconds"] = round(seconds, 3)
    path = out / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return ExportResult(path, tuple(files), seconds, result)


def _to_openvino(onnx_path: Path, out: Path) -> list[Path]:
    try:
        import openvino as ov
    except ImportError:
        raise ExportError(
            "format 'openvino' needs the openvino package: pip install openvino"
        ) from None
    model = ov.convert_model(str(onnx_path))
    xml = out / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return [xml, out / "model.bin"]


def _manifest(
    det: PatchCore,
    dynamic: bool,
    fixed: tuple[int, int] | None,
    files: list[Path],
    source: str | os.PathLike | None,
) -> dict[str, Any]:
    from patchcore.lean import normalization

    threshold = det.state_.threshold
    mapping = getattr(det.state_, "normalization", None)
    if mapping is None and threshold is not None:
        mapping = normalization.fit_normalization(None, threshold)
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "package_version": package_version(),
        "torch_version": torch.__version__,
        "exporter": "torch.onnx (dynamo)",
        "opset": OPSET,
        "files": [f.name for f in files],
        "sha256": file_sha256(files),
        "input": "pixels",
        "outputs": ["scores", "maps"],
        "dynamic": bool(dynamic),
        "processed_size": None if dynamic else list(fixed),  # type: ignore[arg-type]
        "image_size": list(fixed) if fixed is not None else None,
        "scale": det.scale,
        "batch_size": int(det.batch_size),
        "blur_radius": max(1, int(math.ceil(4.0 * det.sigma))) if det.sigma > 0 else 0,
        "sigma": float(det.sigma),
        "threshold": threshold,
        "threshold_method": det.state_.threshold_method,
        "normalization": mapping,
        "normalization_source": "model"
        if getattr(det.state_, "normalization", None)
        else ("manual (0 .. threshold .. 2 x threshold)" if mapping is not None else None),
        "backbone": det.backbone,
        "layers": list(det.state_.layers),
        "bank_rows": int(det.state_.memory_bank.shape[0]),
        "num_neighbors": int(det.num_neighbors),
        "top_k": int(det.top_k),
        "search": "float32",
        "backbone_dtype": "float32",  # exported in float32 whatever the model's backbone_dtype
    }
    if source is not None:
        p = Path(source)
        info["source_model"] = {"name": p.name, "bytes": p.stat().st_size}
    return info
