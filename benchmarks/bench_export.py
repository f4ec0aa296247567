"""Exported graph vs the torch path (issue #14): parity, ms per image, export time and memory.

Per shared set: a model fitted on ``--train`` training images (seeded subset) at
``--image-size`` (default 224, fixed-size export) or ``--scale`` (dynamic export), calibrated
(max F1) on all test images by the torch path in float32; then every test image is scored, with
maps at each image's own size, by

- torch, ``search_precision="float32"`` (the parity reference),
- torch, the default path (``"auto"``: bfloat16 search on CPUs with native bf16),
- onnxruntime on the exported ONNX graph,
- OpenVINO on the converted model (where openvino is installed).

Parity: per image, the relative score difference and the largest map difference over that map's
largest value (against torch float32 and against the default path); verdicts compared at the
calibrated threshold. Speed: wall ms per image of each route end to end (decode, resize, graph,
maps at the native size), same images, same batch size, one route after the other. Export: wall
seconds and the peak resident memory above the start (``VmHWM`` after a reset), for the ONNX
export (tracing, conversion and the probe check) and the OpenVINO conversion.

    python benchmarks/bench_export.py [--sets casting magnetic_tile deeppcb] [--train 100]
    python benchmarks/bench_export.py --native --train 0   # the default path: all, native

Rows go to benchmarks/out/bench_export.jsonl (with the load average).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, SETS, append_row, machine, subsets

from patchcore import PatchCore
from patchcore.core.export import export
from patchcore.lean.runtime import ExportedModel

ROWS = ROOT / "benchmarks" / "out" / "bench_export.jsonl"
CHUNK = 32  # images scored per route before the next route (maps are compared, then dropped)


def _reset_peak() -> float:
    """Reset the kernel's peak-RSS mark; returns the current RSS in MiB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _timed_export(det: PatchCore, out: Path, fmt: str) -> tuple[float, float]:
    start = _reset_peak()
    t0 = time.perf_counter()
    export(det, out, format=fmt)
    return time.perf_counter() - t0, _status("VmHWM") - start


def run(name: str, n_train: int | None, image_size: int | None, scale: float | None) -> dict:
    train, test = subsets(name, n_train, None)
    paths = list(test.images)
    labels = np.asarray(test.labels)
    kw = {"image_size": image_size} if scale is None else {"scale": scale}
    if image_size is None and scale is None:
        kw = {}  # the default path: native size, a dynamic export
    t0 = time.perf_counter()
    det = PatchCore(search_precision="float32", progress=False, **kw).fit(train)
    fit_s = time.perf_counter() - t0
    det.calibrate(paths, labels)
    # the same fitted state (bank, threshold) on the default search: a second detector built
    # with search_precision="auto" and the state installed (refitting could pick another bank)
    default = PatchCore(search_precision="auto", progress=False, **kw)
    default._set_fitted(det.state_, det.extractor_)
    tmp = Path(tempfile.mkdtemp(prefix=f"export-{name}-"))
    onnx_s, onnx_mb = _timed_export(det, tmp / "onnx", "onnx")
    routes = {
        "torch_f32": lambda p: det.score(p, maps="native"),
        "torch_default": lambda p: default.score(p, maps="native"),
        "onnxruntime": ExportedModel(tmp / "onnx", backend="onnxruntime").score,
    }
    ov_s = ov_mb = None
    if importlib.util.find_spec("openvino") is not None:
        ov_s, ov_mb = _timed_export(det, tmp / "ov", "openvino")
        routes["openvino"] = ExportedModel(tmp / "ov", backend="openvino").score
    seconds = dict.fromkeys(routes, 0.0)
    scores = {k: [] for k in routes}
    map_rel = {k: [] for k in routes if k != "torch_f32"}
    map_rel_vs_default = {k: [] for k in ("onnxruntime", "openvino") if k in routes}
    for lo in range(0, len(paths), CHUNK):
        part = paths[lo : lo + CHUNK]
        maps = {}
        for k, fn in routes.items():
            t = time.perf_counter()
            r = fn(part, maps="native") if k in ("onnxruntime", "openvino") else fn(part)
            seconds[k] += time.perf_counter() - t
            scores[k] += list(r.scores)
            maps[k] = r.maps
        for k in map_rel:
            for a, b in zip(maps["torch_f32"], maps[k], strict=True):
                map_rel[k].append(float(np.abs(b - a).max() / np.abs(a).max()))
        for k in map_rel_vs_default:
            for a, b in zip(maps["torch_default"], maps[k], strict=True):
                map_rel_vs_default[k].append(float(np.abs(b - a).max() / np.abs(a).max()))
    s = {k: np.asarray(v) for k, v in scores.items()}
    t = det.threshold_
    row: dict = {
        "set": name,
        "machine": machine(),
        "train_images": len(train),
        "test_images": len(paths),
        "processed": "native"
        if not kw
        else f"image_size={image_size}"
        if scale is None
        else f"scale={scale}",
        "bank_rows": int(det.memory_bank_.shape[0]),
        "fit_s": round(fit_s, 1),
        "onnx_export_s": round(onnx_s, 1),
        "onnx_export_peak_mb": round(onnx_mb, 0),
        "openvino_export_s": None if ov_s is None else round(ov_s, 1),
        "openvino_export_peak_mb": None if ov_mb is None else round(ov_mb, 0),
        "ms_per_image": {k: round(1000 * v / len(paths), 1) for k, v in seconds.items()},
    }
    for k in s:
        if k == "torch_f32":
            continue
        rel = np.abs(s[k] - s["torch_f32"]) / s["torch_f32"]
        row[f"{k}_vs_f32"] = {
            "score_rel_max": float(rel.max()),
            "score_rel_median": float(np.median(rel)),
            "map_rel_max": max(map_rel[k]),
            "map_rel_median": float(np.median(map_rel[k])),
            "verdicts_differ": int(((s[k] >= t) != (s["torch_f32"] >= t)).sum()),
        }
    for k in map_rel_vs_default:
        rel = np.abs(s[k] - s["torch_default"]) / s["torch_default"]
        row[f"{k}_vs_default"] = {
            "score_rel_max": float(rel.max()),
            "map_rel_max": max(map_rel_vs_default[k]),
            "map_rel_median": float(np.median(map_rel_vs_default[k])),
            "verdicts_differ": int(((s[k] >= t) != (s["torch_default"] >= t)).sum()),
        }
    return append_row(ROWS, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--train", type=int, default=100, help="training images per set; 0 = all")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument(
        "--native", action="store_true", help="the default path: native size (dynamic export)"
    )
    ap.add_argument("--scale", type=float, default=None, help="instead of --image-size")
    args = ap.parse_args()
    for name in args.sets:
        size = None if args.native else args.image_size
        row = run(name, args.train or None, size, None if args.native else args.scale)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
