"""Incremental updates on the real sets (issue #15): partial_fit against a refit.

Three measurements, every row appended to benchmarks/out/update.jsonl (with the load average):

``equivalence``: per set and seed the training normals are split A (70 %) / B (30 %), seeded;
fit(A+B) against fit(A) + partial_fit(B), at the defaults and native resolution: the coverage
radius of each bank over all A+B training patches (exact: a bfloat16 scan with its error bound,
every row that could hold the maximum re-checked in float32), image AUROC on every test image,
bank sizes and the time of each bank step. The frozen backbone gives every image the same
features in every model, so each training and test image is embedded once per set; the fits
and the update then run exactly their bank steps on those features (``PatchCore._select_bank``
as ``fit`` does after extracting, ``PatchCore._extend`` as ``partial_fit`` does), and the test
scores are the scoring path's (``search.patch_scores`` and the eq. 7 reweighting) on the stored
test features, checked against ``PatchCore.score`` on a few images.

``scaling``: real ``partial_fit`` calls (decoding and features included) adding k new images
to one model fitted on a base of the training images, k doubling.

``false_alarms``: a model fitted on all training normals, threshold by max F1 on a seeded half of
the test images (per label). (a) The calibration half's normal images it flags (false alarms an
operator would mark as good) are added with ``partial_fit``; false-alarm rate and recall on the
other half before and after. (b) The held-out half's flagged normals themselves are added:
how many stay flagged, and the recall on the held-out anomalies.

Usage: python benchmarks/bench_update.py [--sets casting magnetic_tile deeppcb] [--seeds 0 1 2]
       python benchmarks/bench_update.py --render   # the RESULTS.md tables from update.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from common import ROOT, SETS, append_row, machine, subsets

from patchcore import PatchCore
from patchcore.core import metrics
from patchcore.core.backbones import FeatureExtractor, resolve_device
from patchcore.core.datasets import split_each_label
from patchcore.core.detector import TrainingFeatures
from patchcore.core.explain import bank_provenance
from patchcore.core.scoring import image_scores
from patchcore.core.search import NearestNeighborIndex, patch_scores, resolve_precision
from patchcore.core.state import FittedState

OUT = ROOT / "benchmarks" / "out" / "update.jsonl"


def extract(det: PatchCore, paths: list[str]) -> TrainingFeatures:
    """Every image's patch features, once (float16, as fit stores them)."""
    return det._features(paths, "raise", True, "features", first_image=0)


def offsets(f: TrainingFeatures) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([g[2] * g[3] for g in f.grids])])


def subset(f: TrainingFeatures, images: np.ndarray) -> TrainingFeatures:
    """The features of some images (in the given order) as one store."""
    off = offsets(f)
    rows = torch.cat([f.features[off[i] : off[i + 1]] for i in images])
    return TrainingFeatures(
        rows, f.dtype, [f.grids[i] for i in images], [f.names[i] for i in images], []
    )


PARAMS: dict = {}  # PatchCore parameters besides the defaults (--cap: max_bank_size)


def fitted(extractor: FeatureExtractor, f: TrainingFeatures, seed: int) -> tuple[PatchCore, float]:
    """A detector whose bank step ran on ``f`` exactly as fit's does; and that step's time."""
    det = PatchCore(seed=seed, progress=False, **PARAMS)
    det.device_, det.extractor_ = resolve_device("cpu"), extractor
    t0 = time.perf_counter()
    idx = det._select_bank(f.features, False)
    bank = f.features[idx].float().contiguous()
    seconds = time.perf_counter() - t0
    state = FittedState(
        memory_bank=bank,
        layers=tuple(extractor.layers),
        n_train_images=len(f.names),
        n_train_patches=int(f.features.shape[0]),
        feature_dtype=f.dtype,
        feature_seconds=0.0,
        coreset_seconds=seconds,
        fit_seconds=seconds,
        provenance=bank_provenance(idx, f.grids),
        train_names=list(f.names),
        train_grids=list(f.grids),
    )
    det._set_fitted(state, extractor)
    return det, seconds


def updated(det: PatchCore, f: TrainingFeatures) -> tuple[PatchCore, float]:
    """``det`` after partial_fit's bank step on ``f``; and that step's time."""
    det = copy.copy(det)
    t0 = time.perf_counter()
    det._extend(f, False, 0.0)
    return det, time.perf_counter() - t0


@torch.inference_mode()
def scores_of(det: PatchCore, f: TrainingFeatures) -> np.ndarray:
    """Image scores of stored test features: the scoring path of PatchCore._score_batch."""
    off = offsets(f)
    out = np.empty(len(f.grids))
    i = 0
    while i < len(f.grids):
        j = i
        while j < len(f.grids) and j - i < 8 and f.grids[j][2:] == f.grids[i][2:]:
            j += 1
        p = f.grids[i][2] * f.grids[i][3]
        patches = f.features[off[i] : off[j]].float().view(j - i, p, -1)
        d, image_max, arg = patch_scores(det._index, patches, int(det.top_k))
        s = image_scores(
            d, det.top_k, patches=patches, best=(image_max, arg), support=det._eq7_support()
        )
        out[i:j] = s.double().numpy()
        i = j
    return out


def radius(features: torch.Tensor, bank: torch.Tensor) -> float:
    """Exact coverage radius of ``bank`` over ``features`` (bf16 scan, float32 re-check)."""
    index = NearestNeighborIndex(bank, precision=resolve_precision("auto", bank.device))
    exact = NearestNeighborIndex(bank)
    n = features.shape[0]
    upper, lower = torch.empty(n), torch.empty(n)
    for lo in range(0, n, 16384):
        d2, err = index.min_sq_bounded(features[lo : lo + 16384])
        upper[lo : lo + 16384], lower[lo : lo + 16384] = d2 + err, d2 - err
    check = (upper >= lower.max()).nonzero().squeeze(1)
    worst = 0.0
    for lo in range(0, check.numel(), 16384):
        rows = features[check[lo : lo + 16384]]
        worst = max(worst, float(exact.exact_min_distances(rows).max()))
    return worst


def equivalence(name: str, seeds: list[int], n_train: int | None, n_test: int | None) -> None:
    train, test = subsets(name, n_train, n_test)
    base = PatchCore(progress=False)
    base.device_ = resolve_device("cpu")
    base.extractor_ = FeatureExtractor(base.backbone, None, base.weights).to(base.device_)
    t0 = time.perf_counter()
    tr = extract(base, [str(p) for p in train.images])
    train_feature_s = time.perf_counter() - t0
    te = extract(base, [str(p) for p in test.images])
    y = test.labels
    # the stored-feature scores are the scoring path's: check on a few test images
    check, _ = fitted(base.extractor_, tr, 0)
    few = [0, len(test) - 1]
    direct = check.score([str(test.images[i]) for i in few], progress=False).scores
    np.testing.assert_allclose(scores_of(check, subset(te, np.array(few))), direct, rtol=1e-4)
    del check
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(len(train))
        n_a = int(round(0.7 * len(train)))
        a, b = np.sort(perm[:n_a]), np.sort(perm[n_a:])
        full, full_s = fitted(base.extractor_, tr, seed)
        part, part_s = fitted(base.extractor_, subset(tr, a), seed)
        upd, upd_s = updated(part, subset(tr, b))
        rec = upd.updates_[-1]
        r_full, r_upd = (
            radius(tr.features, full.memory_bank_),
            radius(tr.features, upd.memory_bank_),
        )
        au_full = metrics.auroc(y, scores_of(full, te))
        au_upd = metrics.auroc(y, scores_of(upd, te))
        au_a = metrics.auroc(y, scores_of(part, te))
        row = append_row(
            OUT,
            {
                "kind": "equivalence",
                "set": name,
                "seed": seed,
                "train_a": len(a),
                "train_b": len(b),
                "patches_a": int(part.n_train_patches_),
                "patches_b": rec["patches"],
                "bank_full": int(full.memory_bank_.shape[0]),
                "bank_a": int(part.memory_bank_.shape[0]),
                "bank_update": rec["bank_size"],
                "rows_added": rec["rows_added"],
                "rows_dropped": rec["rows_dropped"],
                "radius_full": round(r_full, 4),
                "radius_update": round(r_upd, 4),
                "radius_ratio": round(r_upd / r_full, 4),
                "auroc_full": round(au_full, 4),
                "auroc_update": round(au_upd, 4),
                "auroc_a_only": round(au_a, 4),
                "coreset_full_s": round(full_s, 2),
                "coreset_a_s": round(part_s, 2),
                "update_bank_s": round(upd_s, 2),
                "feature_ms_per_image": round(1000 * train_feature_s / len(train), 1),
                "test": len(test),
                "params": PARAMS,
                "machine": machine(),
            },
        )
        print(json.dumps(row), flush=True)
    false_alarms(name, base, train, test, tr, te)


def false_alarms(name, base, train, test, tr, te) -> None:
    det, _ = fitted(base.extractor_, tr, 0)
    cal, held = split_each_label(test, 0.5, seed=0)
    index = {str(p): i for i, p in enumerate(test.images)}
    ci = np.array([index[str(p)] for p in cal.images])
    hi = np.array([index[str(p)] for p in held.images])
    s = scores_of(det, te)
    t = float(metrics.anomaly_threshold(test.labels[ci], s[ci], method="max_f1"))

    def rates(scores: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
        yy = test.labels[idx]
        flag = scores[idx] >= t
        return float(flag[yy == 0].mean()), float(flag[yy == 1].mean())

    fpr0, rec0 = rates(s, hi)
    for variant, pool in (("calibration false alarms", ci), ("held-out false alarms", hi)):
        fa = pool[(test.labels[pool] == 0) & (s[pool] >= t)]
        row = {"kind": "false_alarms", "set": name, "variant": variant, "threshold": t}
        row.update(added=int(len(fa)), held_fpr_before=fpr0, held_recall_before=rec0)
        if len(fa):
            d = copy.deepcopy(det)
            d.set_threshold(t)
            t0 = time.perf_counter()
            d.partial_fit([str(test.images[i]) for i in fa], progress=False)
            row["update_s"] = round(time.perf_counter() - t0, 2)
            s2 = scores_of(d, te)
            row["added_still_flagged"] = int((s2[fa] >= t).sum())
            fpr1, rec1 = rates(s2, np.setdiff1d(hi, fa))
            row.update(held_fpr_after=fpr1, held_recall_after=rec1)
            row["rows_added"] = d.updates_[-1]["rows_added"]
        print(json.dumps(append_row(OUT, row)), flush=True)


def scaling(name: str, base_images: int, ks: list[int]) -> None:
    train, _ = subsets(name, None, None)
    paths = [str(p) for p in train.images]
    det = PatchCore(progress=False).fit(paths[:base_images])
    for k in ks:
        d = copy.deepcopy(det)
        t0 = time.perf_counter()
        d.partial_fit(paths[base_images : base_images + k], progress=False)
        wall = time.perf_counter() - t0
        rec = d.updates_[-1]
        row = {"kind": "scaling", "set": name, "base_images": base_images, "base_bank":
               int(det.memory_bank_.shape[0]), "new_images": k, "patches": rec["patches"],
               "rows_added": rec["rows_added"], "rows_dropped": rec["rows_dropped"],
               "seconds": round(wall, 2), "feature_s": rec["feature_seconds"],
               "bank_s": round(wall - rec["feature_seconds"], 2),
               "ms_per_new_image": round(1000 * wall / k, 1)}  # fmt: skip
        print(json.dumps(append_row(OUT, row)), flush=True)


def cap(row: dict) -> str:
    c = row.get("params", {}).get("max_bank_size")
    return f" (cap {c:,})" if c else ""


def render() -> str:
    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    eq = [r for r in rows if r["kind"] == "equivalence"]
    out = [
        "### fit(A) + partial_fit(B) against fit(A+B) (A = 70 %, B = 30 % of the training "
        "normals, seeded; defaults, native size; radius over all A+B training patches, image "
        "AUROC on every test image)",
        "",
        "| set | seed | images A / B (test) | patches A / B | bank A+B / A / update (added, "
        "dropped) | radius A+B / update (ratio) | AUROC A+B / update / A only | bank step s: "
        "fit A+B / fit A / update | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in eq:
        out.append(
            f"| {r['set']}{cap(r)} | {r['seed']} | {r['train_a']} / {r['train_b']} "
            f"({r['test']}) | {r['patches_a']:,} / {r['patches_b']:,} | "
            f"{r['bank_full']:,} / {r['bank_a']:,} / {r['bank_update']:,} (+{r['rows_added']:,}"
            f", -{r['rows_dropped']:,}) | {r['radius_full']:.3f} / {r['radius_update']:.3f} "
            f"({r['radius_ratio']:.3f}) | {r['auroc_full']:.4f} / "
            f"{r['auroc_update']:.4f} / {r['auroc_a_only']:.4f} | {r['coreset_full_s']:.1f} / "
            f"{r['coreset_a_s']:.1f} / {r['update_bank_s']:.1f} | {r['load']} |"
        )
    sc = [r for r in rows if r["kind"] == "scaling"]
    if sc:
        out += [
            "",
            "### partial_fit time against the number of new images (real calls: decoding, "
            "features, bank step)",
            "",
            "| set | base images (bank) | new images | new patches | rows added | seconds "
            "(features + bank) | ms per new image | load |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in sc:
            out.append(
                f"| {r['set']} | {r['base_images']} ({r['base_bank']:,}) | {r['new_images']} | "
                f"{r['patches']:,} | {r['rows_added']:,} | {r['seconds']:.1f} "
                f"({r['feature_s']:.1f} + {r['bank_s']:.1f}) | {r['ms_per_new_image']:.0f} | "
                f"{r['load']} |"
            )
    fa = [r for r in rows if r["kind"] == "false_alarms"]
    if fa:
        out += [
            "",
            "### Marked false alarms (model on all training normals, max-F1 threshold on a "
            "seeded half of the test images; rates on the other half, added images excluded)",
            "",
            "| set | added | images added | still flagged | held-out FPR before / after | "
            "held-out recall before / after | update s | load |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in fa:
            after = (
                f"{r['held_fpr_before']:.3f} / {r['held_fpr_after']:.3f} | "
                f"{r['held_recall_before']:.3f} / {r['held_recall_after']:.3f}"
                if r["added"]
                else f"{r['held_fpr_before']:.3f} / - | {r['held_recall_before']:.3f} / -"
            )
            out.append(
                f"| {r['set']} | {r['variant']} | {r['added']} | "
                f"{r.get('added_still_flagged', '-')} | {after} | {r.get('update_s', '-')} | "
                f"{r['load']} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="+", default=["casting", "magnetic_tile", "deeppcb"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--scaling", nargs="*", default=["casting"], help="sets for the time rows")
    ap.add_argument("--train", type=int, help="seeded subset of the training images (smoke)")
    ap.add_argument("--test", type=int, help="seeded stratified subset of the test images")
    ap.add_argument("--out", help="JSON-lines file (default benchmarks/out/update.jsonl)")
    ap.add_argument("--cap", type=int, help="max_bank_size (default: the detector's 16384)")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    global OUT
    if args.out:
        OUT = ROOT / args.out if not args.out.startswith("/") else type(OUT)(args.out)
    if args.render:
        print(render())
        return
    assert set(args.sets) <= set(SETS)
    if args.cap:
        PARAMS["max_bank_size"] = args.cap
    for name in args.scaling:
        scaling(name, 150, [20, 40, 80, 160])
    for name in args.sets:
        equivalence(name, args.seeds, args.train, args.test)


if __name__ == "__main__":
    main()
