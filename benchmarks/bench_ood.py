"""Out-of-distribution hints on the real sets: do they fire on the inputs they are for, and on
no test image?

For each set (casting, magnetic_tile, deeppcb from ../shared/data; the ELPV mono cells of the
``elpv-dataset`` package): a model at the defaults fitted on a seeded draw of ``--train``
training images (all when larger), calibrated at max F1 on a seeded half of the test images
(``patchcore.apps.workflow.calibrate_detector``: the map reference comes from that half's normal
images), then every test image scored with its native-size map and judged by the rule its
record applies (``patchcore.lean.ood.check`` on the model's profile).
Each model also inspects the inputs the hints are for: ``--foreign`` test images of each other
set (another part), and a 1200 x 900 upscale and a 20 x 20 thumbnail of ``--resized`` of its own
normal test images.

    nice -n 19 env PYTHONPATH=src python benchmarks/bench_ood.py --out /tmp/ood.json
    python benchmarks/bench_ood.py --again /tmp/ood.json     # re-judge the saved statistics
    python benchmarks/bench_ood.py --quantiles /tmp/ood.json  # compare map statistics
    python benchmarks/bench_ood.py --pixels                   # the pixel checks alone, no model

Saves every input's statistics (size, pixel statistics, map statistic and quantiles, the
profile) to ``--out``, so ``--again`` re-judges them with the current rule without scoring
again; prints one JSON line per set and kind (images, flagged, the reasons' first words) with
the machine, load and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import machine
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ("casting", "magnetic_tile", "deeppcb", "elpv")


def load_set(name: str):
    """(normal training images, labelled test images) of a set."""
    from patchcore.core.datasets import load_elpv, load_folder, normal_train_split

    if name == "elpv":  # as the accuracy benchmarks: half of the normal cells to fit on
        return normal_train_split(load_elpv(cell_type="mono"), 0.5, seed=0)
    train = load_folder(DATA / name, "train")
    return train.subset(train.labels == 0), load_folder(DATA / name, "test")


def pixels(image) -> np.ndarray:
    """An image's uint8 pixels (a path is read)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(image)


def resized(image, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``size`` (W, H), bilinear."""
    return np.asarray(Image.fromarray(pixels(image)).resize(size, Image.Resampling.BILINEAR))


#: Map quantiles saved per input, to compare map statistics offline (``--again``).
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75)


def inspect(det, images: list, kind: str, labels=None, calib: set | None = None) -> list[dict]:
    """One row per input: the statistics its record's hint is judged on (its own size, pixel
    statistics, map statistic), the map's quantiles, whether it was a calibration image, and the
    hint (``ood.check`` on the model's profile: the rule ``record.inspection`` applies)."""
    from patchcore.lean import ood
    from patchcore.lean.record import judge as verdicts

    rows = []
    for r in det.iter_score(images, maps="native", on_error="skip", progress=False):
        if r.error is not None:
            continue
        row = {
            "kind": kind,
            "image": r.name,
            "label": None if labels is None else int(labels[r.index]),
            "size": list(r.size),
            "stats": list(r.stats),
            "map_stat": ood.map_statistic(r.map),
            "map_quantiles": np.quantile(r.map, QUANTILES).tolist(),
            "calibration": calib is not None and str(images[r.index]) in calib,
            "verdict": verdicts([r.score], det.threshold_)[0],
        }
        row["ood"], row["reason"] = ood.check(
            det.input_profile_, size=r.size, stats=r.stats, anomaly_map=r.map
        )
        rows.append(row)
    return rows


def measure(
    name: str, n_train: int, n_test: int | None, n_foreign: int, n_resized: int, foreign: dict
) -> dict:
    from patchcore import PatchCore
    from patchcore.apps.workflow import calibrate_detector
    from patchcore.core.datasets import sample_fraction, split_each_label

    train, test = load_set(name)
    if n_test is not None and n_test < len(test):  # a smoke run: a stratified draw
        test = split_each_label(test, n_test / len(test), seed=0)[0]
    t0 = time.perf_counter()
    train = sample_fraction(train, min(1.0, n_train / len(train)), seed=0)
    det = PatchCore(progress=False).fit(train, on_error="skip")
    summary, calib, _ = calibrate_detector(det, test, method="max_f1", seed=0)
    rows = inspect(det, list(test.images), "test", test.labels, set(map(str, calib.images)))
    for other, images in foreign.items():
        if other != name:
            rows += inspect(det, images[:n_foreign], f"part:{other}")
    normal = [im for im, y in zip(test.images, test.labels, strict=True) if y == 0][:n_resized]
    rows += inspect(det, [resized(im, (1200, 900)) for im in normal], "upscale 1200x900")
    rows += inspect(det, [resized(im, (20, 20)) for im in normal], "thumbnail 20x20")
    return {
        "set": name,
        "train_images": len(train),
        "profile": det.input_profile_,
        "threshold": summary.threshold,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


def judge(result: dict) -> None:
    """Re-judge the saved rows with the current rule (``ood.check``) in place."""
    from patchcore.lean import ood

    for row in result["rows"]:
        row["ood"], row["reason"] = ood.check(
            result["profile"], size=row["size"], stats=row["stats"], map_stat=row["map_stat"]
        )


def summarise(result: dict, context: dict) -> None:
    by_kind: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_kind.setdefault(row["kind"], []).append(row)
    ref = (result["profile"] or {}).get("map_reference")
    for kind, rows in by_kind.items():
        flagged = [r for r in rows if r["ood"]]
        ratios = [r["map_stat"] / ref for r in rows if ref]
        why = Counter(r["reason"].split(": ", 1)[1].split(" ")[0] for r in flagged)
        print(
            json.dumps(
                {
                    "set": result["set"],
                    "kind": kind,
                    "images": len(rows),
                    "flagged": len(flagged),
                    "map_ratio_max": round(max(ratios), 3) if ratios else None,
                    "map_ratio_min": round(min(ratios), 3) if ratios else None,
                    "reasons": dict(why),
                    "examples": [r["image"] for r in flagged[:3]] if kind == "test" else [],
                    **context,
                }
            ),
            flush=True,
        )


def compare_quantiles(results: list[dict]) -> None:
    """For each saved map quantile, as a ratio to the largest among the calibration's normal
    images (their native-size maps): the largest over every test image, and the smallest over
    the other-part images that only the map rule can catch (size, aspect, colour and brightness
    within the profile). One JSON line per quantile."""
    from patchcore.lean import ood

    for q, quantile in enumerate(QUANTILES):
        tests, others = [], []
        for result in results:
            rows = result["rows"]
            ref = max(
                r["map_quantiles"][q]
                for r in rows
                if r["kind"] == "test" and r["calibration"] and r["label"] == 0
            )
            for r in rows:
                ratio = (r["map_quantiles"][q] / ref, result["set"], r["kind"], r["image"])
                if r["kind"] == "test":
                    tests.append(ratio)
                elif r["kind"].startswith("part:"):
                    flag, _ = ood.check(result["profile"], size=r["size"], stats=r["stats"])
                    if not flag:
                        others.append(ratio)
        top, low = max(tests), min(others)
        print(
            json.dumps(
                {
                    "quantile": quantile,
                    "test_ratio_max": round(top[0], 3),
                    "test_max_at": top[1:],
                    "map_only_other_parts": len(others),
                    "other_part_ratio_min": round(low[0], 3),
                    "other_part_min_at": low[1:3],
                }
            )
        )


def pixel_checks() -> None:
    """The pixel checks alone (no model), on every image: per set, the profile of every training
    image; how far each test image's intensity std lies outside the profile's span (the factor
    the contrast check needs to stay quiet on all of them), and how many test images of each
    other set the pixel checks flag (contrast among them). One JSON line per set."""
    from patchcore.lean import ood

    def stats(images: list) -> np.ndarray:
        return np.array([ood.pixel_stats(pixels(im).transpose(2, 0, 1) / 255) for im in images])

    data = {}
    for name in SETS:
        train, test = load_set(name)
        data[name] = (stats(train.images), stats(test.images), np.asarray(test.labels))
    for name, (tr, te, _) in data.items():
        prof = ood.profile([(1, 1)] * len(tr), tr)  # sizes are not judged here
        lo, hi = prof["std"]
        out = {"set": name, "train_std": [round(lo, 3), round(hi, 3)]}
        out["test_factor_needed"] = round(
            float(np.max(np.maximum(lo / te[:, 1], te[:, 1] / hi))), 3
        )
        out["test_flagged"] = sum(bool(ood.check(prof, stats=s)[0]) for s in te)
        for other, (_, ot, _) in data.items():
            if other != name:
                reasons = [ood.check(prof, stats=s)[1] or "" for s in ot]
                out[f"part:{other}"] = {
                    "images": len(ot),
                    "flagged": sum(bool(r) for r in reasons),
                    "by_contrast": sum("contrast" in r for r in reasons),
                }
        print(json.dumps({**out, "factor": ood.CONTRAST_FACTOR}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--train", type=int, default=100_000, help="training images per model")
    parser.add_argument("--test", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--foreign", type=int, default=20, help="images of each other set")
    parser.add_argument("--resized", type=int, default=5, help="upscales and thumbnails")
    parser.add_argument("--out", type=Path, default=Path("/tmp/patchcore-ood.json"))
    parser.add_argument("--again", type=Path, default=None, help="re-judge a saved run")
    parser.add_argument("--quantiles", type=Path, default=None, help="compare map statistics")
    parser.add_argument("--pixels", action="store_true", help="the pixel checks alone")
    args = parser.parse_args()
    if args.pixels:
        pixel_checks()
        return
    if args.quantiles is not None:
        compare_quantiles(json.loads(args.quantiles.read_text()))
        return
    context = {"date": dt.date.today().isoformat(), "machine": machine()}
    if args.again is not None:
        results = json.loads(args.again.read_text())
        for result in results:
            judge(result)
            summarise(result, {**context, "rejudged": str(args.again)})
        return
    foreign = {}
    for name in args.sets:
        _, test = load_set(name)
        idx = np.random.default_rng(1).permutation(len(test))[: args.foreign]
        foreign[name] = [pixels(test.images[i]) for i in sorted(idx)]
    results = []
    for name in args.sets:
        load = os.getloadavg()[0]
        result = measure(name, args.train, args.test, args.foreign, args.resized, foreign)
        results.append(result)
        args.out.write_text(json.dumps(results))
        summarise(result, {**context, "load": round(load, 1), "seconds": result["seconds"]})


if __name__ == "__main__":
    main()
