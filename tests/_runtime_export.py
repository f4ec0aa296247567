"""A tiny synthetic export for the runtime's tests (test helper; no torch, no fitting).

The graph (built with the ``onnx`` helper API) maps ``pixels`` (B, 3, H, W) to ``maps`` = the
channel mean (B, H, W) and ``scores`` = each map's maximum: a white image scores 1, a black one
0. Its manifest is sealed with :func:`patchcore.lean.manifest.seal` like a real export's.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.lean.manifest import EXPORT_FORMAT, EXPORT_VERSION, MANIFEST, file_entry, seal


def tiny_graph(path: Path) -> Path:
    """Write the synthetic ONNX graph to ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, "H", "W"])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B"])
    maps = helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["B", "H", "W"])
    channel = numpy_helper.from_array(np.array([1], np.int64), "channel")
    plane = numpy_helper.from_array(np.array([1, 2], np.int64), "plane")
    nodes = [
        helper.make_node("ReduceMean", ["pixels", "channel"], ["maps"], keepdims=0),
        helper.make_node("ReduceMax", ["maps", "plane"], ["scores"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny", [pixels], [scores, maps], [channel, plane])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def manifest_fields(files: list[Path], **overrides: Any) -> dict[str, Any]:
    """Every manifest field of a dynamic export with threshold 0.5 (``overrides`` win)."""
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "files": [file_entry(f) for f in files],
        "graphs": [{"size": None, "onnx": files[0].name, "openvino": None}],
        "input": "pixels",
        "outputs": ["scores", "maps"],
        "dynamic": True,
        "processed_size": None,
        "image_size": None,
        "scale": None,
        "batch_size": 4,
        "blur_radius": 0,
        "sigma": 0.0,
        "threshold": 0.5,
        "threshold_method": "manual",
        "normalization": {"kind": "piecewise_linear", "low": 0.0, "threshold": 0.5, "high": 1.0},
        "normalization_source": "model",
        "region_threshold": 0.5,
        "display_range": None,
        "backbone": "synthetic",
        "layers": ["mean"],
        "bank_rows": 1,
        "num_neighbors": 1,
        "top_k": 1,
        "search": "float32",
        "backbone_dtype": "float32",
        "package_version": "0+test",
        "torch_version": "none",
        "exporter": "onnx.helper",
        "opset": 18,
        "probe_parity": {"score_rel": 0.0, "map_rel": 0.0},
        "export_seconds": 0.0,
    }
    info.update(overrides)
    return info


def synthetic_export(folder: Path, **overrides: Any) -> Path:
    """A sealed synthetic export in ``folder`` (created); ``overrides`` change manifest fields."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = tiny_graph(folder / "model.onnx")
    info = seal(manifest_fields([graph], **overrides))
    (folder / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True))
    return folder


def edit_manifest(folder: Path, reseal: bool = False, **changes: Any) -> None:
    """Change manifest fields in place (``reseal``: recompute the digest, as an attacker
    who knows the format could)."""
    from patchcore.lean.manifest import digest

    path = folder / MANIFEST
    info = json.loads(path.read_text())
    info.update(changes)
    if reseal:
        info["digest"] = digest(info)
    path.write_text(json.dumps(info))


def damaged_dds(path: Path) -> Path:
    """A DDS image with an unknown pixel format, named .png: Pillow's DDS decoder raised
    NotImplementedError on it and stopped the runtime."""
    header = bytearray(124)
    struct.pack_into("<IIIIIII", header, 0, 124, 0x1007, 64, 64, 0, 0, 1)
    struct.pack_into("<II4s", header, 72, 32, 4, b"ZZZZ")
    path.write_bytes(b"DDS " + bytes(header) + bytes(64 * 64))
    return path
