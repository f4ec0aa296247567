"""Accuracy search (issue #12): embeddings x coreset seeds x image scores x ensembles, from caches.

Every training image and every test image of each real set (ELPV mono cells as the fourth set:
a seeded half of the normal cells to fit on, the rest and every defective cell to test on; the
seed moves that draw and the coreset start). Each candidate embedding's patch features are
extracted once per set with the detector's own route (``PatchCore._batches`` / ``_embed``) and
cached in float16 (``benchmarks/out/search/features/``); then for every seed the detector's
coreset (``chunked_greedy_coreset``, ratio 0.01, at most 16,384 rows) is drawn and every test
patch searched (``search.patch_scores``, bfloat16 with the exact float32 re-check of each
image's maximum, as the detector). Image scores, all from the same distances:

- ``max``: the largest patch distance;
- ``eq7``: ``max`` with the paper's eq. 7 reweighting, k = 9 (the detector's score);
- ``top<k>``: the mean of the k largest patch distances.

Rows go to ``benchmarks/out/search/rows.jsonl`` and each run's image scores to
``benchmarks/out/search/scores/``; ``--table`` writes the RESULTS.md section with per-member
ensembles (min-max normalised scores averaged over members, the paper's protocol). Usage:

    python benchmarks/search_accuracy.py --cands lite0_s35 lite1_s35 --sets casting elpv_mono \\
        --seeds 0 1 2
    python benchmarks/search_accuracy.py --table
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch
from common import ROOT, append_row, machine, subsets, write_results_section

from patchcore import PatchCore
from patchcore.core import augment, sampling
from patchcore.core.backbones import FeatureExtractor
from patchcore.core.datasets import ImageDataset, elpv_benchmark_split, load_elpv, split_each_label
from patchcore.core.embedding import flatten_patches
from patchcore.core.metrics import auroc
from patchcore.core.presets import PRESETS, preset_params
from patchcore.core.search import NearestNeighborIndex, patch_scores, resolve_precision

OUT = ROOT / "benchmarks" / "out" / "search"
ROWS = OUT / "rows.jsonl"
SETS = ("casting", "magnetic_tile", "deeppcb", "elpv_mono")
S235 = ("stage2", "stage3", "stage5")

LITE0 = "efficientnet-lite0"  # named: the default backbone is efficientnet-lite2
CANDIDATES: dict[str, dict] = {
    "lite0_s35": {"backbone": LITE0},  # the defaults until 2026-12-07 (`balanced`)
    "lite0_s235": {"backbone": LITE0, "layers": S235},
    "lite1_s35": {"backbone": "efficientnet-lite1"},
    "lite2_s35": {"backbone": "efficientnet-lite2"},
    "lite0_s35_k5": {"backbone": LITE0, "kernel_size": 5},
    "lite0_s235_x0.5": {"backbone": LITE0, "layers": S235, "scale": 0.5},
    "lite1_s235_x0.5": {"backbone": "efficientnet-lite1", "layers": S235, "scale": 0.5},
    "lite0_s35_x1.5": {"backbone": LITE0, "scale": 1.5},
    "lite0_s35_x0.5": {"backbone": LITE0, "scale": 0.5},
    "lite0_s35_r256": {"backbone": LITE0, "image_size": 256},  # the peers' fixed square input
    "lite0_s34": {"backbone": LITE0, "layers": ("stage3", "stage4")},
    "lite0_s345": {"backbone": LITE0, "layers": ("stage3", "stage4", "stage5")},
    "lite2_s35_x1.5": {"backbone": "efficientnet-lite2", "scale": 1.5},
    "lite2_s235": {"backbone": "efficientnet-lite2", "layers": S235},
    "lite2_s35_x0.5": {"backbone": "efficientnet-lite2", "scale": 0.5},
    "lite0_s35_b8k": {
        "backbone": LITE0,
        "max_bank_size": 8192,
    },  # the defaults with half the bank cap (speed)
}
"""Candidate embeddings: PatchCore keyword arguments (everything else at its default)."""

FEATURES_OF = {"lite0_s35_b8k": "lite0_s35"}
"""Candidates that differ only after the features: they read another candidate's cache."""

NORMS = ("zscore", "layers")
"""Feature normalisations tried on a candidate's cached features (``--cands CAND+NORM``), fitted
on the training patches and applied to bank and test patches alike: ``zscore`` standardises
every channel (a diagonal Mahalanobis distance); ``layers`` scales each tapped layer's channels
so that every layer has the same mean squared deviation (the layers weigh equally)."""


AUGMENTS = tuple(augment.AUGMENTS)
"""Bank augmentation (``--cands CAND@AUG``, ``PatchCore(augment=AUG)``): the training images
are also embedded in every other view of ``patchcore.core.augment`` (``flips``: left-right and
up-down mirror, 3x the training patches; ``rot90``: quarter, half and three-quarter turns, 4x),
cached apart, and join the coreset's input; test images are scored as they are."""


def parse(cand: str) -> tuple[str, str, str]:
    """(embedding candidate, augmentation or "", normalisation or "") of ``EMB[@AUG][+NORM]``."""
    head, _, norm = cand.partition("+")
    base, _, aug = head.partition("@")
    return base, aug, norm


def base_params(cand: str) -> dict:
    """PatchCore keyword arguments of a candidate, with its augmentation and normalisation."""
    base, aug, norm = parse(cand)
    extra = {"augment": aug} if aug else {}
    return dict(CANDIDATES[base], **extra, **({"feature_norm": norm} if norm else {}))


def normalise(x: torch.Tensor, test: torch.Tensor, cand: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the candidate's normalisation, fitted on the training patches ``x`` (N, D)."""
    base, _, norm = parse(cand)
    if not norm:
        return x, test
    s1 = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for start in range(0, x.shape[0], 262144):
        chunk = x[start : start + 262144].double()
        s1 += chunk.sum(0)
        s2 += (chunk**2).sum(0)
    mean = s1 / x.shape[0]
    var = (s2 / x.shape[0] - mean**2).clamp_min(1e-12)
    if norm == "zscore":
        scale = var.rsqrt()
    else:  # layers: one factor per tapped layer's block of channels
        det = PatchCore(**CANDIDATES[base])
        widths = list(FeatureExtractor(det.backbone, det.layers, None).channels().values())
        scale = torch.cat(
            [
                torch.full((w,), float(v.sum().rsqrt()))
                for w, v in zip(widths, var.split(widths), strict=True)
            ]
        )
        scale = scale / scale.mean()
    scale, mean = scale.float(), mean.float()

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t)
        for start in range(0, t.shape[0], 262144):
            out[start : start + 262144] = (t[start : start + 262144].float() - mean) * scale
        return out

    return apply(x), apply(test)


VARIANTS = ("eq7", "max", "top3", "top10")
TOPK = {"top3": 3, "top10": 10}
PRESET_ROWS = {
    "fast": ("lite0_s35_x0.5", "top10"),
    "balanced": ("lite0_s35", "top10"),
    "accurate": ("lite2_s35", "top10"),
}
"""Which search runs measure each preset: (candidate, image score)."""


def check_presets() -> None:
    """Every preset in patchcore.core.presets is measured here by exactly its parameters."""
    if set(PRESET_ROWS) != set(PRESETS):
        raise SystemExit(f"presets {sorted(PRESETS)} but rows for {sorted(PRESET_ROWS)}")
    for name, (cand, variant) in PRESET_ROWS.items():
        want = dict(CANDIDATES[cand], **({"top_k": TOPK[variant]} if variant in TOPK else {}))
        if preset_params(name) != want:
            raise SystemExit(
                f"preset {name}: {preset_params(name)} is not what {cand}/{variant} ran"
            )


RATIO, MAX_BANK, NEIGHBOURS = 0.01, 16384, 9


def set_images(name: str) -> tuple[ImageDataset, np.ndarray]:
    """All images whose features are cached for ``name`` and their labels."""
    if name == "elpv_mono":
        ds = load_elpv(cell_type="mono")
        return ds, np.asarray(ds.labels)
    train, test = subsets(name, None, None)
    both = ImageDataset(list(train.samples) + list(test.samples), source=name)
    return both, np.asarray([0] * len(train) + list(test.labels))


def split(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into :func:`set_images`) of the training and test images for ``seed``."""
    if name == "elpv_mono":
        ds = load_elpv(cell_type="mono")
        pos = {s.name: i for i, s in enumerate(ds.samples)}
        train, test = elpv_benchmark_split(cell_type="mono", seed=seed)
        return (
            np.array([pos[s.name] for s in train.samples]),
            np.array([pos[s.name] for s in test.samples]),
        )
    train, test = subsets(name, None, None)
    n = len(train)
    return np.arange(n), np.arange(n, n + len(test))


def features(name: str, cand: str) -> dict:
    """Cached float16 patch features of every image of ``name`` for candidate ``cand``."""
    cand = FEATURES_OF.get(cand, cand)
    path = OUT / "features" / f"{name}__{cand}.pt"
    if path.exists():
        return torch.load(path, mmap=True)  # lazy: callers read only the images they slice
    ds, labels = set_images(name)
    det = PatchCore(progress=False, **CANDIDATES[cand]).fit(ds[:1])
    feats, counts = [], []
    t0 = time.perf_counter()
    for b in det._batches(list(ds.images), "raise", False, "features"):
        emb = det._embed(b.pixels)
        feats.append(flatten_patches(emb).to(torch.float16))
        counts += [emb.shape[2] * emb.shape[3]] * emb.shape[0]
    seconds = time.perf_counter() - t0
    out = {
        "feats": torch.cat(feats),
        "counts": torch.tensor(counts),
        "labels": torch.tensor(labels),
        "embed_ms": seconds / len(ds) * 1000,
        "embed_load": os.getloadavg()[0],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def aug_images(name: str) -> np.ndarray:
    """Indices (into :func:`set_images`) of the images that may be trained on: whose
    augmented features are cached (the folder sets' training images, ELPV's normal cells)."""
    if name == "elpv_mono":
        return np.flatnonzero(set_images(name)[1] == 0)
    return np.arange(len(subsets(name, None, None)[0]))


def aug_features(name: str, base: str, aug: str) -> dict:
    """Cached float16 patch features of :func:`aug_images` under every transform of ``aug``:
    ``feats[t]`` image by image, ``counts[t]`` patches per image."""
    path = OUT / "features" / f"{name}__{base}@{aug}.pt"
    if path.exists():
        return torch.load(path, mmap=True)
    ds, _ = set_images(name)
    idx = aug_images(name)
    det = PatchCore(progress=False, **CANDIDATES[base]).fit(ds[:1])
    views = augment.views(aug)[1:]  # the identity's features are the set's own cache
    feats: list[list[torch.Tensor]] = [[] for _ in views]
    counts: list[list[int]] = [[] for _ in views]
    t0 = time.perf_counter()
    for b in det._batches([ds.images[i] for i in idx], "raise", False, "features"):
        for t, view in enumerate(views):
            emb = det._embed(augment.apply(b.pixels, view))
            feats[t].append(flatten_patches(emb).to(torch.float16))
            counts[t] += [emb.shape[2] * emb.shape[3]] * emb.shape[0]
    seconds = time.perf_counter() - t0
    out = {
        "images": torch.as_tensor(idx),
        "feats": [torch.cat(f) for f in feats],
        "counts": [torch.tensor(c) for c in counts],
        "embed_ms": seconds / len(idx) * 1000,  # all transforms of one image
        "embed_load": os.getloadavg()[0],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def augmented_rows(name: str, cand: str, tr: np.ndarray) -> tuple[list[torch.Tensor], float]:
    """The augmented training patches of images ``tr`` (one tensor per transform and image)
    and the extraction ms per training image they add; ``[]`` and 0 without augmentation."""
    base, aug, _ = parse(cand)
    if not aug:
        return [], 0.0
    a = aug_features(name, base, aug)
    pos = {int(i): j for j, i in enumerate(a["images"].tolist())}
    out = []
    for feats, counts in zip(a["feats"], a["counts"], strict=True):
        offsets = np.concatenate([[0], np.cumsum(counts.numpy())])
        out += [feats[offsets[pos[i]] : offsets[pos[i] + 1]] for i in tr.tolist()]
    return out, float(a["embed_ms"])


def image_scores(
    index: NearestNeighborIndex, bank: torch.Tensor, rows: torch.Tensor, counts: list[int]
) -> dict[str, np.ndarray]:
    """Every image-score variant of each image (rows: its patches, consecutive)."""
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    lo = 0
    for c, group in itertools.groupby(counts):
        b = len(list(group))
        for start in range(0, b, max(1, 262144 // c)):
            m = min(b - start, max(1, 262144 // c))
            p = rows[lo + start * c : lo + (start + m) * c].float().view(m, c, -1)
            scores, top, arg = patch_scores(index, p)
            worst = p[torch.arange(m), arg]
            nearest = bank[index.search(worst, 1)[1][:, 0]]
            support = index.search(nearest, NEIGHBOURS)[1]
            d = torch.linalg.vector_norm(worst[:, None] - bank[support], dim=-1)
            out["max"] += top.tolist()
            out["eq7"] += ((1 - torch.softmax(d, 1)[:, 0]) * top).tolist()
            ranked = scores.float().sort(dim=1, descending=True).values
            for v, k in TOPK.items():
                out[v] += ranked[:, : min(k, c)].mean(1).tolist()
        lo += b * c
    return {v: np.asarray(s) for v, s in out.items()}


def run(name: str, cand: str, seed: int) -> dict:
    tr, te = split(name, seed)
    return append_row(ROWS, evaluate(name, cand, seed, tr, te))


def evaluate(
    name: str, cand: str, seed: int, tr: np.ndarray, te: np.ndarray, tag: str = ""
) -> dict:
    """Fit on images ``tr`` and score images ``te`` (indices into :func:`set_images`).

    The coreset and search are the detector's; the image scores go to
    ``scores/{name}__{cand}__s{seed}{tag}.npz`` and the row (accuracy of every image score,
    costs) is returned.
    """
    f = features(name, parse(cand)[0])
    counts = f["counts"].numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    extra, aug_ms = augmented_rows(name, cand, tr)
    x = torch.cat([f["feats"][offsets[i] : offsets[i + 1]] for i in tr] + extra)
    del extra
    train_patches = int(x.shape[0])
    test = torch.cat([f["feats"][offsets[i] : offsets[i + 1]] for i in te])
    x, test = normalise(x, test, cand)
    n = min(
        sampling.coreset_size(x.shape[0], RATIO), base_params(cand).get("max_bank_size", MAX_BANK)
    )
    t0 = time.perf_counter()
    idx = sampling.chunked_greedy_coreset(x, n, seed=seed).indices
    coreset_s = time.perf_counter() - t0
    bank = x[idx].float().contiguous()
    del x
    index = NearestNeighborIndex(bank, precision=resolve_precision("auto", bank.device))
    t0 = time.perf_counter()
    scores = image_scores(index, bank, test, counts[te].tolist())
    search_ms = (time.perf_counter() - t0) / len(te) * 1000
    labels = f["labels"].numpy()[te]
    path = OUT / "scores" / f"{name}__{cand}__s{seed}{tag}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, labels=labels, **scores)
    row = {
        "set": name,
        "cand": cand,
        "params": base_params(cand),
        "seed": seed,
        "train": len(tr),
        "test": len(te),
        "patches": train_patches,
        "dim": int(bank.shape[1]),
        "bank": int(bank.shape[0]),
        "bank_mb": round(bank.numel() * 4 / 2**20, 1),
        "embed_ms": round(float(f["embed_ms"]), 1),
        "feats_mb": round(train_patches * int(bank.shape[1]) * 2 / 2**20, 1),
        "fit_s": round((float(f["embed_ms"]) + aug_ms) * len(tr) / 1000 + coreset_s, 1),
        "coreset_s": round(coreset_s, 1),
        "search_ms": round(search_ms, 1),
        **{v: round(auroc(labels, s), 4) for v, s in scores.items()},
    }
    return row


# --------------------------------------------------------------------------- tables


def _rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.exists() else []


def _pm(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f}"


def _minmax(s: np.ndarray) -> np.ndarray:
    return (s - s.min()) / max(float(s.max() - s.min()), 1e-12)


def ensemble_auroc(name: str, members: tuple[str, ...], seed: int, variant: str) -> float | None:
    """Image AUROC of the mean of the members' min-max normalised scores (the paper's rule)."""
    paths = [OUT / "scores" / f"{name}__{m}__s{seed}.npz" for m in members]
    if not all(p.exists() for p in paths):
        return None
    data = [np.load(p) for p in paths]
    return auroc(data[0]["labels"], np.mean([_minmax(d[variant]) for d in data], axis=0))


def _detector_rows() -> list[dict]:
    """The defaults' rows from ``evaluate_sets.py`` (the detector end to end, same protocol)."""
    rows = []
    for path in sorted((ROOT / "benchmarks" / "out").glob("evaluate_defaults_*_s*.json")):
        r = json.loads(path.read_text())
        rows.append(
            {
                "set": r["set"],
                "cand": "lite0_s35",
                "seed": r["seed"],
                "eq7": r["image_auroc"],
                "fit_s": r["fit_s"],
                "ms": r["ms_per_image"],
                "load": r["load"],
            }
        )
    return rows


def _cost_value(rs: list[dict], key: str) -> tuple[float, str]:
    """Median of ``key`` and a mark: where the search has none (features from an older cache:
    deeppcb), the detector's own runs of the same set, marked †."""
    values = [r[key] for r in rs if not np.isnan(r[key])]
    if values:
        return float(np.median(values)), ""
    same = [r[key] for r in _detector_rows() if r["set"] == rs[0]["set"]]
    if same and rs[0]["cand"] == "lite0_s35":
        return float(np.median(same)), " †"
    return float("nan"), ""


def _cost(rs: list[dict], key: str) -> str:
    value, mark = _cost_value(rs, key)
    return f"{value:.0f}{mark}"


E2E = {  # row label: evaluate_sets.py tag (the detector end to end, seed 0)
    "fast": "e2e-lite0-x0.5-top10",
    "balanced (the defaults)": "e2e-lite0-top10",
    "efficientnet-lite1, top_k=10": "e2e-lite1-top10",
    "accurate": "e2e-lite2-top10",
    "the paper's score (top_k=1), earlier defaults": "quiet",
}


def _end_to_end() -> list[str]:
    """The presets through the detector (``evaluate_sets.py --tag ...``): fit and scoring
    costs on the user's path, and image AUROC of seed 0 as a check of the search's rows."""
    out = ROOT / "benchmarks" / "out"
    folder_sets = [s for s in SETS if s != "elpv_mono"]
    lines = [
        "### Presets end to end (`evaluate_sets.py --tag TAG --params ...`: `PatchCore` fitted "
        "on every training image, every test image scored with its native-size map; seed 0, "
        "one run each, nothing else running; per set: fit s / ms per image / image AUROC)",
        "",
        "| configuration | tag | " + " | ".join(folder_sets) + " | 1-min load at the ends |",
        "|---|---|" + "---:|" * len(folder_sets) + "---|",
    ]
    for label, tag in E2E.items():
        rows = {s: out / f"evaluate_{tag}_{s}_s0.json" for s in folder_sets}
        if not all(p.exists() for p in rows.values()):
            continue
        rs = {s: json.loads(p.read_text()) for s, p in rows.items()}
        cells = [
            f"{r['fit_s']:.0f} / {r['ms_per_image']:.0f} / {r['image_auroc']:.4f}"
            for r in rs.values()
        ]
        loads = ", ".join(r["load"].split(" / ")[0] for r in rs.values())
        lines.append(f"| {label} | {tag} | " + " | ".join(cells) + f" | {loads} |")
    return lines


def table(ensembles: list[tuple[str, ...]], screen: tuple[str, ...]) -> str:
    rows = _rows()
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        r["ms"] = r["embed_ms"] + r["search_ms"]
        by.setdefault((r["cand"], r["set"]), []).append(r)
    from_detector = set()  # the detector's own rows fill the seeds the search lacks
    for r in _detector_rows():
        have = by.setdefault((r["cand"], r["set"]), [])
        if r["seed"] not in {x["seed"] for x in have}:
            from_detector.add((r["cand"], r["set"]))
            have.append(r)
    cands = list(dict.fromkeys(r["cand"] for r in rows))  # in the order they were run
    loads = sorted({float(r["load"].split(" / ")[0]) for v in by.values() for r in v})
    head = (
        "| candidate | settings | "
        + " | ".join(SETS)
        + f" | mean, 4 sets | mean, {' + '.join(screen)} | fit s | ms/image | bank MiB | load |"
    )
    lines = [
        "## Accuracy search (`benchmarks/search_accuracy.py`, issue #12)",
        "",
        f"Machine: {machine()}; 1-min load average {loads[0]:.1f}-{loads[-1]:.1f} over the "
        "rows, the median per candidate in the last column: the first rows (lite0_s35, "
        "lite0_s235_x0.5) ran while other jobs shared the 2 cores (load 7-22), so their "
        "seconds are inflated several times (quiet defaults: 'Defaults on full data, quieter "
        "machine'); the later rows ran alone (load 2-3 is this job's own 2 threads). All "
        "training images and all test images of each set at the candidate's resolution; ELPV: "
        "mono cells, a seeded half of the 588 normal cells to fit on (294), the other 294 and "
        "all 313 defective cells to test on (the seed moves that draw and the coreset start; "
        "the folder sets have fixed splits and the seed moves the coreset start). Coreset ratio "
        "0.01 capped at 16,384 rows (the detector's), bfloat16 search with the exact re-check "
        "of each image's maximum (the top-3/top-10 means here average bfloat16 estimates below "
        "the maximum, the detector's are exact: see the notes). Accuracy: image AUROC, mean ± "
        "sample std over the seeds (count in brackets). Costs, medians over the same runs, one "
        "figure per set in column order: fit s = feature extraction of the training images + "
        "coreset; ms/image = extraction + search per test image (batched, no maps); bank = rows "
        "x dim x 4 bytes. † = seeds the search lacks taken from the detector end to end "
        "(`evaluate_sets.py`, 'Defaults on full data': the same code path, whose casting seeds "
        "0-2 the search reproduced exactly; fit s and ms/image there include maps).",
        "",
        "### Embeddings (image score: the paper's max + eq. 7)",
        "",
        head,
        "|---|---|" + "---:|" * (len(SETS) + 6),
    ]
    for c in cands:
        cells, means = [], {}
        for s in SETS:
            rs = by.get((c, s), [])
            if rs:
                mark = " †" if (c, s) in from_detector else ""
                cells.append(f"{_pm([r['eq7'] for r in rs])} ({len(rs)}){mark}")
                means[s] = np.mean([r["eq7"] for r in rs])
            else:
                cells.append("—")
        full = f"**{np.mean(list(means.values())):.4f}**" if len(means) == len(SETS) else "—"
        part = (
            f"{np.mean([means[s] for s in screen]):.4f}" if all(s in means for s in screen) else "—"
        )
        have = [s for s in SETS if (c, s) in by]
        fit = "; ".join(_cost(by[(c, s)], "fit_s") for s in have)
        ms = "; ".join(_cost(by[(c, s)], "ms") for s in have)
        bank = "; ".join(str(by[(c, s)][0].get("bank_mb", "—")) for s in have)
        p = ", ".join(f"{k}={v}" for k, v in base_params(c).items()) or "defaults"
        load = np.median([float(r["load"].split(" / ")[0]) for s in have for r in by[(c, s)]])
        lines.append(
            f"| {c} | {p} | " + " | ".join(cells) + f" | {full} | {part} | {fit} | {ms} | {bank} "
            f"| {load:.1f} |"
        )
    lines += [
        "",
        "### Image score (same runs: per-set mean over seeds; the folder sets' seeds move the "
        "coreset start only)",
        "",
        "| candidate | set | seeds | " + " | ".join(VARIANTS) + " |",
        "|---|---|---:|" + "---:|" * len(VARIANTS),
    ]
    for c in cands:
        for s in SETS:
            rs = [r for r in by.get((c, s), []) if "max" in r]
            if rs:
                cells = [_pm([r[v] for r in rs]) for v in VARIANTS]
                lines.append(f"| {c} | {s} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Presets (`patchcore.core.presets`; the rows above that measure them)",
        "",
        "| preset | settings | " + " | ".join(SETS) + " | mean, 4 sets | ms/image |",
        "|---|---|" + "---:|" * (len(SETS) + 2),
    ]
    check_presets()
    for name, (c, v) in PRESET_ROWS.items():
        cells, means = [], []
        for s in SETS:
            rs = [r for r in by.get((c, s), []) if v in r]
            cells.append(f"{_pm([r[v] for r in rs])} ({len(rs)})" if rs else "—")
            if rs:
                means.append(np.mean([r[v] for r in rs]))
        full = f"**{np.mean(means):.4f}**" if len(means) == len(SETS) else "—"
        ms = "; ".join(_cost(by[(c, s)], "ms") for s in SETS if (c, s) in by)
        p = ", ".join(f"{k}={x}" for k, x in preset_params(name).items()) or "defaults"
        lines.append(f"| {name} | {p} | " + " | ".join(cells) + f" | {full} | {ms} |")
    lines += ["", *_end_to_end()]
    lines += [
        "",
        "### Ensembles (members' scores min-max normalised over the test images, then "
        "averaged: the paper's protocol, which needs the test set's range; same seeds)",
        "",
        "| members | member score | " + " | ".join(SETS) + " | mean, 4 sets | ms/image (sum) |",
        "|---|---|" + "---:|" * (len(SETS) + 2),
    ]
    for members, variant in itertools.product(ensembles, ("eq7", "top10")):
        cells, have, means = [], [], []
        for s in SETS:
            seeds = sorted(
                set.intersection(*[{r["seed"] for r in by.get((m, s), [])} for m in members])
            )
            vals = [ensemble_auroc(s, members, k, variant) for k in seeds]
            vals = [v for v in vals if v is not None]
            cells.append(f"{_pm(vals)} ({len(vals)})" if vals else "—")
            if vals:
                have.append(s)
                means.append(np.mean(vals))
        if not have:
            continue
        full = f"**{np.mean(means):.4f}**" if len(means) == len(SETS) else "—"
        ms = "; ".join(
            f"{sum(_cost_value(by[(m, s)], 'ms')[0] for m in members):.0f}" for s in have
        )
        lines.append(
            f"| {' + '.join(members)} | {variant} | " + " | ".join(cells) + f" | {full} | {ms} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- leads (issue #23)

BASELINE = "lite2_s35"  # the defaults since 2026-12-07
LEAD_SCORE = "top10"  # the defaults' image score


def _scores(name: str, cand: str, seed: int) -> dict | None:
    path = OUT / "scores" / f"{name}__{cand}__s{seed}.npz"
    return dict(np.load(path)) if path.exists() else None


def member_scores(name: str, members: tuple[str, ...], seed: int, variant: str = LEAD_SCORE):
    """(labels, scores) of one candidate, or of an ensemble (min-max normalised members'
    scores averaged, the paper's rule); None while a member's run is missing."""
    data = [_scores(name, m, seed) for m in members]
    if any(d is None for d in data):
        return None
    if len(data) == 1:
        return data[0]["labels"], data[0][variant]
    return data[0]["labels"], np.mean([_minmax(d[variant]) for d in data], axis=0)


def lead_cost(by: dict, members: tuple[str, ...], name: str, key: str) -> float:
    """Median ``key`` of each member's runs on ``name``, summed over the members."""
    return float(sum(np.median([r[key] for r in by[(m, name)]]) for m in members))


def _features_mb(r: dict) -> float:
    """Training features in float16, MiB (older rows lack ``feats_mb``: from patches x dim)."""
    return r.get("feats_mb") or r["patches"] * r["dim"] * 2 / 2**20


def leads_table(leads: list[str]) -> str:
    """Each lead (a candidate, or members joined by ``&``) against the defaults, top-10 score."""
    rows = _rows()
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        r["ms"] = r["embed_ms"] + r["search_ms"]
        by.setdefault((r["cand"], r["set"]), []).append(r)
    loads = sorted(float(r["load"].split(" / ")[0]) for r in rows)
    dates = sorted(r["date"] for r in rows)
    lines = [
        "## Leads of issue #23 (`benchmarks/search_accuracy.py --leads`)",
        "",
        f"Machine: {machine()}; rows {dates[0]} to {dates[-1]} UTC, 1-min load {loads[0]:.1f}-"
        f"{loads[-1]:.1f} (2 cores shared with other sessions). All training images and every "
        "test image; ELPV mono: a seeded half of the normal cells to fit on. Image AUROC with "
        "the defaults' score (mean of the 10 largest patch distances), mean ± sample std over "
        "the seeds run (count: 1 = seed 0 only); Δ min = the lead's worst per-set difference "
        "from the defaults (lite2_s35; lite0_s35 until 2026-12-07), over the sets it has. "
        "Seconds, per set in column order "
        "(medians over the lead's runs): fit s = feature extraction of the training images "
        "(all views) + coreset, ms/image = extraction + search per test image (no maps), and "
        "the median 1-min load they ran under: rows ran at loads from 2 to 17, so seconds of "
        "different rows are not comparable; the ratios are in 'Paired cost of the leads'. "
        "Memory = training features in float16 (what fit holds) / bank, MiB, largest set. "
        "Ensembles (members joined by &) use the paper's rule: members' scores min-max "
        "normalised over the test images, then averaged (optimistic: it needs the test set's "
        "range), costs summed.",
        "",
        "| lead | "
        + " | ".join(SETS)
        + " | mean, 4 sets | Δ min | fit s | ms/image | load | features / bank MiB |",
        "|---|" + "---:|" * (len(SETS) + 6),
    ]
    base = {s: [] for s in SETS}
    for s in SETS:
        for seed in (0, 1, 2):
            got = member_scores(s, (BASELINE,), seed)
            if got is not None:
                base[s].append(auroc(*got))
    for lead in leads:
        members = tuple(lead.split("&"))
        cells, means, deltas, fits, mss, loads_, mem = [], {}, [], [], [], [], []
        for s in SETS:
            vals = [
                auroc(*got)
                for seed in (0, 1, 2)
                if (got := member_scores(s, members, seed)) is not None
            ]
            cells.append(f"{_pm(vals)} ({len(vals)})" if vals else "—")
            if not vals:
                continue
            means[s] = float(np.mean(vals))
            if base[s]:
                deltas.append(means[s] - float(np.mean(base[s])))
            if all((m, s) in by for m in members):
                fits.append(lead_cost(by, members, s, "fit_s"))
                mss.append(lead_cost(by, members, s, "ms"))
                loads_ += [float(r["load"].split(" / ")[0]) for m in members for r in by[(m, s)]]
                mem.append(
                    (
                        sum(_features_mb(by[(x, s)][0]) for x in members),
                        sum(by[(x, s)][0]["bank_mb"] for x in members),
                    )
                )
        full = f"**{np.mean(list(means.values())):.4f}**" if len(means) == len(SETS) else "—"
        dmin = f"{min(deltas):+.4f}" if deltas else "—"
        cost_f = "; ".join(f"{x:.0f}" for x in fits) or "—"
        cost_m = "; ".join(f"{x:.0f}" for x in mss) or "—"
        load = f"{np.median(loads_):.1f}" if loads_ else "—"
        memory = f"{max(m[0] for m in mem):.0f} / {max(m[1] for m in mem):.1f}" if mem else "—"
        label = " & ".join(members)
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {full} | {dmin} | {cost_f} | {cost_m} "
            f"| {load} | {memory} |"
        )
    return "\n".join(lines)


def auto_trials(
    cands: list[str], split_seeds: tuple[int, ...] = (0,), fraction: float = 0.5
) -> list[dict]:
    """The ``auto`` preset's rule on cached scores: per set, fit seed and split seed, the
    test images are split per label (``split_each_label``, as ``calibrate`` does) into a
    calibration part and an evaluation part; the candidate with the highest calibration image
    AUROC is chosen (ties: the earlier, cheaper one) and compared with the evaluation winner."""
    out = []
    for name in SETS:
        ds, _ = set_images(name)
        for seed in (0, 1, 2):
            got = {c: _scores(name, c, seed) for c in cands}
            if any(v is None for v in got.values()):
                continue
            te = split(name, seed)[1]
            test = ds.subset(te)
            for split_seed in split_seeds:
                calib_ds, _ = split_each_label(test, fraction, seed=split_seed)
                calib = np.isin(np.asarray(test.names), np.asarray(calib_ds.names))
                cal = {c: auroc(v["labels"][calib], v[LEAD_SCORE][calib]) for c, v in got.items()}
                ev = {c: auroc(v["labels"][~calib], v[LEAD_SCORE][~calib]) for c, v in got.items()}
                pick = max(cands, key=lambda c: (cal[c], -cands.index(c)))
                best = max(cands, key=lambda c: (ev[c], -cands.index(c)))
                out.append(
                    {
                        "set": name,
                        "seed": seed,
                        "split_seed": split_seed,
                        "calibration": cal,
                        "evaluation": ev,
                        "pick": pick,
                        "best": best,
                        "regret": ev[best] - ev[pick],
                    }
                )
    return out


def auto_table(cands: list[str], split_seeds: tuple[int, ...]) -> str:
    """One candidate set's trials (a ``###`` table under the section's heading)."""
    trials = auto_trials(cands, split_seeds)
    if not trials:
        return f"### {', '.join(cands)}\n\n(no trials: a candidate's scores are missing)"
    fits = sorted({t["seed"] for t in trials})
    lines = [
        f"### {', '.join(cands)}",
        "",
        "Candidates, in order (ties go to the earlier): "
        + ", ".join(f"`{c}`" for c in cands)
        + f". Each set with every candidate's scores, fit seed {', '.join(map(str, fits))} and "
        f"split seed {', '.join(map(str, split_seeds))}: the "
        "test images split per label in halves (`split_each_label`, as `calibrate`), the "
        "candidate with the highest calibration-half image AUROC (top-10 score) chosen, "
        "then judged on the evaluation half. Agreement = chosen the evaluation half's "
        "winner; regret = the winner's evaluation AUROC minus the chosen one's.",
        "",
        "| set | trials | agreement | chosen (times) | evaluation AUROC: chosen | best "
        "fixed candidate | " + " | ".join(cands) + " | mean regret |",
        "|---|---:|---:|---|---:|---:|" + "---:|" * len(cands) + "---:|",
    ]
    for name in (*SETS, "all"):
        ts = [t for t in trials if name in ("all", t["set"])]
        if not ts:
            continue
        picks = {c: sum(t["pick"] == c for t in ts) for c in cands}
        chosen = np.mean([t["evaluation"][t["pick"]] for t in ts])
        fixed = {c: np.mean([t["evaluation"][c] for t in ts]) for c in cands}
        lines.append(
            f"| {name} | {len(ts)} | {sum(t['pick'] == t['best'] for t in ts)} / {len(ts)} | "
            + ", ".join(f"{c} {n}" for c, n in picks.items() if n)
            + f" | {chosen:.4f} | {max(fixed.values()):.4f} | "
            + " | ".join(f"{fixed[c]:.4f}" for c in cands)
            + f" | {np.mean([t['regret'] for t in ts]):.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS)
    ap.add_argument(
        "--cands",
        nargs="*",
        default=["lite0_s35"],
        choices=list(CANDIDATES)
        + [f"{c}+{n}" for c in CANDIDATES for n in NORMS]
        + [f"{c}@{a}" for c in CANDIDATES for a in AUGMENTS],
    )
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--table", action="store_true", help="write RESULTS.md from the saved rows")
    ap.add_argument(
        "--ensemble", action="append", default=[], help="members joined by '+', for --table"
    )
    ap.add_argument(
        "--screen", nargs="*", default=["elpv_mono", "casting"], help="sets of the partial mean"
    )
    ap.add_argument("--leads", nargs="*", help="write the leads table of these (a&b: ensemble)")
    ap.add_argument(
        "--auto", nargs="*", action="append", help="the auto preset's table for these (repeat)"
    )
    ap.add_argument("--split-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    if args.leads:
        write_results_section("accuracy-leads", leads_table(args.leads))
        return
    if args.auto:
        tables = [auto_table(c, tuple(args.split_seeds)) for c in args.auto]
        head = "## The auto preset's choice on cached scores (`search_accuracy.py --auto ...`)"
        write_results_section("accuracy-auto", "\n\n".join([head, *tables]))
        return
    if args.table:
        ensembles = [tuple(e.split("+")) for e in args.ensemble]
        write_results_section("accuracy-search", table(ensembles, tuple(args.screen)))
        return
    torch.set_num_threads(2)
    done = {(r["set"], r["cand"], r["seed"]) for r in _rows()}
    for cand in args.cands:
        for name in args.sets:
            for seed in args.seeds:
                if (name, cand, seed) in done:
                    continue
                print(json.dumps(run(name, cand, seed)), flush=True)


if __name__ == "__main__":
    main()
