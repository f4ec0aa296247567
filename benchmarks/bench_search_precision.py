"""How far the bfloat16 search is from float32 on real features (issue #9).

Casting's cached default features (see bench_coreset_scale.py), a seeded random 1 % bank of the
training patches, the first ``--images`` test images. Prints, as JSON: whether every image's
maximum and its patch equal the float32 search's, the relative error of the per-patch values
(median, p99, max), whether the rigorous bound held on every patch, the share of each image's
patches re-checked in float32 (median), and ms per image of both searches.

    python benchmarks/bench_search_precision.py [--set casting] [--images 20]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_coreset_scale import cached_features

from patchcore.core import sampling
from patchcore.core.search import NearestNeighborIndex, patch_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", default="casting")
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    f = cached_features(args.set)
    x, counts = f["train"], f["test_counts"].tolist()[: args.images]
    if len(set(counts)) != 1:
        raise SystemExit(f"{args.set}: test images of different sizes; use a fixed-size set")
    bank = x[sampling.random_subsample(x.shape[0], x.shape[0] // 100, seed=0)].float()
    patches = f["test"][: sum(counts)].float().view(len(counts), counts[0], -1)
    out = {"set": args.set, "images": len(counts), "bank": int(bank.shape[0])}
    results = {}
    for precision in ("float32", "bfloat16"):
        index = NearestNeighborIndex(bank, precision=precision)
        patch_scores(index, patches)  # warm-up
        t0 = time.perf_counter()
        results[precision] = patch_scores(index, patches)
        out[f"ms_per_image_{precision}"] = round((time.perf_counter() - t0) / len(counts) * 1e3, 1)
    (ref, ref_max, ref_arg), (got, got_max, got_arg) = results["float32"], results["bfloat16"]
    rel = ((got - ref).abs() / ref.clamp(min=1e-12)).flatten()
    index = NearestNeighborIndex(bank, precision="bfloat16")
    d2, err = index.min_sq_bounded(patches.view(-1, patches.shape[-1]))
    lower = (d2 - err).view(len(counts), -1).amax(1, keepdim=True)
    checked = ((d2 + err).view(len(counts), -1) >= lower).float().mean(1)
    out.update(
        max_equal=bool(torch.allclose(got_max, ref_max, rtol=1e-6, atol=1e-6)),
        arg_equal=bool(torch.equal(got_arg, ref_arg)),
        rel_err_median=round(float(rel.median()), 4),
        rel_err_p99=round(float(rel.quantile(0.99)), 4),
        rel_err_max=round(float(rel.max()), 4),
        bound_held=bool(((d2 - ref.flatten() ** 2).abs() <= err).all()),
        rechecked_share_median=round(float(checked.median()), 3),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
