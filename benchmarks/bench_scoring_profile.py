"""Where the default scoring path spends its time, and what the levers on it measure.

``profile``: a default ``PatchCore()`` fitted on every training image of a set (cached in
``benchmarks/out/models/{set}-all.pt``, as ``bench_export.py`` does) inspects test images end to
end (``iter_inspect``: decode, backbone, search, native-size map, record with regions) under
``torch.profiler``; the operators are grouped into stages (search products and row minima,
backbone convolutions and their weight packing, the rest).

``gemm``: the bfloat16 product of the search in its own shape (a block of queries x the bank's
rows x 153) against a square 2048 product (the machine's bfloat16 rate), with the inner size
padded to 160 / 176 / 192, and torch's int8 dynamic linear (every quantized engine) beside it.

``shapes``: the backbone alone over ``--images`` magnetic_tile test images in a seeded order
(most of their sizes occur once): as it runs today, with each input padded at the bottom and
right to a multiple of 16 / 32 / 64 (oneDNN then meets each padded shape again), and with
plain ``F.conv2d`` instead of the packed oneDNN convolutions.

    PYTHONPATH=src python benchmarks/bench_scoring_profile.py profile --sets deeppcb magnetic_tile
    PYTHONPATH=src python benchmarks/bench_scoring_profile.py gemm
    PYTHONPATH=src python benchmarks/bench_scoring_profile.py shapes --images 200
    PYTHONPATH=src python benchmarks/bench_scoring_profile.py ov-precision --sets casting
    PYTHONPATH=src python benchmarks/bench_scoring_profile.py map-error --images 48
    PYTHONPATH=src python benchmarks/bench_scoring_profile.py recheck --images 40

``ov-precision``: the OpenVINO export of a set's default model (float32 search, fixed-size
graph) on ``--images`` of its test images in batches of 8, compiled with OpenVINO's inference
precision hint ``f32`` (what the runtime pins) and ``bf16`` (every product in bfloat16, on CPUs
that have it): graph ms per image (median of 5 passes) and the largest relative difference of
the bf16 graph's image scores from the f32 graph's (the export's parity limit is 1e-4).

``map-error``: each route's maps against the float32 search's (the torch path with
``search_precision="float32"``) on ``--images`` test images of a set in a seeded order: torch's
default path (the int8 scan on CPUs with int8 dot products since the eighth stop, bfloat16
before) and its other reduced precision, the default ONNX export (int8 scan) and the default
OpenVINO export (bfloat16 scan), all re-checked, so scores agree; per image the largest absolute map
difference over the float32 map's maximum, the largest and median over the images.

``recheck``: the bfloat16 scan's error bound, first form (worst case) against the a posteriori
form (from the scan's row minima, :func:`patchcore.core.search.bf16_error`), on ``--images``
test images of a set in a seeded order, one image at a time: the patches per image that
:func:`~patchcore.core.search.patch_scores` re-checks in float32 under each (the top-10 score's
``2 k`` plus every patch whose interval reaches their floor), and the largest measured error
(against the float32 distances) over each bound.

Prints one JSON line per measurement with the machine and the 1-minute load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch
from common import DATA, ROOT, machine, median_seconds

STAGES = {
    "search": ("aten::mm", "aten::amin", "aten::_int_mm", "aten::argmin"),
    "backbone": ("mkldnn::_convolution_pointwise", "mkldnn::_reorder_convolution_weight"),
}


def _emit(row: dict) -> None:
    print(json.dumps({**row, "load": round(os.getloadavg()[0], 2), "machine": machine()}))


def _model(name: str):  # noqa: ANN202
    from patchcore import PatchCore
    from patchcore.core.datasets import load_folder

    path = ROOT / "benchmarks" / "out" / "models" / f"{name}-all.pt"
    if path.exists():
        return PatchCore.load(path)
    train = load_folder(DATA / name, "train")
    det = PatchCore(progress=False).fit(train.subset(train.labels == 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    det.save(path)
    return det


def profile(name: str, n: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from patchcore.core.datasets import load_folder

    det = _model(name)
    images = list(load_folder(DATA / name, "test").images)
    images = [images[i] for i in np.random.default_rng(0).permutation(len(images))[:n]]
    list(det.iter_inspect(images[:8], progress=False))  # warm-up
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        records = list(det.iter_inspect(images, progress=False))
    wall = time.perf_counter() - t0
    ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}  # ms
    total = sum(ops.values())
    stages = {s: sum(ops.get(k, 0.0) for k in keys) for s, keys in STAGES.items()}
    stages["other operators"] = total - sum(stages.values())
    _emit(
        {
            "bench": "profile",
            "set": name,
            "images": len(records),
            "bank": int(det.memory_bank_.shape[0]),
            "ms_per_image": round(wall / len(records) * 1e3, 1),
            "operators_ms_per_image": round(total / len(records), 1),
            "stage_ms_per_image": {k: round(v / len(records), 1) for k, v in stages.items()},
            "top_operators_ms_per_image": {
                k: round(v / len(records), 2)
                for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8]
            },
        }
    )


def gemm(bank_rows: int = 16384) -> None:
    gen = torch.Generator().manual_seed(0)
    square = torch.randn(2048, 2048, generator=gen).bfloat16()
    s = median_seconds(lambda: square @ square, 5)
    _emit({"bench": "gemm", "shape": "2048^3 bf16", "gflops": round(2 * 2048**3 / s / 1e9)})
    for q_rows in (128, 256):
        for k in (153, 160, 176, 192):
            q = torch.randn(q_rows, k, generator=gen).bfloat16()
            bank = torch.randn(bank_rows, k, generator=gen).bfloat16()
            out = torch.empty(q_rows, bank_rows, dtype=torch.bfloat16)
            s = median_seconds(lambda q=q, b=bank, o=out: torch.mm(q, b.T, out=o), 15)
            _emit(
                {
                    "bench": "gemm",
                    "shape": f"{q_rows}x{k} @ {k}x{bank_rows} bf16",
                    "ms": round(s * 1e3, 3),
                    "gflops_of_153": round(2 * q_rows * 153 * bank_rows / s / 1e9),
                }
            )
    q = torch.randn(1600, 152, generator=gen)
    bank = torch.randn(bank_rows, 152, generator=gen)
    s = median_seconds(lambda: q.bfloat16() @ bank.bfloat16().T, 7)
    _emit({"bench": "gemm", "shape": f"1600x152 @ 152x{bank_rows}", "kind": "bf16", "ms": s * 1e3})
    scale = bank.abs().amax(1) / 127
    qw = torch.quantize_per_channel(bank, scale, torch.zeros(bank_rows, dtype=torch.long), 0,
                                    torch.qint8)  # fmt: skip
    for engine in torch.backends.quantized.supported_engines:
        if engine in ("none", "qnnpack"):
            continue
        torch.backends.quantized.engine = engine
        packed = torch.ops.quantized.linear_prepack(qw, None)
        s = median_seconds(lambda p=packed: torch.ops.quantized.linear_dynamic(q, p, True), 7)
        _emit(
            {
                "bench": "gemm",
                "shape": f"1600x152 @ 152x{bank_rows}",
                "kind": f"int8 linear_dynamic ({engine})",
                "ms": s * 1e3,
            }
        )


SHAPE_MODES = {"as today": 1, "pad16": 16, "pad32": 32, "pad64": 64, "plain conv2d": 1}


def shapes(n: int) -> None:
    """Each mode in a fresh process (oneDNN's primitive cache is process-wide)."""
    import subprocess
    import sys

    for mode in SHAPE_MODES:
        cmd = [sys.executable, __file__, "shapes-one", "--mode", mode, "--images", str(n)]
        subprocess.run(cmd, check=True)


def shapes_one(mode: str, n: int) -> None:
    import torch.nn.functional as F
    from PIL import Image

    import patchcore.core.backbones as backbones
    from patchcore.core import fused

    paths = sorted((DATA / "magnetic_tile" / "test").rglob("*.jpg"))
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:n]]
    xs = []
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"))
        xs.append(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255)
    multiple = SHAPE_MODES[mode]
    if mode != "as today":
        fused._CACHED_SHAPES = 128  # packed weights kept for every padded shape
    if mode == "plain conv2d":
        backbones.use_mkldnn = lambda device, dtype: False
    fe = backbones.FeatureExtractor("efficientnet-lite0", None, weights=None)
    with torch.inference_mode():
        fe(torch.rand(1, 3, 224, 224))  # one-off start-up, outside the timing
        seen = set()
        t0 = time.perf_counter()
        for x in xs:
            h, w = x.shape[-2:]
            x = F.pad(x, (0, -w % multiple, 0, -h % multiple))
            seen.add(tuple(x.shape))
            fe(x)
        s = time.perf_counter() - t0
    _emit(
        {
            "bench": "shapes",
            "mode": mode,
            "images": n,
            "distinct_shapes": len(seen),
            "backbone_ms_per_image": round(s / n * 1e3, 1),
        }
    )


def ov_precision(name: str, n: int) -> None:
    import tempfile
    from pathlib import Path

    import openvino as ov

    from patchcore.core.export import export
    from patchcore.core.images import as_tensor

    det = _model(name)
    tmp = Path(tempfile.mkdtemp(prefix="ov-precision-")) / "export"
    export(det, tmp, format="openvino", search="float32")
    files = sorted(
        p
        for p in (DATA / name / "test").rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))[: n - n % 8]]
    pixels = [as_tensor(f).numpy()[None] for f in files]
    if len({p.shape for p in pixels}) != 1:
        raise SystemExit(f"{name}: images of several sizes; this mode needs one size")
    batches = [np.concatenate(pixels[i : i + 8]) for i in range(0, len(pixels), 8)]
    h, w = batches[0].shape[-2:]
    xml = tmp / f"model-{h}x{w}.xml"
    model = ov.Core().read_model(xml if xml.exists() else tmp / "model.xml")
    scores, times = {}, {}
    for prec in ("f32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": prec, "INFERENCE_NUM_THREADS": 2}
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()

        def run(request=request) -> list:  # noqa: ANN001
            return [request.infer({0: b})[0].copy() for b in batches]

        times[prec] = 1e3 * median_seconds(run, 5, 1) / len(files)
        scores[prec] = np.concatenate(run())
    rel = np.abs(scores["bf16"] - scores["f32"]) / np.abs(scores["f32"])
    _emit({
        "bench": "ov-precision",
        "set": name,
        "images": len(files),
        "graph_ms_per_image": {k: round(v, 1) for k, v in times.items()},
        "bf16_score_rel_max": float(rel.max()),
    })  # fmt: skip


def map_error(name: str, n: int) -> None:
    import tempfile
    from pathlib import Path

    from patchcore.core.export import export
    from patchcore.lean.runtime import ExportedModel

    det = _model(name)
    files = sorted(
        p
        for p in (DATA / name / "test").rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:n]]
    tmp = Path(tempfile.mkdtemp(prefix="map-error-"))
    export(det, tmp / "openvino", format="openvino")
    export(det, tmp / "onnx")
    maps = {f"torch ({det._index.precision})": [r.anomaly_map for r in det.inspect(files)]}
    for route in ("onnx", "openvino"):
        model = ExportedModel(tmp / route)
        maps[f"{route} ({model.info['search']})"] = [r.anomaly_map for r in model.inspect(files)]
    for precision in ("bfloat16", "int8"):  # the torch path's other reduced precisions
        if f"torch ({precision})" not in maps:
            det.set_params(search_precision=precision)
            maps[f"torch ({precision})"] = [r.anomaly_map for r in det.inspect(files)]
    det.set_params(search_precision="float32")
    exact = [r.anomaly_map for r in det.inspect(files)]
    errors = {}
    for route, got in maps.items():
        rel = [float(np.abs(a - b).max() / b.max()) for a, b in zip(got, exact, strict=True)]
        errors[route] = {"max": round(max(rel), 4), "median": round(float(np.median(rel)), 4)}
    _emit({"bench": "map-error", "set": name, "images": len(files), "vs_float32": errors})


def recheck(name: str, n: int) -> None:
    from PIL import Image

    from patchcore.core.embedding import flatten_patches
    from patchcore.core.search import bf16_error

    det = _model(name)
    index, k = det._index, int(det.top_k)
    files = sorted(
        p
        for p in (DATA / name / "test").rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:n]]
    count = {"first form": 0, "a posteriori": 0}
    worst = {"first form": 0.0, "a posteriori": 0.0}
    with torch.inference_mode():
        for f in files:
            rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255
            emb = det._embed(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous())
            flat = flatten_patches(emb).float().reshape(-1, emb.shape[1])
            d2, err = index.min_sq_bounded(flat)  # the a posteriori form
            q = flat - index._mean
            qsq = (q * q).sum(1)
            first = bf16_error(qsq, index._max_norm, flat.shape[1])
            exact = index.exact_min_distances(flat).square()
            top = d2.clamp(min=0).topk(min(2 * k, len(d2))).indices
            floor = exact[top].topk(min(k, len(top))).values[-1]
            for form, bound in (("first form", first), ("a posteriori", err)):
                reach = d2.clamp(min=0) + bound >= floor * (1 - 1e-6)
                reach[top] = False
                count[form] += len(top) + int(reach.sum())
                worst[form] = max(worst[form], float(((d2 - exact).abs() / bound).max()))
    _emit(
        {
            "bench": "recheck",
            "set": name,
            "images": len(files),
            "rechecked_per_image": {f: round(c / len(files), 1) for f, c in count.items()},
            "largest_error_over_bound": {f: round(w, 3) for f, w in worst.items()},
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "what",
        choices=("profile", "gemm", "shapes", "shapes-one", "ov-precision", "map-error", "recheck"),
    )
    ap.add_argument("--mode", choices=list(SHAPE_MODES), default="as today")
    ap.add_argument("--sets", nargs="+", default=["deeppcb", "magnetic_tile", "casting"])
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.what == "profile":
        for name in args.sets:
            profile(name, args.images)
    elif args.what == "gemm":
        gemm()
    elif args.what == "shapes":
        shapes(args.images)
    elif args.what == "ov-precision":
        for name in args.sets:
            ov_precision(name, args.images)
    elif args.what == "map-error":
        for name in args.sets:
            map_error(name, args.images)
    elif args.what == "recheck":
        for name in args.sets:
            recheck(name, args.images)
    else:
        shapes_one(args.mode, args.images)


if __name__ == "__main__":
    main()
