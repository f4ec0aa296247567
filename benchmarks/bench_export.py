"""Exported runtimes against torch's default path (issues #14, #24): speed and parity, one command.

Per shared set (all three by default): the default ``PatchCore()`` (native size; since the
eighth stop the int8 scan with its exact re-check on CPUs with int8 dot products, bfloat16
before) fitted on every training image (or ``--train N``, a seeded subset; fitted models are
cached in ``--models``), calibrated (max F1) on the test set, then exported twice with the
defaults of ``patchcore export``: ONNX (``search="auto"``: the int8 search with its exact
float32 re-check, plus fixed-size graphs for the common training sizes) and OpenVINO
(``search="auto"``: the bfloat16 scan with the same re-check, since the fifth stop; float32
before). Every test image is then inspected (``iter_inspect``: decode, resize, graph, native-
size map, record with regions) by three routes,
one after the other in chunks of ``--chunk`` images so that every route sees the same load:

- ``torch``: the default path (``PatchCore.iter_inspect``),
- ``onnxruntime``: ``ExportedModel(onnx export).iter_inspect``,
- ``openvino``: ``ExportedModel(openvino export).iter_inspect``.

Speed: wall ms per image and CPU ms per image (all threads) of each route; each route warms up on
two images first (not counted). Parity against the torch route: largest and median relative
score difference, verdicts differing, largest and median map difference (per image: largest
absolute difference over torch's map maximum), images whose region boxes differ.

    python benchmarks/bench_export.py                      # all sets, full data: the figure
    python benchmarks/bench_export.py --sets casting --train 100
    python benchmarks/bench_export.py --routes torch --repeats 3  # torch alone, medians

Rows go to benchmarks/out/bench_export.jsonl (with machine, load average and date); a summary
table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, SETS, append_row, machine, subsets

from patchcore import PatchCore
from patchcore.core.export import export
from patchcore.lean.runtime import ExportedModel

ROWS = ROOT / "benchmarks" / "out" / "bench_export.jsonl"
MODELS = ROOT / "benchmarks" / "out" / "models"


def fitted(name: str, n_train: int | None, models: Path) -> tuple[PatchCore, list, np.ndarray]:
    """The default detector on ``name`` (cached in ``models``), calibrated; test paths, labels."""
    train, test = subsets(name, n_train, None)
    paths, labels = list(test.images), np.asarray(test.labels)
    path = models / f"{name}-{n_train or 'all'}.pt"
    if path.is_file():
        det = PatchCore.load(path)
    else:
        t0 = time.perf_counter()
        det = PatchCore(progress=False).fit(train)
        det.calibrate(paths, labels)
        det.metadata_["fit_s"] = round(time.perf_counter() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        det.save(path)
    det.progress = False
    return det, paths, labels


def timed_export(det: PatchCore, out: Path, **kw) -> float:
    t0 = time.perf_counter()
    export(det, out, **kw)
    return round(time.perf_counter() - t0, 1)


def measure(routes: dict, paths: list, chunk: int) -> tuple[dict, dict, dict]:
    """Every route on every path, chunk by chunk: ms per image (wall, CPU), the records by
    route (maps dropped) and each route's per-image map differences from torch's."""
    for fn in routes.values():
        list(fn(paths[:2]))  # warm-up: sessions, thread pools, caches
    wall = dict.fromkeys(routes, 0.0)
    cpu = dict.fromkeys(routes, 0.0)
    records: dict[str, list] = {k: [] for k in routes}
    map_diff: dict[str, list[float]] = {k: [] for k in routes if k != "torch"}
    for lo in range(0, len(paths), chunk):
        part = paths[lo : lo + chunk]
        got = {}
        for k, fn in routes.items():
            t, c = time.perf_counter(), time.process_time()
            got[k] = list(fn(part))
            wall[k] += time.perf_counter() - t
            cpu[k] += time.process_time() - c
        for k in map_diff:
            for a, b in zip(got["torch"], got[k], strict=True):
                if a.anomaly_map is not None and b.anomaly_map is not None:
                    diff = np.abs(b.anomaly_map - a.anomaly_map).max() / max(a.map_max, 1e-12)
                    map_diff[k].append(float(diff))
        for k in routes:
            records[k] += [r.without_map() for r in got[k]]
    n = len(paths)
    speed = {k: {"wall_ms": round(1000 * wall[k] / n, 1), "cpu_ms": round(1000 * cpu[k] / n, 1)}
             for k in routes}  # fmt: skip
    return speed, records, map_diff


def parity(records: dict, map_diff: dict) -> dict:
    ref = records["torch"]
    s0 = np.array([np.nan if r.score is None else r.score for r in ref])
    out = {}
    for k, recs in records.items():
        if k == "torch":
            continue
        s = np.array([np.nan if r.score is None else r.score for r in recs])
        rel = np.abs(s - s0) / np.abs(s0)
        boxes = [
            [(g.x0, g.y0, g.x1, g.y1) for g in (a.regions or ())]
            != [(g.x0, g.y0, g.x1, g.y1) for g in (b.regions or ())]
            for a, b in zip(ref, recs, strict=True)
        ]
        maps = np.asarray(map_diff[k] or [np.nan])
        out[k] = {
            "score_rel_max": float(np.nanmax(rel)),
            "score_rel_median": float(np.nanmedian(rel)),
            "verdicts_differ": sum(a.verdict != b.verdict for a, b in zip(ref, recs, strict=True)),
            "map_rel_max": float(maps.max()),
            "map_rel_median": float(np.median(maps)),
            "region_boxes_differ": int(sum(boxes)),
        }
    return out


def run(name: str, args: argparse.Namespace) -> dict:
    det, paths, _ = fitted(name, args.train or None, Path(args.models))
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-export-{name}-"))
    routes = {"torch": lambda p: det.iter_inspect(p)}
    onnx_s = ov_s = None
    if "onnxruntime" in args.routes:
        onnx_s = timed_export(det, tmp / "onnx")
        routes["onnxruntime"] = ExportedModel(tmp / "onnx", threads=args.threads).iter_inspect
    if "openvino" in args.routes and not args.no_openvino:
        ov_s = timed_export(det, tmp / "openvino", format="openvino")
        routes["openvino"] = ExportedModel(tmp / "openvino", threads=args.threads).iter_inspect
    runs = [measure(routes, paths, args.chunk) for _ in range(args.repeats)]
    speed, records, map_diff = runs[0]
    if args.repeats > 1:  # medians over the repeats; parity from the first
        speed = {
            k: {m: float(np.median([r[0][k][m] for r in runs])) for m in ("wall_ms", "cpu_ms")}
            for k in routes
        }
    row = {
        "set": name,
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "runtime_threads": args.threads,
        "train_images": det.n_train_images_,
        "test_images": len(paths),
        "bank_rows": int(det.memory_bank_.shape[0]),
        "repeats": args.repeats,
        "onnx_export_s": onnx_s,
        "openvino_export_s": ov_s,
        "ms_per_image": speed,
        "vs_torch": {
            k: round(v["wall_ms"] / speed["torch"]["wall_ms"], 3) for k, v in speed.items()
        },
        "parity_vs_torch": parity(records, map_diff),
    }
    if onnx_s is not None:
        info = ExportedModel(tmp / "onnx").info
        row["onnx_graphs"] = [g["size"] for g in info["graphs"]]
        row["onnx_search"] = info["search"]
    if ov_s is not None:
        row["openvino_search"] = ExportedModel(tmp / "openvino").info["search"]
    return append_row(ROWS, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--train", type=int, default=0, help="training images per set; 0 = all")
    ap.add_argument("--models", default=str(MODELS), help="cache of fitted models")
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (None: default)")
    ap.add_argument("--chunk", type=int, default=32, help="images per route before the next")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument(
        "--routes",
        nargs="+",
        default=["torch", "onnxruntime", "openvino"],
        choices=["torch", "onnxruntime", "openvino"],
        help="routes timed (torch always: the baseline; torch alone: no runtime beside it)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed passes (medians reported)")
    args = ap.parse_args()
    rows = [run(name, args) for name in args.sets]
    for row in rows:
        print(json.dumps(row), flush=True)
    print("\n| set | torch ms/img | onnxruntime ms/img (x) | OpenVINO ms/img (x) | load |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        ms, x = r["ms_per_image"], r["vs_torch"]
        ov = f"{ms['openvino']['wall_ms']} ({x['openvino']})" if "openvino" in ms else "-"
        ort = f"{ms['onnxruntime']['wall_ms']} ({x['onnxruntime']})" if "onnxruntime" in ms else "-"
        print(f"| {r['set']} | {ms['torch']['wall_ms']} | {ort} | {ov} | {r['load']} |")


if __name__ == "__main__":
    main()
