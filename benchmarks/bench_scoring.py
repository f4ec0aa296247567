"""Scoring speed on the CPU: extractor alone, search alone, ``PatchCore.classify`` end to end.

Fits a detector on 20 casting training images (coreset 0.1, default backbone) and times, at
batch 1 and batch 8, medians of several repeats (ms per image):

- ``extractor``: ``FeatureExtractor`` on a normalised (B, 3, S, S) batch,
- ``search``: ``NearestNeighborIndex.search(k=1)`` of the batch's patch embeddings,
- ``classify``: ``PatchCore.classify`` on decoded test images (in memory, so disk and JPEG
  decoding are not timed; ``--from-disk`` passes file paths instead).

With ``--bf16`` it also times the extractor with ``dtype=torch.bfloat16`` and reports how far its
features are from the float32 ones. Prints a markdown table.

    python benchmarks/bench_scoring.py [--threads 1] [--size 224] [--repeats 7] [--bf16]
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import torch
from common import median_seconds

from patchcore.core.backbones import FeatureExtractor
from patchcore.core.detector import PatchCore
from patchcore.core.embedding import flatten_patches
from patchcore.core.images import read_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "casting"


def _median_ms(fn, n_images: int, repeats: int, warmup: int = 2) -> float:  # noqa: ANN001
    return 1e3 * median_seconds(fn, repeats, warmup) / n_images


def _images(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    step = max(1, len(files) // n)
    return files[::step][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per median")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--from-disk", action="store_true", help="classify file paths (times decode)")
    ap.add_argument("--bf16", action="store_true", help="also time the bfloat16 extractor")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train = _images(args.data / "train" / "good", 20)
    test = _images(args.data / "test", 16)
    det = PatchCore(image_size=args.size, coreset_ratio=0.1, device="cpu", progress=False)
    det.fit([str(p) for p in train])
    det.set_threshold(1.0)
    fe = det.extractor_
    bank = det.memory_bank_
    decoded = [read_image(p) for p in test]
    s = args.size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(max(args.batches), 3, s, s, generator=gen)
    mean = torch.tensor(fe.mean).view(1, 3, 1, 1)
    std = torch.tensor(fe.std).view(1, 3, 1, 1)

    rows = []
    for b in args.batches:
        x = ((pixels[:b] - mean) / std).contiguous()
        with torch.inference_mode():
            emb = det._embed(pixels[:b])
            queries = flatten_patches(emb).float().contiguous()
        imgs = [str(p) for p in test[:b]] if args.from_disk else decoded[:b]
        det.set_params(batch_size=b)  # a scoring setting: no refit needed

        def run_extractor(x=x):
            with torch.inference_mode():
                fe(x)

        def run_search(q=queries):
            with torch.inference_mode():
                det._index.search(q, k=1)

        def run_classify(imgs=imgs):
            det.classify(imgs)

        rows.append(
            (
                b,
                _median_ms(run_extractor, b, args.repeats),
                _median_ms(run_search, b, 5 * args.repeats),  # short: more repeats
                _median_ms(run_classify, b, args.repeats),
            )
        )

    print(
        f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, {s}x{s} px, "
        f"bank {tuple(bank.shape)}, medians of {args.repeats}, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
    )
    print("| batch | extractor ms/img | search ms/img | classify ms/img |")
    print("|---:|---:|---:|---:|")
    for b, e, q, c in rows:
        print(f"| {b} | {e:.1f} | {q:.1f} | {c:.1f} |")

    if args.bf16:
        if "dtype" not in inspect.signature(FeatureExtractor).parameters:
            print("\n(this FeatureExtractor has no dtype option)")
            return
        fe16 = FeatureExtractor(det.backbone, det.layers_, dtype=torch.bfloat16)
        fe16.load_state_dict(fe.state_dict())
        print(
            "\n| batch | fp32 extractor ms/img | bf16 extractor ms/img | speedup | "
            "max rel. feature diff per layer |"
        )
        print("|---:|---:|---:|---:|---|")
        for b in args.batches:
            x = ((pixels[:b] - mean) / std).contiguous()
            with torch.inference_mode():
                ref = fe(x)
                got = fe16(x)
            diffs = ", ".join(
                f"{k} {float((got[k] - ref[k]).abs().max() / ref[k].abs().max()):.3f}" for k in ref
            )

            def run32(x=x):
                with torch.inference_mode():
                    fe(x)

            def run16(x=x):
                with torch.inference_mode():
                    fe16(x)

            t32 = _median_ms(run32, b, args.repeats)
            t16 = _median_ms(run16, b, args.repeats)
            print(f"| {b} | {t32:.1f} | {t16:.1f} | {t32 / t16:.2f}x | {diffs} |")


if __name__ == "__main__":
    main()
