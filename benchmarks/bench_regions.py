"""Defect regions against the ground-truth masks: region recall and false regions per image.

Fits the default detector once per set with masks (every image of train/good), scores every
test image with maps at each image's own size and caches scores and maps (``--cache``, outside
the repository); later runs read the cache. Usage:

    python benchmarks/bench_regions.py [--sets magnetic_tile deeppcb] [--cache DIR] [--refit]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import DATA, ROOT, machine, peak_rss_mb, write_results_section

from patchcore import PatchCore
from patchcore.core.datasets import ImageDataset, load_folder, load_mask, split_each_label
from patchcore.core.metrics import (
    anomaly_threshold,
    pixel_threshold,
    region_scores,
    region_threshold,
)
from patchcore.lean.regions import label_regions, region_mask

MASK_SETS = ("magnetic_tile", "deeppcb")
MIN_AREAS = (1, 16, 64, 256)
OVERLAPS = (0.0, 0.25)


def scored(name: str, cache: Path, refit: bool = False) -> dict:
    """Scores and native-size maps of every test image of ``name`` (cached in ``cache``)."""
    path = cache / f"{name}.npz"
    if path.exists() and not refit:
        z = np.load(path, allow_pickle=False)
        n = int(z["n"])
        return {
            "scores": z["scores"],
            "maps": [z[f"map{i}"] for i in range(n)],
            "info": json.loads(str(z["info"])),
        }
    train = load_folder(DATA / name, "train")
    test = load_folder(DATA / name, "test")
    det = PatchCore(progress=False)
    t0 = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = det.score(test.images, maps="native")
    score_s = time.perf_counter() - t0
    info = {
        "set": name,
        "train": len(train),
        "test": len(test),
        "bank": int(det.memory_bank_.shape[0]),
        "fit_s": round(fit_s, 1),
        "ms_per_image": round(score_s / len(test) * 1000, 1),
        "load_after": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "peak_rss_mb": round(peak_rss_mb()),
        "machine": machine(),
    }
    cache.mkdir(parents=True, exist_ok=True)
    maps = {f"map{i}": m for i, m in enumerate(r.maps)}
    np.savez(path, n=len(r.maps), scores=r.scores, info=json.dumps(info), **maps)
    return {"scores": r.scores, "maps": r.maps, "info": info}


def folds(test: ImageDataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two (calibration, evaluation) index pairs: halves of each label (seed 0), swapped."""
    a, _ = split_each_label(test, 0.5, seed=0)
    first = set(a.names)
    in_a = np.array([n in first for n in test.names])
    idx = np.arange(len(test))
    return [(idx[in_a], idx[~in_a]), (idx[~in_a], idx[in_a])]


def evaluate(name: str, s: dict) -> list[dict]:
    """Region recall and false regions for every cut rule, min area and gating, both folds.

    Each test image is evaluated once, with thresholds chosen on the other half: the image
    threshold at max F1 of the image scores, the pixel threshold at max pixel F1 of the maps.
    """
    test = load_folder(DATA / name, "test")
    scores, maps = s["scores"], s["maps"]
    labels = test.labels
    masks = [load_mask(x, m.shape) for x, m in zip(test, maps, strict=True)]
    totals: dict[tuple, dict] = {}
    cuts_seen = []
    for calib, held in folds(test):
        t_img = anomaly_threshold(labels[calib], scores[calib], "max_f1")
        t_pix = pixel_threshold([masks[i] for i in calib], [maps[i] for i in calib])
        t_reg = region_threshold([masks[i] for i in calib], [maps[i] for i in calib])
        cuts_seen.append({"image": t_img, "pixel": t_pix, "region": t_reg})
        for cut_name, cut in (("image", t_img), ("pixel", t_pix), ("region", t_reg)):
            for min_area in MIN_AREAS:
                preds = {i: region_mask(maps[i], cut, min_area=min_area) for i in held}
                flagged = {i for i in held if scores[i] >= t_img}
                empty = {i: np.zeros_like(preds[i]) for i in held}
                for gate in ("all", "flagged"):
                    for group, members in (
                        ("all", held),
                        ("normal", held[labels[held] == 0]),
                        ("defective", held[labels[held] == 1]),
                    ):
                        p = [
                            preds[i] if gate == "all" or i in flagged else empty[i] for i in members
                        ]
                        for ov in OVERLAPS:
                            r = region_scores([masks[i] for i in members], p, min_overlap=ov)
                            key = (cut_name, min_area, gate, group, ov)
                            acc = totals.setdefault(key, dict.fromkeys(_COUNTS, 0))
                            for k in _COUNTS:
                                acc[k] += getattr(r, k)
    rows = []
    for (cut_name, min_area, gate, group, ov), acc in totals.items():
        rows.append(
            {
                "set": name,
                "cut": cut_name,
                "min_area": min_area,
                "gate": gate,
                "group": group,
                "min_overlap": ov,
                **acc,
                "region_recall": round(acc["found"] / max(1, acc["gt_regions"]), 4),
                "false_per_image": round(acc["false_regions"] / max(1, acc["images"]), 3),
                "thresholds": cuts_seen,
            }
        )
    return rows


_COUNTS = ("images", "gt_regions", "found", "predicted_regions", "false_regions")


def labelling_ms(maps: list[np.ndarray], cut: float, min_area: int) -> dict:
    """Median and max wall time of :func:`label_regions` per native-size map, ms."""
    times = []
    for m in maps:
        t0 = time.perf_counter()
        label_regions(m, cut, min_area=min_area)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "median_ms": round(float(np.median(times)), 2),
        "max_ms": round(float(np.max(times)), 2),
        "median_pixels": int(np.median([m.size for m in maps])),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=list(MASK_SETS))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/patchcore-regions-cache"))
    ap.add_argument("--refit", action="store_true", help="fit and score again, ignoring the cache")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "regions.json")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    result = {}
    for name in args.sets:
        s = scored(name, args.cache, args.refit)
        print(json.dumps(s["info"]), flush=True)
        rows = evaluate(name, s)
        t_img = float(np.mean([c["image"] for c in rows[0]["thresholds"]]))
        timing = labelling_ms(s["maps"], t_img, 16)
        result[name] = {"info": s["info"], "rows": rows, "labelling": timing}
        print(json.dumps(timing), flush=True)
        for r in rows:
            if r["group"] == "all" and r["min_overlap"] == 0.0:
                keys = ("cut", "min_area", "gate", "region_recall", "false_per_image")
                print(json.dumps({k: r[k] for k in keys}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if not args.no_write:
        write_results_section("regions", table(result))


def _pick(rows: list[dict], **want) -> dict:
    return next(r for r in rows if all(r[k] == v for k, v in want.items()))


def table(result: dict) -> str:
    """The RESULTS.md section: one row per set, cut and minimum area (regions on every image)."""
    lines = [
        "## Defect regions (`benchmarks/bench_regions.py`)",
        "",
        f"Machine: {machine()}. Each set with masks: the default detector fitted once on every "
        "image of train/good, every test image scored with maps at its native size. The test "
        "images are split in two halves per label (seed 0); the thresholds are chosen on one "
        "half and the regions scored on the other, then the halves swap, so every test image "
        "is scored once by thresholds that never saw it. Cuts: **image** = the image threshold "
        "(max F1 of the image scores, the default when a model has no region threshold); "
        "**pixel** = max pixel F1 of the maps against the masks (`calibrate-regions --method "
        "max_pixel_f1`); **region** = max region F1 (found regions against false regions, "
        "min area 16, 32 candidate cuts; `calibrate-regions`, the default method). "
        "Regions are 8-connected; a ground-truth region (8-connected component of a mask) "
        "counts as found when a predicted region shares at least one pixel with it (the "
        "stricter column: more than 25 % of its pixels covered); a false region touches no "
        "ground-truth pixel. Regions are listed for every image, flagged or not.",
        "",
        "| set | cut (mean over halves) | min area px | GT regions | recall (any pixel) | "
        "recall (>25 % covered) | false regions / image | per normal image | "
        "per defective image | predicted / image |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in result.items():
        rows = res["rows"]
        for cut in ("image", "pixel", "region"):
            value = np.mean([c[cut] for c in rows[0]["thresholds"]])
            for area in MIN_AREAS:
                base = dict(cut=cut, min_area=area, gate="all")
                a = _pick(rows, group="all", min_overlap=0.0, **base)
                strict = _pick(rows, group="all", min_overlap=0.25, **base)
                n = _pick(rows, group="normal", min_overlap=0.0, **base)
                d = _pick(rows, group="defective", min_overlap=0.0, **base)
                lines.append(
                    f"| {name} | {cut} ({value:.4g}) | {area} | {a['gt_regions']} | "
                    f"{a['found'] / a['gt_regions']:.3f} | "
                    f"{strict['found'] / strict['gt_regions']:.3f} | "
                    f"{a['false_per_image']:.3f} | {n['false_per_image']:.3f} | "
                    f"{d['false_per_image']:.3f} | "
                    f"{a['predicted_regions'] / a['images']:.3f} |"
                )
    lines += ["", "Regions only on flagged images (score >= image threshold), same cuts:", ""]
    lines += [
        "| set | cut | min area px | recall (any pixel) | false regions / image |",
        "|---|---|---:|---:|---:|",
    ]
    for name, res in result.items():
        for cut in ("image", "pixel", "region"):
            for area in (16, 64):
                g = _pick(res["rows"], cut=cut, min_area=area, gate="flagged", group="all",
                          min_overlap=0.0)  # fmt: skip
                lines.append(
                    f"| {name} | {cut} | {area} | {g['region_recall']:.3f} | "
                    f"{g['false_per_image']:.3f} |"
                )
    lines += ["", "Cost of labelling (`label_regions` on each native-size map, image cut, "
              "min area 16) next to the detector's scoring time of the same run:", ""]  # fmt: skip
    lines += [
        "| set | test images | median map pixels | labelling median ms | max ms | "
        "scoring ms / image (batched) | fit s | load avg (fit+score / labelling) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, res in result.items():
        i, t = res["info"], res["labelling"]
        lines.append(
            f"| {name} | {i['test']} | {t['median_pixels']:,} | {t['median_ms']} | "
            f"{t['max_ms']} | {i['ms_per_image']} | {i['fit_s']} | "
            f"{i['load_after']} / {t['load']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
