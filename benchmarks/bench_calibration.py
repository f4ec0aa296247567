"""Normal-only (split conformal) calibration against max-F1 calibration, on every shared set.

Design (issue #15): per set, fit once at the defaults on a fixed seeded half of the normal
training images; score the other half (the *held-out training normals*, H) and every test image
once, and cache the scores (``benchmarks/out/calibration/<set>.npz``). Then draw ``--splits``
seeded splits over those scores only:

* conformal: a random half of H calibrates (``conformal_threshold(scores, alpha)``), the other
  half of H measures the realised false-alarm rate (exchangeable with the calibration half by
  construction: both are a random split of one folder), and so does ``test/good`` (the set's own
  normal test images, split off by the data's authors, perhaps not exchangeable); recall on all
  test anomalies (no anomaly is used to calibrate).
* max-F1 (what ``patchcore calibrate`` does with labels): a per-label half of the test images
  calibrates (``anomaly_threshold(..., "max_f1")``), the other half measures FPR and recall;
  its FPR on the H evaluation half too.

The guarantee is marginal: the *mean* realised rate over splits should lie in
``[alpha - 1/(n+1), alpha]``; single splits scatter around it.

    python benchmarks/bench_calibration.py [--sets casting magnetic_tile deeppcb elpv]
        [--splits 200] [--alphas 0.01 0.05 0.1] [--rescore] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import DATA, ROOT, machine, write_results_section

from patchcore import PatchCore
from patchcore.core import datasets
from patchcore.core.conformal import conformal_threshold
from patchcore.core.metrics import anomaly_threshold

OUT = ROOT / "benchmarks" / "out" / "calibration"
SETS = ("casting", "magnetic_tile", "deeppcb", "elpv")


def load(name: str) -> tuple[datasets.ImageDataset, datasets.ImageDataset]:
    """(normal training images, labelled test images); ELPV mono: its normal cells, and a
    test set of its defective cells only (it has no normal test split)."""
    if name == "elpv":
        ds = datasets.load_elpv(cell_type="mono")
        return ds.subset(ds.labels == 0), ds.subset(ds.labels == 1)
    return datasets.load_folder(DATA / name, "train"), datasets.load_folder(DATA / name, "test")


def score_set(name: str, seed: int) -> dict[str, np.ndarray]:
    """Fit on a seeded half of the training normals; scores of the rest and of the test set."""
    train_all, test = load(name)
    fit = datasets.sample_fraction(train_all, 0.5, seed=seed)
    chosen = set(fit.names)
    held = train_all.subset(np.array([n not in chosen for n in train_all.names], dtype=bool))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    det = PatchCore(seed=seed).fit(fit, progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    held_scores = det.score(held, progress=False).scores
    test_scores = det.score(test, progress=False).scores
    score_s = time.perf_counter() - t0
    out = {
        "held": held_scores,
        "test": test_scores,
        "test_labels": test.labels,
        "fit_images": np.array(len(fit)),
        "fit_seconds": np.array(fit_s),
        "score_seconds": np.array(score_s),
        "load": np.array([load0, os.getloadavg()[0]]),
    }
    for k in ("held", "test"):
        if not np.isfinite(out[k]).all():
            raise SystemExit(f"{name}: non-finite {k} scores; no result")
    return out


def cached(name: str, seed: int, rescore: bool) -> dict[str, np.ndarray]:
    path = OUT / f"{name}.npz"
    if path.exists() and not rescore:
        return dict(np.load(path))
    OUT.mkdir(parents=True, exist_ok=True)
    out = score_set(name, seed)
    np.savez(path, **out)
    return out


def splits(s: dict[str, np.ndarray], alphas: list[float], n_splits: int) -> dict:
    """Realised rates over ``n_splits`` seeded splits (see the module docstring)."""
    held, test, y = s["held"], s["test"], s["test_labels"].astype(int)
    test_normal, anomalies = test[y == 0], test[y == 1]
    n_cal = len(held) // 2
    res: dict = {"n_cal": n_cal, "n_eval": len(held) - n_cal, "test_normal": int(len(test_normal))}
    res["test_anomalous"] = int(len(anomalies))
    for a in alphas:
        fpr_h, fpr_t, rec = [], [], []
        for i in range(n_splits):
            perm = np.random.default_rng(i).permutation(len(held))
            c = conformal_threshold(held[perm[:n_cal]], a)
            fpr_h.append(float((held[perm[n_cal:]] >= c.threshold).mean()))
            if len(test_normal):
                fpr_t.append(float((test_normal >= c.threshold).mean()))
            rec.append(float((anomalies >= c.threshold).mean()))
        res[f"conformal_{a:g}"] = {
            "fpr_bounds": list(c.fpr_bounds),
            "fpr_held": summary(fpr_h, a),
            "fpr_test_good": summary(fpr_t, a) if fpr_t else None,
            "recall": summary(rec),
            "fpr_held_values": fpr_h,
        }
    if len(test_normal):
        fpr_t, fpr_h, rec = [], [], []
        for i in range(n_splits):
            rng = np.random.default_rng(i)
            cal = np.zeros(len(test), dtype=bool)
            for lab in (0, 1):
                idx = rng.permutation(np.flatnonzero(y == lab))
                cal[idx[: len(idx) // 2]] = True
            t = anomaly_threshold(y[cal], test[cal], "max_f1")
            ev = ~cal
            fpr_t.append(float((test[ev & (y == 0)] >= t).mean()))
            rec.append(float((test[ev & (y == 1)] >= t).mean()))
            fpr_h.append(float((held >= t).mean()))
        res["max_f1"] = {
            "fpr_test_good": summary(fpr_t),
            "fpr_held": summary(fpr_h),
            "recall": summary(rec),
        }
    return res


def summary(v: list[float], alpha: float | None = None) -> dict:
    x = np.asarray(v)
    out = {
        "mean": float(x.mean()),
        "se": float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0,
        "p10": float(np.quantile(x, 0.1)),
        "p90": float(np.quantile(x, 0.9)),
        "max": float(x.max()),
    }
    if alpha is not None:
        out["share_above_alpha"] = float((x > alpha).mean())
    return out


def table(results: dict, alphas: list[float], n_splits: int) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    rows = [
        "| set | fit / held-out normals (cal + eval) | test good / anomalous | calibration | "
        "FPR on held-out normals: mean ± s.e. [p10, p90] | splits above alpha | "
        "FPR on test/good: mean [p10, p90] | recall: mean [p10, p90] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        head = (
            f"| {name} | {r['fit_images']} / {r['n_cal']} + {r['n_eval']} | "
            f"{r['test_normal']} / {r['test_anomalous']} "
        )
        for a in alphas:
            c = r[f"conformal_{a:g}"]
            lo, hi = c["fpr_bounds"]
            h, t, rc = c["fpr_held"], c["fpr_test_good"], c["recall"]
            tt = f"{pct(t['mean'])} [{pct(t['p10'])}, {pct(t['p90'])}]" if t else "-"
            rows.append(
                f"{head}| conformal alpha {pct(a)} % (expected {100 * lo:.2f}-{100 * hi:.2f}) | "
                f"{pct(h['mean'])} ± {pct(h['se'])} [{pct(h['p10'])}, {pct(h['p90'])}] | "
                f"{pct(h['share_above_alpha'])} % | {tt} | "
                f"{pct(rc['mean'])} [{pct(rc['p10'])}, {pct(rc['p90'])}] |"
            )
        if "max_f1" in r:
            m = r["max_f1"]
            h, t, rc = m["fpr_held"], m["fpr_test_good"], m["recall"]
            rows.append(
                f"{head}| max-F1 on half the labelled test images | "
                f"{pct(h['mean'])} [{pct(h['p10'])}, {pct(h['p90'])}] | - | "
                f"{pct(t['mean'])} [{pct(t['p10'])}, {pct(t['p90'])}] (other half) | "
                f"{pct(rc['mean'])} [{pct(rc['p10'])}, {pct(rc['p90'])}] (other half) |"
            )
    return "\n".join(rows)


def plot(results: dict, alphas: list[float]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.5 * len(alphas), 3.4), squeeze=False)
    for ax, a in zip(axes[0], alphas, strict=True):
        for name, r in results.items():
            v = 100 * np.asarray(r[f"conformal_{a:g}"]["fpr_held_values"])
            ax.hist(v, bins=20, histtype="step", label=name)
        ax.axvline(100 * a, color="k", ls="--", label="alpha")
        ax.set_title(f"alpha = {100 * a:g} %")
        ax.set_xlabel("realised FPR on held-out normals (%)")
    axes[0][0].set_ylabel("splits")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = OUT / "realised_fpr.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.01, 0.05, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rescore", action="store_true", help="fit and score again (no cache)")
    ap.add_argument("--write", action="store_true", help="write the RESULTS.md section")
    args = ap.parse_args()
    results = {}
    for name in args.sets:
        s = cached(name, args.seed, args.rescore)
        r = splits(s, args.alphas, args.splits)
        r.update(
            fit_images=int(s["fit_images"]),
            fit_seconds=round(float(s["fit_seconds"]), 1),
            score_seconds=round(float(s["score_seconds"]), 1),
            score_images=int(len(s["held"]) + len(s["test"])),
            load=[round(float(v), 2) for v in s["load"]],
        )
        results[name] = r
        shown = {
            k: {kk: vv for kk, vv in v.items() if kk != "fpr_held_values"}
            if isinstance(v, dict)
            else v
            for k, v in r.items()
        }
        print(json.dumps({name: shown}))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    png = plot(results, args.alphas)
    body = table(results, args.alphas, args.splits)
    print(body)
    if png:
        print(f"plot: {png}")
    if args.write:
        timings = "; ".join(
            f"{n}: fit {r['fit_seconds']} s on {r['fit_images']} images, scoring "
            f"{r['score_images']} images {r['score_seconds']} s (load {r['load'][0]} -> "
            f"{r['load'][1]})"
            for n, r in results.items()
        )
        write_results_section(
            "calibration-normal-only",
            f"## Normal-only calibration (split conformal) vs max-F1 (issue #15)\n\n"
            f"`python benchmarks/bench_calibration.py --write`; {machine()}. {timings}.\n\n"
            f"{args.splits} seeded splits per set over one fit and one scoring pass "
            f"(see the script's docstring for the design). Rates in %.\n\n{body}\n",
        )


if __name__ == "__main__":
    main()
