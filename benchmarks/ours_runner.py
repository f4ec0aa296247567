"""Fit or score our PatchCore on a prepared tensors file, one phase per process.

Driven by ``benchmarks/run_benchmarks.py``; each call is a fresh process so that ``ru_maxrss``
(the peak resident set size, a per-process high-water mark) measures that phase alone. Like
``peer_anomalib.py``, each phase reports its baseline (the same high-water mark just before the
phase starts: after imports, backbone build and input loading), so ``peak - baseline`` is what
the phase itself added.

Usage::

    python benchmarks/ours_runner.py fit INPUTS.pt CONFIG.json MODEL.pt OUT.json
    python benchmarks/ours_runner.py score INPUTS.pt MODEL.pt OUT.json [--maps MAPS.npy]
        [--batch-size 8] [--repeats 1] [--ann hnsw|ivf]

``INPUTS.pt`` is ``torch.save({"train": (N,3,H,W), "test": (M,3,H,W)})`` with pixels in [0, 1],
already resized: the detector normalises them with its backbone's mean/std, exactly the values
the peer receives pre-normalised. Each part may instead be a list of (3,H,W) tensors of varying
sizes (native resolution): the detector batches consecutive same-size images. ``--maps`` ending
in ``.npz`` saves the maps as one array per image (``arr_0``, ``arr_1``, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchcore import PatchCore
from patchcore.core.backbones import FeatureExtractor
from patchcore.core.embedding import flatten_patches
from patchcore.core.search import NearestNeighborIndex


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(key: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return None


class PhasePeak:
    """Peak RSS of one phase, measured from its start.

    ``ru_maxrss`` is a process-lifetime high-water mark: a phase that stays below an earlier
    transient peak (e.g. the backbone build) reads as adding nothing. Writing ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0) resets the mark to the current RSS, so after the
    phase ``VmHWM - start`` is what the phase itself held at its worst. ``baseline_rss_mb`` and
    ``peak_rss_mb`` keep the peer's (lifetime ``ru_maxrss``) meaning.
    """

    def __enter__(self) -> PhasePeak:
        self.baseline = peak_rss_mb()
        # VmHWM before the reset: this process image's peak since execve (ru_maxrss also
        # carries the forking parent's RSS at fork time, kept by Linux across execve).
        self.hwm_before = _status_mb("VmHWM")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _status_mb("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_mb("VmHWM") if self.start is not None else None
        self.peak = max(self.baseline, hwm if hwm is not None else peak_rss_mb())
        self.phase = None if self.start is None or hwm is None else hwm - self.start
        self.hwm = None if hwm is None or self.hwm_before is None else max(self.hwm_before, hwm)

    def report(self) -> dict[str, float | None]:
        return {
            "baseline_rss_mb": self.baseline,
            "peak_rss_mb": self.peak,
            "phase_start_rss_mb": self.start,
            "phase_peak_above_start_mb": self.phase,
            "baseline_hwm_mb": self.hwm_before,
            "peak_hwm_mb": self.hwm,
        }


def _load_inputs(path: str, part: str) -> torch.Tensor | list[torch.Tensor]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data[part], (list, tuple)):  # native sizes: one (3, H, W) tensor per image
        return [t.float().contiguous() for t in data[part]]
    return data[part].float().contiguous()


def save_maps(path: str, maps: list[np.ndarray]) -> None:
    """float16 maps: one (M, H, W) array (.npy), or one array per image (.npz: arr_0, ...)."""
    maps16 = [np.asarray(m, dtype=np.float16) for m in maps]
    if path.endswith(".npz"):
        np.savez(path, *maps16)
    else:
        np.save(path, np.stack(maps16))


@torch.inference_mode()
def training_features(det: PatchCore, train: torch.Tensor) -> torch.Tensor:
    """(N*h*w, D) float32 patch features of ``train`` (B,3,H,W in [0, 1]), as ``fit`` makes them."""
    chunks = []
    if isinstance(train, list):  # varying sizes: one image at a time
        for img in train:
            chunks.append(flatten_patches(det._embed(img[None])).float().cpu())
        return torch.cat(chunks)
    bs = int(det.batch_size)
    for lo in range(0, train.shape[0], bs):
        chunks.append(flatten_patches(det._embed(train[lo : lo + bs])).float().cpu())
    return torch.cat(chunks)


def coverage_radius(features: torch.Tensor, bank: torch.Tensor) -> float:
    """Largest distance from any row of ``features`` (N, D) to its nearest row of ``bank``."""
    dist, _ = NearestNeighborIndex(bank).search(features, k=1)
    return float(dist.max())


def phase_fit(inputs: str, config: dict, model_path: str, coverage: bool = True) -> dict:
    """Fit on the ``train`` tensors; time, peak memory, coverage radius; save the model."""
    train = _load_inputs(inputs, "train")
    # Build (and drop) the backbone once so its imports and weight files count in the baseline,
    # as the peer's baseline counts its model build.
    FeatureExtractor(
        config.get("backbone", "efficientnet-lite0"),
        config.get("layers"),
        config.get("weights", "imagenet"),
    )
    det = PatchCore(**config, progress=False)
    with PhasePeak() as mem:
        t0 = time.perf_counter()
        det.fit(train)
        total = time.perf_counter() - t0
    radius = None
    if coverage:
        radius = coverage_radius(training_features(det, train), det.memory_bank_)
    det.save(model_path)
    return {
        "n_train": len(train),
        "n_train_patches": int(det.n_train_patches_),
        "embedding_dim": int(det.memory_bank_.shape[1]),
        "memory_bank_size": int(det.memory_bank_.shape[0]),
        "memory_bank_dtype": str(det.memory_bank_.dtype),
        "coreset_coverage_radius": radius,
        "fit": {
            "feature_extraction_s": float(det.feature_seconds_),
            "coreset_s": float(det.coreset_seconds_),
            "total_s": total,
            **mem.report(),
        },
    }


class FaissIndex:
    """Approximate nearest-neighbour index: ``NearestNeighborIndex``'s search and min_distances.

    Args:
        bank: (M, D) float tensor.
        kind: ``"hnsw"`` (IndexHNSWFlat, 32 links, efConstruction 80, efSearch 64) or ``"ivf"``
            (IndexIVFFlat, nlist = 4 sqrt(M), nprobe 8).
    """

    def __init__(self, bank: torch.Tensor, kind: str) -> None:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        x = np.ascontiguousarray(bank.float().cpu().numpy())
        d = x.shape[1]
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32)
            index.hnsw.efConstruction = 80
            index.add(x)
            index.hnsw.efSearch = 64
        elif kind == "ivf":
            nlist = max(1, int(4 * math.sqrt(x.shape[0])))
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
            index.train(x)
            index.add(x)
            index.nprobe = 8
        else:
            raise ValueError(f"ann must be 'hnsw' or 'ivf', got {kind!r}")
        self.index = index
        self.kind = kind

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) -> distances (Q, k) Euclidean ascending, indices (Q, k) int64."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        d2, idx = self.index.search(q, k)
        dist = torch.from_numpy(d2).clamp_(min=0.0).sqrt_()
        return dist, torch.from_numpy(idx).long()

    def min_distances(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) -> (Q,) distance to the nearest indexed row (``NearestNeighborIndex``'s API)."""
        return self.search(queries, k=1)[0][:, 0]


def phase_score(
    inputs: str,
    model_path: str,
    batch_size: int,
    repeats: int,
    ann: str | None,
    maps_path: str | None,
    latency_images: int | None = None,
) -> dict:
    """Score ``test``: warm-up, batch-1 latency and batched throughput (medians of ``repeats``).

    Batch-1 latency is timed on the first ``latency_images`` test images (all when None); the
    batched pass always scores every test image (its scores and maps are the results).
    """
    test = _load_inputs(inputs, "test")
    det = PatchCore.load(model_path)
    ann_build_s = None
    if ann:
        t0 = time.perf_counter()
        det._index = FaissIndex(det.memory_bank_, ann)
        ann_build_s = time.perf_counter() - t0
    det.set_threshold(0.0)  # classify() = scores and maps in one pass, like the peer's forward
    with PhasePeak() as mem:
        n = len(test)
        det.set_params(batch_size=batch_size)  # a scoring setting: no refit needed
        det.classify(test[0], progress=False)  # warm-up, both shapes
        det.classify(test[:batch_size], progress=False)
        single = []
        n_single = n if latency_images is None else max(1, min(n, latency_images))
        single_scores = np.empty(n_single)
        for _ in range(repeats):
            for i in range(n_single):
                t0 = time.perf_counter()
                out = det.classify(test[i], progress=False)
                single.append(time.perf_counter() - t0)
                single_scores[i] = out.scores[0]
        totals = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = det.classify(test, progress=False)
            totals.append(time.perf_counter() - t0)
    if maps_path:
        save_maps(maps_path, out.maps)
    return {
        "n_test": int(n),
        "ann": ann,
        "ann_build_s": ann_build_s,
        "image_scores": out.scores.tolist(),
        "n_latency": int(n_single),
        "max_abs_score_diff_batch1_vs_batched": float(
            np.abs(out.scores[:n_single] - single_scores).max()
        ),
        "score": {
            "batch_size": batch_size,
            "repeats": repeats,
            "per_image_batch1_s": float(np.median(single)),
            "batched_total_s": float(np.median(totals)),
            "per_image_batched_s": float(np.median(totals)) / n,
            **mem.report(),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit on the train tensors, save the model")
    f.add_argument("inputs")
    f.add_argument("config", help="JSON file of PatchCore keyword arguments")
    f.add_argument("model")
    f.add_argument("out")
    f.add_argument("--no-coverage", action="store_true", help="skip the coverage radius")
    s = sub.add_parser("score", help="score the test tensors with a saved model")
    s.add_argument("inputs")
    s.add_argument("model")
    s.add_argument("out")
    s.add_argument("--maps", help="save anomaly maps, float16: (M,H,W) .npy, or per image .npz")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--ann", choices=["hnsw", "ivf"], default=None)
    s.add_argument(
        "--latency-images", type=int, default=None, help="batch-1 timing on the first K images"
    )
    args = ap.parse_args(argv)
    if args.cmd == "fit":
        config = json.loads(Path(args.config).read_text())
        result = phase_fit(args.inputs, config, args.model, coverage=not args.no_coverage)
    else:
        result = phase_score(
            args.inputs,
            args.model,
            args.batch_size,
            args.repeats,
            args.ann,
            args.maps,
            args.latency_images,
        )
    result["threads"] = torch.get_num_threads()
    result["malloc_mmap_threshold_env"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    result["argv"] = sys.argv[1:]
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
