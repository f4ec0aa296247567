"""Export a fitted detector's whole scoring path to ONNX or OpenVINO for
:mod:`patchcore.lean.runtime`.

The graph (:class:`~patchcore.core.graph.ScoringGraph`) takes ``pixels`` (B, 3, H, W) float32 in
[0, 1] at the processed size (the runtime decodes and resizes in numpy exactly like the torch
path, :mod:`patchcore.lean.pixels`) and returns ``scores`` (B,) and ``maps`` (B, H, W) float32:
the backbone's normalisation and stages (EfficientNet-Lite's TF-style "same" padding rewritten
with shape arithmetic that exports for any input size), the patch embedding, nearest-bank
distances as block matrix products, the image score (the top-k mean, or eq. 7 for ``top_k`` 1)
and the anomaly map (the axis operators at a fixed size; bilinear upsampling and the separable
blur with reflected borders at any size, where the runtime refuses sides <= the blur radius).

What :func:`export` writes into the folder:

- ``model.onnx``: the graph for any size (a dynamic export) or for the model's ``image_size``;
  its search is ``"int8"`` or ``"bfloat16"`` (:mod:`patchcore.core.export_search`: a
  reduced-precision scan with the exact float32 re-check; scores as float32's) or ``"float32"``;
- for a dynamic export, ``model-HxW.onnx`` graphs for the processed sizes most training images
  had: fixed sizes let onnxruntime fold the padding into the convolutions;
- for ``format="openvino"``, each graph also as OpenVINO IR (``.xml`` + ``.bin``);
- ``patchcore-export.json``, the manifest (:mod:`patchcore.lean.manifest`): every field the
  runtime needs (sizes, threshold, normalisation, region cut, display range, the graphs), each
  file's SHA-256, and a digest over all of it.

Everything is written into a new sibling folder, read back as the runtime reads it, checked
against the torch path in float32 on probe images of each graph's sizes, and only then swapped
in for the destination folder in one step.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from patchcore.core.export_search import (
    Bf16ScoringGraph,
    Int8ScoringGraph,
    bf16_products,
    bf16_scan_nodes,
    translation_table,
)
from patchcore.core.graph import ExportError, ScoringGraph
from patchcore.lean import record
from patchcore.lean.manifest import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST,
    MAX_BATCH,
    MAX_SIDE,
    MIN_SIDE,
    LoadedExport,
    export_kind,
    file_entry,
    load_export,
    seal,
)
from patchcore.lean.pixels import output_size
from patchcore.lean.runtime import open_sessions
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
]

FORMATS = ("onnx", "openvino")
SEARCHES = ("auto", "int8", "bfloat16", "float32")
OPSET = 18
#: Parity an export must reach on its probe images (relative to the torch path in float32).
SCORE_RTOL = 1e-4
MAP_RTOL = 1e-3
#: ... with a reduced-precision scan: map values are the distance to the row the int8 scan
#: found, or the bfloat16 scan's estimate (the torch path's default search carries map errors
#: of this order too).
SCAN_MAP_RTOL = 2e-2


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and measured.

    Attributes:
        manifest: path of ``patchcore-export.json``.
        files: the model files (``model.onnx``, plus ``model.xml`` + ``model.bin`` for OpenVINO).
        seconds: wall time of the export (tracing, conversion and the parity check).
        parity: the probe check: ``score_rel`` (largest relative score difference) and
            ``map_rel`` (largest absolute map difference over the largest map value).
        search: the graph's search (``"auto"`` resolved by the format).
    """

    manifest: Path
    files: tuple[Path, ...]
    seconds: float
    parity: dict[str, float]
    search: str


def _processed_size(det: PatchCore) -> tuple[int, int] | None:
    if det.image_size is None:
        return None
    s = det.image_size
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


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
    search: str = "auto",
    sizes: Sequence[tuple[int, int]] | None = None,
    block_rows: int = 4096,
    source: str | os.PathLike | None = None,
    force: bool = False,
) -> ExportResult:
    """Export ``det``'s scoring graph and the manifest the runtime reads into folder ``out``.

    The export is written into a new sibling folder, checked there (parity and the runtime's
    own reading of the manifest) and then swapped in for ``out`` in one step: an export that
    is interrupted or fails leaves what ``out`` held before untouched.

    Args:
        det: a fitted detector.
        out: the export folder (created; a previous export there is replaced, other files in
            it stay).
        format: ``"onnx"`` (``model.onnx``) or ``"openvino"`` (``model.xml`` / ``model.bin``,
            converted from the ONNX graph by OpenVINO; ``model.onnx`` is kept beside it).
        dynamic: graph for any image size; ``None``: dynamic unless the model has a fixed
            ``image_size``. A fixed-size graph refuses other sizes.
        search: the graph's nearest-row search: ``"float32"`` (exact maps), ``"int8"`` or
            ``"bfloat16"`` (a scan in that precision with the exact float32 re-check of
            :mod:`patchcore.core.export_search`: scores as float32's, map values within the
            scan's error; bfloat16 for OpenVINO only) or ``"auto"``: int8 for
            ``format="onnx"`` (onnxruntime's int8 GEMM), bfloat16 for OpenVINO (its int8
            path was slower; benchmarks/RESULTS.md).
        sizes: processed (H, W) sizes that get a fixed-size graph beside a dynamic one (no
            shape arithmetic, padding folded into the convolutions: faster); ``None``: the
            sizes of at least a fifth of the training images (at most :data:`MAX_FIXED`).
        block_rows: bank rows per distance block (memory per block: patches x rows x 4 bytes).
        source: the model file exported (its name and size go into the manifest).
        force: write into ``out`` even when it is not an export: a folder keeps its other
            files (the export's own are replaced), a file is replaced by the folder.

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: unsupported format, search or model, a non-finite threshold, ``out`` holds
            something else than an export (without ``force``), or the export differs from the
            torch path on the probe images by more than :data:`SCORE_RTOL` (scores, relative)
            or :data:`MAP_RTOL` (maps, relative to the map's largest value;
            :data:`SCAN_MAP_RTOL` with a reduced-precision scan).
    """
    t0 = time.perf_counter()
    plan = _plan(det, Path(out), format, dynamic, search, sizes, block_rows, force)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        graphs = [_write_graph(det, work, plan, size) for size in plan.sizes]
        info = _manifest(det, plan, graphs, work, source)
        _write_manifest(work, {**info, "probe_parity": {}, "export_seconds": 0.0})
        result = _check_parity(det, load_export(work), plan)  # read as the runtime reads it
        seconds = time.perf_counter() - t0
        _write_manifest(work, {**info, "probe_parity": result, "export_seconds": round(seconds, 3)})
        files = [e["name"] for e in load_export(work).info["files"]]
        if out.is_dir() and not out.is_symlink():  # the folder's other files stay
            _keep_others(out, work)
        _swap_in(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the new files on failure, the old on success
    return ExportResult(out / MANIFEST, tuple(out / n for n in files), seconds, result, plan.search)


#: At most this many fixed-size graphs beside a dynamic one.
MAX_FIXED = 2


@dataclass(frozen=True)
class _Plan:
    """What :func:`export` writes: the format, the search, each graph's size (``None``: any)
    and the model's own fixed processed size."""

    format: str
    search: str
    sizes: tuple[tuple[int, int] | None, ...]
    fixed: tuple[int, int] | None
    block_rows: int


def _plan(
    det: PatchCore,
    out: Path,
    format: str,
    dynamic: bool | None,
    search: str,
    sizes: Sequence[tuple[int, int]] | None,
    block_rows: int,
    force: bool,
) -> _Plan:
    """Check the arguments (before any work) and decide the graphs."""
    det._check_fitted("export")
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if search not in SEARCHES:
        raise ExportError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if int(block_rows) < 1:
        raise ExportError(f"block_rows must be >= 1, got {block_rows!r}")
    if export_kind(out) == "other" and not force:
        raise ExportError(
            f"{out} exists and is not a patchcore export: choose another folder, or force the "
            "replacement (patchcore export --force)"
        )
    fixed = _processed_size(det)
    if dynamic is None:
        dynamic = fixed is None
    if not dynamic and fixed is None:
        raise ExportError(
            "a fixed-size export needs a model fitted with image_size=; this one resizes by "
            "scale or keeps each image's size: export it with dynamic=True"
        )
    if search == "auto":
        search = "int8" if format == "onnx" else "bfloat16"
    if search == "bfloat16" and format != "openvino":
        raise ExportError(
            "search 'bfloat16' is for format 'openvino' (onnxruntime has no bfloat16 product "
            "on the CPU): use search 'int8' or 'float32' for ONNX"
        )
    extra = _common_sizes(det) if sizes is None else [tuple(map(int, s)) for s in sizes]
    for s in extra:
        if len(s) != 2 or not all(MIN_SIDE <= v <= MAX_SIDE for v in s):
            raise ExportError(f"sizes must be (height, width) in [{MIN_SIDE}, {MAX_SIDE}], got {s}")
    graphs = (None, *dict.fromkeys(extra)) if dynamic else (fixed,)
    return _Plan(format, search, graphs[: 1 + MAX_FIXED], fixed, int(block_rows))


def _common_sizes(det: PatchCore) -> list[tuple[int, int]]:
    """Processed sizes of at least a fifth of the training images, most common first."""
    grids = getattr(det.state_, "train_grids", None) or []
    counts: dict[tuple[int, int], int] = {}
    for h, w, *_ in grids:
        size = output_size(int(h), int(w), det.image_size, det.scale)
        counts[size] = counts.get(size, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return [s for s, n in ranked if 5 * n >= len(grids)][:MAX_FIXED]


def _graph_name(size: tuple[int, int] | None, plan: _Plan) -> str:
    return "model" if size is None or size == plan.fixed else f"model-{size[0]}x{size[1]}"


def _write_graph(
    det: PatchCore, folder: Path, plan: _Plan, size: tuple[int, int] | None
) -> dict[str, Any]:
    """Trace one graph (``size`` None: any size) to ONNX, convert it for OpenVINO; its
    manifest entry."""
    name = _graph_name(size, plan)
    graph = _trace(det, folder / f"{name}.onnx", size, plan.search, plan.block_rows)
    xml = None
    if plan.format == "openvino":
        xml = _to_openvino(graph, folder / f"{name}.xml", plan.search == "bfloat16")
    return {"size": None if size is None else list(size), "onnx": graph.name, "openvino": xml}


def _trace(
    det: PatchCore, path: Path, size: tuple[int, int] | None, search: str, block_rows: int
) -> Path:
    """The scoring graph (a scan with re-check: :class:`Int8ScoringGraph`,
    :class:`Bf16ScoringGraph`) traced to ONNX at ``path``."""
    kind = {"int8": Int8ScoringGraph, "bfloat16": Bf16ScoringGraph}.get(search, ScoringGraph)
    graph = kind(det, size, block_rows=block_rows).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dims: dict[int, Any] = {0: batch}
    if size is None:
        dims[2] = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
        dims[3] = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    example = _probes(size or (224, 224))[0]  # batch 2: export specialises dimensions of 1
    table = translation_table() if kind is not ScoringGraph else None
    quiet = logging.getLogger("onnx_ir")  # notes on empty attribute lists of torch's own ops
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=True,
                input_names=["pixels"],
                output_names=["scores", "maps"],
                dynamic_shapes={"pixels": dims},
                opset_version=OPSET,
                external_data=False,
                verbose=False,
                custom_translation_table=table,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter's many error types
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        finally:
            quiet.setLevel(level)
    return path


def _check_parity(det: PatchCore, export: LoadedExport, plan: _Plan) -> dict[str, float]:
    """Every graph of the export, run by the runtime, against the torch path in float32 on
    probe images of its sizes; ExportError beyond the limits."""
    checks = []
    for backend in ("onnxruntime", "openvino")[: 2 if plan.format == "openvino" else 1]:
        for size, session in open_sessions(export, backend=backend).items():
            for p in _probes(size):
                checks.append(parity(det.reference_scores(p), session.run(p.numpy())))
    result = {k: max(c[k] for c in checks) for k in ("score_rel", "map_rel")}
    map_limit = MAP_RTOL if plan.search == "float32" else SCAN_MAP_RTOL
    if not (result["score_rel"] <= SCORE_RTOL and result["map_rel"] <= map_limit):
        raise ExportError(
            f"the exported graph does not reproduce the torch path on the probe images "
            f"(score {result['score_rel']:.3g} relative, limit {SCORE_RTOL:g}; map "
            f"{result['map_rel']:.3g}, limit {map_limit:g}); nothing was written"
        )
    return result


def _write_manifest(folder: Path, info: dict[str, Any]) -> None:
    try:
        sealed = seal(info)
    except ValueError as exc:  # a field the runtime would refuse: never write it
        raise ExportError(f"cannot export this model: its {exc}") from None
    (folder / MANIFEST).write_text(json.dumps(sealed, indent=2, sort_keys=True))


def _keep_others(old: Path, new: Path) -> None:
    """Copy what folder ``old`` holds besides an export's files (its manifest and the files
    that manifest lists) into ``new``, before the swap: an interruption leaves ``old`` as it
    was, and a previous export's graphs do not linger beside the new ones."""
    try:
        listed = json.loads((old / MANIFEST).read_text()).get("files", [])
        own = {e["name"] if isinstance(e, dict) else str(e) for e in listed}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        own = set()
    for entry in old.iterdir():
        if entry.name in own or os.path.lexists(new / entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(work: Path, out: Path) -> None:
    """Put the finished folder ``work`` at ``out``; what ``out`` held ends up at ``work``."""
    if not os.path.lexists(out):
        os.replace(work, out)
        return
    if _exchange(work, out):
        return
    # two renames with Ctrl-C held back in between (the main thread receives the signals)
    main = threading.current_thread() is threading.main_thread()
    held = {signal.SIGINT, signal.SIGTERM}
    if main:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        aside = work.with_name(work.name + ".old")
        os.replace(out, aside)
        os.replace(work, out)
        os.replace(aside, work)
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _to_openvino(onnx_path: Path, xml: Path, bf16: bool) -> str:
    """Convert an ONNX graph to OpenVINO's IR at ``xml`` (and its .bin); the xml's name.
    ``bf16``: the graph has the bfloat16 scan, whose products go to bfloat16 there."""
    try:
        import openvino as ov
    except ImportError:
        raise ExportError(
            "format 'openvino' needs the openvino package: pip install openvino"
        ) from None
    model = ov.convert_model(str(onnx_path))
    if bf16:
        names = bf16_scan_nodes(onnx_path)
        found = bf16_products(model, names)
        if not names or found != len(names):
            raise ExportError(
                f"the bfloat16 scan's products ({len(names)} in the ONNX graph) were not all "
                f"found in the OpenVINO model ({found}): export with search='float32'"
            )
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml.name


def _manifest(
    det: PatchCore,
    plan: _Plan,
    graphs: list[dict[str, Any]],
    folder: Path,
    source: str | os.PathLike | None,
) -> dict[str, Any]:
    from patchcore.lean import normalization

    dynamic, fixed = plan.sizes[0] is None, plan.fixed
    try:
        threshold = record.check_threshold(det.state_.threshold)
    except record.NonFiniteScoreError as exc:
        raise ExportError(f"cannot export this model: its {exc}; calibrate it again") from None
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
        "files": [file_entry(f) for f in sorted(folder.iterdir()) if f.name != MANIFEST],
        "graphs": graphs,
        "input": "pixels",
        "outputs": ["scores", "maps"],
        "dynamic": dynamic,
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
        "search": plan.search,
        "backbone_dtype": "float32",  # exported in float32 whatever the model's backbone_dtype
        # what the record needs besides the threshold: the region cut the torch path uses and
        # the heatmap colour range stored at calibration (absent in models without one)
        "region_threshold": None if threshold is None else float(det.region_cut()),
        "display_range": _stored_range(det),
        # the profile of the training inputs: the runtime's records carry the same
        # out-of-distribution hint as the torch path's (absent in models without one)
        "input_profile": det.input_profile_,
    }
    if source is not None:
        p = Path(source)
        info["source_model"] = {"name": p.name, "bytes": p.stat().st_size}
    return info


def _stored_range(det: PatchCore) -> list[float] | None:
    """The heatmap colour range stored on the model at calibration, or None (older models)."""
    stored = det.display_range_
    return None if stored is None else [float(v) for v in stored]
