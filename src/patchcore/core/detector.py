"""The PatchCore detector: a scikit-learn style estimator over a frozen CNN and a memory bank.

Scores are distances to normal patches: **higher means more anomalous** (the opposite sign of
scikit-learn's ``score_samples``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore.core import augment as augmentation
from patchcore.core import persistence, sampling, search
from patchcore.core.anomaly_map import maps_at_sizes
from patchcore.core.backbones import BACKBONE_DTYPES, FeatureExtractor, resolve_device
from patchcore.core.embedding import FEATURE_DTYPES, FeatureStore, embed, flatten_patches
from patchcore.core.explain import ExplainMixin, Explanation, bank_provenance
from patchcore.core.images import ImageInput, output_size
from patchcore.core.inputs import (
    Batch,
    Skipped,
    as_list,
    check_on_error,
    input_name,
    iter_batches,
    warn_skipped,
)
from patchcore.core.inspection import InspectMixin
from patchcore.core.params import ParamsMixin
from patchcore.core.persistence import FORMAT_NAME, FORMAT_VERSION, ModelFileError
from patchcore.core.regions import RegionsMixin
from patchcore.core.results import Classification, ImageResult, MapSize, ScoreResult, check_maps
from patchcore.core.search import NearestNeighborIndex, resolve_precision
from patchcore.core.state import FittedAttributes, FittedState, NotFittedError
from patchcore.core.update import UpdateMixin
from patchcore.core.validation import validate_params
from patchcore.core.verdicts import VerdictMixin

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Classification",
    "Explanation",
    "ImageResult",
    "ModelFileError",
    "NotFittedError",
    "PatchCore",
    "ScoreResult",
]


@dataclass
class TrainingFeatures:
    """Patch features of training images: (P, D) rows piece by piece (an image in one view,
    :mod:`~patchcore.core.augment`), per image its name and ``(H, W, h, w)`` (own size, feature
    grid), per piece ``(image, view, h, w)``; the unreadable inputs."""

    features: torch.Tensor
    dtype: str
    grids: list[tuple[int, int, int, int]]
    names: list[str]
    skipped: list[Skipped]
    pieces: list[tuple[int, augmentation.View, int, int]] | None = None  # None: image by image

    def provenance(self, indices: torch.Tensor, first_image: int = 0) -> torch.Tensor:
        """(M, 3) int32 origins (image, row, column) of the feature rows ``indices``."""
        if self.pieces is None:
            return bank_provenance(indices, self.grids, first_image)
        return augmentation.provenance(indices, self.pieces, first_image)


class PatchCore(
    ParamsMixin,
    FittedAttributes,
    VerdictMixin,
    RegionsMixin,
    InspectMixin,
    ExplainMixin,
    UpdateMixin,
):
    """PatchCore anomaly detector (Roth et al., 2022).

    Args:
        backbone: feature extractor name (see :data:`patchcore.core.backbones.BACKBONES`).
        layers: tapped layers, shallow to deep; ``None`` = the backbone's default pair.
        weights: ``"imagenet"``, a local weights file, or ``None`` (random; tests only).
        image_size: resize every image to this (int = square, or (H, W)); ``None`` keeps size.
        scale: resize by this factor instead (MATLAB's reference uses 0.4).
        augment: ``None`` (default), ``"flips"`` or ``"rot90"``: also put the patches of each
            training image mirrored (left-right and up-down: 3x the training patches) or
            turned by quarter turns (4x) into the coreset's input (:mod:`patchcore.core.augment`;
            test images are scored as they are). For parts photographed in any orientation
            (round castings, tiles, screws); for parts that always lie the same way it adds fit
            time and bank rows for nothing. What it gained on which set: benchmarks/RESULTS.md,
            "Leads of issue #23".
        coreset_ratio: fraction of training patches kept in the memory bank, in (0, 1]. The
            default 0.01 with every training image reached the exact greedy's 1 % image AUROC
            on every shared set (benchmarks/RESULTS.md, "Defaults on full data").
        max_bank_size: cap on the memory bank's rows (``None``: no cap). The default 16,384
            leaves the shared sets' 1 % banks alone but deeppcb's (25,600 rows from 2.56 M
            patches): its image AUROC was 0.921 at 12,800 rows and 0.918 at 25,600, while
            scoring and fitting cost grow with the bank (benchmarks/RESULTS.md).
        sampling: ``"greedy"`` (default: the k-center coreset in time linear in the number of
            patches, :func:`patchcore.core.sampling.chunked_greedy_coreset`), ``"greedy_exact"``
            (the exact greedy k-center, :func:`patchcore.core.sampling.greedy_coreset`: same
            quality, but its time grows with patches x bank rows and depends on the data) or
            ``"random"``.
        projection_dim: random projection size used by ``"greedy_exact"``; ``None`` (default)
            selects on the features themselves (a 128-d projection of the 152-d default
            features made the coverage radius ~10 % worse without being faster); worth it only
            for very wide features such as wide_resnet50_2's 1536-d.
        search_precision: ``"auto"`` (default), ``"float32"`` or ``"bfloat16"``: the precision
            of the distance products against the memory bank. ``"auto"`` picks bfloat16 on
            CPUs with native bfloat16 dot products (AVX-512 BF16 or AMX; about 3x float32's
            rate) and float32 elsewhere. Image scores are exact either way (patches that could
            hold an image's maximum are re-checked in float32); map values carry the bfloat16
            error (median 0.4 %, see :mod:`patchcore.core.search`).
        feature_dtype: ``"float16"`` (default) or ``"float32"``: how training patch features
            are held during fit. Fit's peak memory above its start is 1.23x the float32 feature
            bytes with float16, 1.72x with float32 (benchmarks/bench_fit_memory.py); the bank is
            float32 either way (casting: same image AUROC, 0.882). Features beyond float16's
            range (|x| > 65504) switch the store to float32 with a warning.
        backbone_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: the precision
            the backbone runs in (features and search stay float32). bfloat16 is opt-in: with
            AMX it made the extractor 1.5-2x faster, features 3-6 % of their range off
            (benchmarks/bench_scoring.py; AUROC effect in benchmarks/RESULTS.md).
        num_neighbors: neighbours for the paper's image-score reweighting; 1 disables it.
        top_k: the image score is the mean of the ``top_k`` largest patch distances (each
            re-checked in float32); 1 = the paper's score, the largest reweighted by eq. 7
            (``num_neighbors``; not applied when ``top_k > 1``). The default 10 gave a mean
            image AUROC over the four real sets of 0.9542 against the paper's 0.9492 at the same
            cost (3 seeds; 0.0010 lower on deeppcb, whose defects cover one or two patches;
            benchmarks/RESULTS.md, "Accuracy search").
        embed_dim: optional smaller patch dimension (channel averaging).
        kernel_size: local neighbourhood averaged into each patch feature.
        sigma: Gaussian blur of anomaly maps, in processed-image pixels.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: makes fitting reproducible bit for bit.
        progress: show progress bars (every method also takes a per-call ``progress``).

    Fitted attributes (views of ``state_``, a :class:`~patchcore.core.state.FittedState`):
    ``memory_bank_``, ``layers_``, ``threshold_``, ``threshold_method_``, ``n_train_images_``,
    ``n_train_patches_``, ``feature_dtype_``, ``skipped_``, ``metadata_``, ``*_seconds_``,
    ``region_threshold_`` (defect regions: :class:`~patchcore.core.regions.RegionsMixin`).
    """

    def __init__(
        self,
        *,
        backbone: str = "efficientnet-lite0",
        layers: Sequence[str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        scale: float | None = None,
        augment: str | None = None,
        coreset_ratio: float = 0.01,
        max_bank_size: int | None = 16384,
        sampling: str = "greedy",
        projection_dim: int | None = None,
        search_precision: str = "auto",
        feature_dtype: str = "float16",
        backbone_dtype: str = "float32",
        num_neighbors: int = 9,
        top_k: int = 10,
        embed_dim: int | None = None,
        kernel_size: int = 3,
        sigma: float = 4.0,
        batch_size: int = 8,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.image_size = image_size
        self.scale = scale
        self.augment = augment
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.sampling = sampling
        self.projection_dim = projection_dim
        self.search_precision = search_precision
        self.feature_dtype = feature_dtype
        self.backbone_dtype = backbone_dtype
        self.num_neighbors = num_neighbors
        self.top_k = top_k
        self.embed_dim = embed_dim
        self.kernel_size = kernel_size
        self.sigma = sigma
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.progress = progress

    # ------------------------------------------------------------------ parameters

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PatchCore:
        """A detector with preset ``name``'s parameters (:mod:`patchcore.core.presets`), then
        ``overrides`` on top: ``PatchCore.from_preset("accurate", seed=1)``. An
        ``image_size`` override replaces a preset's ``scale`` and vice versa.

        Raises:
            ValueError: an unknown preset name.
            TypeError: an override that is not a PatchCore parameter.
        """
        from patchcore.core.presets import with_preset

        return cls(**with_preset(name, overrides))

    def _validate(self) -> None:
        validate_params(self)

    # ------------------------------------------------------------------ fitting

    def fit(
        self, images: Any, y: Any = None, *, on_error: str = "raise", progress: bool | None = None
    ) -> PatchCore:
        """Build the memory bank from normal images.

        Args:
            images: paths, PIL images, arrays, tensors, or an ``ImageDataset``.
            y: ignored (scikit-learn convention).
            on_error: ``"raise"`` stops at the first unreadable image (naming it); ``"skip"``
                leaves it out and lists it in ``skipped_`` (with a warning).
            progress: show progress bars for this call; ``None`` = the ``progress`` parameter.

        Returns:
            self
        """
        self._validate()
        check_on_error(on_error)
        progress = self.progress if progress is None else bool(progress)
        items = as_list(images)
        if not items:
            raise ValueError("fit needs at least one image, got none")
        self.device_ = resolve_device(self.device)
        self.extractor_ = FeatureExtractor(
            self.backbone, self.layers, self.weights, dtype=BACKBONE_DTYPES[self.backbone_dtype]
        ).to(self.device_)
        t0 = time.perf_counter()
        found = self.extract_features(items, on_error=on_error, progress=progress)
        self.fit_from_features(found, progress=progress, feature_seconds=time.perf_counter() - t0)
        warn_skipped("fit skipped {n} unreadable image(s)", found.skipped)
        return self

    def _features(
        self, items: list[Any], on_error: str, progress: bool, desc: str, *, first_image: int
    ) -> TrainingFeatures:
        """:meth:`extract_features` (the scale-out hooks below), for partial_fit."""
        return self.extract_features(
            items, first_image=first_image, on_error=on_error, progress=progress, desc=desc
        )

    def _set_fitted(self, state: FittedState, extractor: FeatureExtractor) -> None:
        """Install a fitted state (from fit or a model file) and build the search index."""
        self.device_ = resolve_device(self.device)
        self.extractor_ = extractor.to(self.device_)
        self.state_ = state
        # the bank on the search device, once: the index searches it, _reweight reads its rows
        self._bank = state.memory_bank.to(self.device_)
        self._index = NearestNeighborIndex(
            self._bank, precision=resolve_precision(self.search_precision, self._bank.device)
        )

    def _select_bank(self, features: torch.Tensor, progress: bool) -> torch.Tensor:
        """Indices of the training patches kept in the memory bank (the coreset step)."""
        n = sampling.coreset_size(features.shape[0], self.coreset_ratio)
        if self.max_bank_size is not None:
            n = min(n, int(self.max_bank_size))
        if n >= features.shape[0]:
            return torch.arange(features.shape[0])
        if self.sampling == "greedy":
            return sampling.chunked_greedy_coreset(
                features, n, seed=self.seed, progress=progress
            ).indices
        if self.sampling == "greedy_exact":
            return sampling.greedy_coreset(
                features, n, projection_dim=self.projection_dim, seed=self.seed, progress=progress
            )
        return sampling.random_subsample(features.shape[0], n, seed=self.seed)

    # ------------------------------------------------------------------ internals

    def _batches(self, items: list[Any], on_error: str, progress: bool, desc: str):  # noqa: ANN202
        return iter_batches(
            items,
            batch_size=int(self.batch_size),
            target_size=lambda h, w: output_size(h, w, self.image_size, self.scale),
            on_error=on_error,
            progress=progress,
            desc=desc,
        )

    @torch.inference_mode()
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D, h, w) patch embedding."""
        x = pixels.to(self.device_, non_blocking=True)
        mean = torch.tensor(self.extractor_.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.extractor_.std, device=x.device).view(1, 3, 1, 1)
        feats = self.extractor_((x - mean) / std)
        return embed(feats, kernel_size=self.kernel_size, embed_dim=self.embed_dim)

    @torch.inference_mode()
    def _score_batch(self, batch: Batch, maps: MapSize) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (B,) float64 and, unless ``maps`` is None, B float32 maps."""
        assert batch.pixels is not None
        emb = self._embed(batch.pixels)
        b, _, h, w = emb.shape
        patches = flatten_patches(emb).float().view(b, h * w, -1)
        # distances only: the nearest index is looked up for each image's worst patch alone
        patch_scores, image_max, arg = search.patch_scores(self._index, patches, int(self.top_k))
        image_scores = self._image_scores(patches, patch_scores, image_max, arg)
        out: list[np.ndarray] = []
        if maps is not None:
            processed = (int(batch.pixels.shape[-2]), int(batch.pixels.shape[-1]))
            want = {"processed": [processed] * b, "native": batch.sizes}.get(maps, [maps] * b)
            out = maps_at_sizes(patch_scores.view(b, 1, h, w), processed, want, self.sigma)
        return image_scores.double().cpu().numpy(), out

    def _image_scores(
        self,
        patches: torch.Tensor,
        patch_scores: torch.Tensor,
        image_max: torch.Tensor,
        arg: torch.Tensor,
    ) -> torch.Tensor:
        """(B,) image scores from (B, P, D) patches and :func:`search.patch_scores`' outputs:
        the mean of the ``top_k`` largest patch distances, or (``top_k`` 1) the largest with
        the paper's eq. 7 reweighting when ``num_neighbors`` > 1."""
        if int(self.top_k) > 1:
            return self._top_k_mean(patch_scores)
        k = min(int(self.num_neighbors), self.memory_bank_.shape[0])
        return self._reweight(patches, arg, image_max, k) if k > 1 else image_max

    def _reweight(
        self,
        patches: torch.Tensor,
        arg: torch.Tensor,
        scores: torch.Tensor,
        k: int,
    ) -> torch.Tensor:
        """The paper's eq. 7: damp the max-patch score where its neighbourhood is dense."""
        rows = torch.arange(patches.shape[0], device=patches.device)
        worst = patches[rows, arg]  # (B, D) most anomalous patch per image
        bank = self._bank  # on the index's device (was a full copy per batch on GPUs)
        nearest = bank[self._index.search(worst, k=1)[1][:, 0]]  # (B, D) m*, its nearest row
        _, support = self._index.search(nearest, k=k)  # (B, k) neighbours of m*
        d = torch.linalg.vector_norm(worst[:, None, :] - bank[support], dim=-1)  # (B, k)
        weights = 1.0 - torch.softmax(d, dim=1)[:, 0]
        return weights * scores

    def _top_k_mean(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) mean of each image's ``top_k`` largest patch distances.

        Args:
            scores: (B, P) nearest distances from ``search.patch_scores(..., k=top_k)``, whose
                ``top_k`` largest are exact.
        """
        k = min(int(self.top_k), scores.shape[1])
        return scores.topk(k, dim=1).values.float().mean(dim=1)

    # ------------------------------------------------------------------ inference

    def iter_score(
        self,
        images: Any,
        *,
        maps: MapSize = None,
        on_error: str = "raise",
        progress: bool | None = None,
    ) -> Iterator[ImageResult]:
        """Score images one by one as they are processed, in input order (a stream).

        Images are still decoded and run in batches of ``batch_size``; each batch's results are
        yielded as soon as it is done, so a caller can show progress or write rows as they come.

        Args:
            images: paths, PIL images, arrays, tensors, or an ``ImageDataset``.
            maps: ``None`` (no maps), ``"processed"`` (at the resized size the detector sees),
                ``"native"`` (each input's own size) or ``(H, W)`` (a given display size).
            on_error: ``"raise"`` stops at the first unreadable image (naming it); ``"skip"``
                yields it with ``score`` NaN, ``map`` None and ``error`` set.
            progress: show a progress bar for this call; ``None`` = the ``progress`` parameter.

        Yields:
            :class:`ImageResult` per input: index, name, score (higher = more anomalous), map
            (float32 HxW or None) and error (None, or why the input was skipped).
        """
        self._check_fitted("iter_score")
        check_on_error(on_error)
        maps = check_maps(maps)
        items = as_list(images)
        progress = self.progress if progress is None else bool(progress)
        return self._stream(items, maps, on_error, progress)

    def _stream(
        self, items: list[Any], maps: MapSize, on_error: str, progress: bool
    ) -> Iterator[ImageResult]:
        for batch in self._batches(items, on_error, progress, "score"):
            results = [
                ImageResult(s.index, s.name, float("nan"), None, s.reason) for s in batch.skipped
            ]
            if batch.pixels is not None:
                scores, out = self._score_batch(batch, maps)
                for j, i in enumerate(batch.indices):
                    m = out[j] if maps is not None else None
                    results.append(ImageResult(i, batch.names[j], float(scores[j]), m, None))
            yield from sorted(results, key=lambda r: r.index)

    def score(
        self,
        images: Any,
        *,
        maps: MapSize = None,
        on_error: str = "raise",
        progress: bool | None = None,
    ) -> ScoreResult:
        """Scores, optional anomaly maps and the skipped inputs of ``images`` in one pass.

        Arguments as in :meth:`iter_score`; nothing is warned: unreadable inputs skipped with
        ``on_error="skip"`` are returned in ``skipped``.

        Returns:
            :class:`ScoreResult`: ``scores`` (N,) float64, higher = more anomalous, NaN where
            skipped; ``maps`` N float32 arrays (None where skipped), or None when ``maps`` is
            None; ``skipped`` the (index, name, reason) records.
        """
        stream = self.iter_score(images, maps=maps, on_error=on_error, progress=progress)
        return ScoreResult.collect(stream, with_maps=maps is not None)

    def _scored(
        self, images: Any, maps: MapSize, on_error: str, progress: bool | None
    ) -> ScoreResult:
        """:meth:`score`, warning about skipped inputs (the older methods' behaviour)."""
        result = self.score(images, maps=maps, on_error=on_error, progress=progress)
        warn_skipped("{n} unreadable image(s) scored as NaN", result.skipped, stacklevel=4)
        return result

    def score_samples(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> np.ndarray:
        """Image anomaly scores, higher = more anomalous.

        Returns:
            (N,) float64; NaN for images skipped with ``on_error="skip"`` (with a warning).
        """
        return self._scored(images, None, on_error, progress).scores

    def score_with_maps(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Image scores and anomaly maps in one pass (no threshold needed).

        Returns:
            scores (N,) float64 (NaN for skipped images) and N float32 maps HxW at each input's
            own size (None if skipped).
        """
        r = self._scored(images, "native", on_error, progress)
        return r.scores, r.maps  # type: ignore[return-value]

    def anomaly_map(self, image: ImageInput, *, progress: bool | None = None) -> np.ndarray:
        """Per-pixel anomaly map of one image, float32 HxW at the image's own size."""
        m = self.score([image], maps="native", progress=progress).maps[0]  # type: ignore[index]
        assert m is not None
        return m

    def anomaly_maps(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> list[np.ndarray | None]:
        """Anomaly maps of several images at their own sizes (None for skipped ones)."""
        return self._scored(images, "native", on_error, progress).maps  # type: ignore[return-value]

    # ------------------------------------------------------------------ persistence

    def config(self) -> dict[str, Any]:
        """JSON-able configuration written into saved files."""
        self._check_fitted("config")
        return persistence.config(self)

    def card(self) -> dict[str, Any]:
        """Human-readable facts about the fitted model (for reports and the service)."""
        self._check_fitted("card")
        return {**self.state_.card(self.get_params()), "format_version": FORMAT_VERSION}

    def save(self, path: str | os.PathLike) -> Path:
        """Write one file: tensors plus a versioned config (``torch.load(weights_only=True)``).

        Atomic: a complete file or none (see :func:`patchcore.core.persistence.save`).
        """
        self._check_fitted("save")
        return persistence.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> PatchCore:
        """Load a detector written by :meth:`save` (safe: no pickled code is executed).

        Raises:
            ModelFileError: the file is missing, damaged, foreign, newer or invalid.
        """
        return persistence.load(cls, path, device=device)

    # ==========================================================================================
    # Public hooks for scale-out (owned by the scale developer; the rest of this class is the
    # core's). A fit is extract_features() on the training images (on one process, or on each
    # worker for its shard), a bank selection (patchcore.core.sampling's stages), then
    # install_bank(); fit() is these hooks in one process, so a fit across workers
    # (patchcore.scale) builds the same fitted state, bank provenance included.
    # ==========================================================================================

    def extract_features(
        self,
        images: Any,
        *,
        first_image: int = 0,
        on_error: str = "raise",
        progress: bool | None = None,
        allow_empty: bool = False,
        desc: str = "reading the training images",
    ) -> TrainingFeatures:
        """Patch features of training images, as :meth:`fit` extracts them (a detector
        without a feature extractor, e.g. a fresh one on a worker, builds it first).

        Args:
            images, on_error, progress: as :meth:`fit` (``skipped`` indexes ``images``).
            first_image: number of the first readable image (in-memory images are named
                ``"image #<number>"``); a shard of the training images passes its position.
            allow_empty: no readable image gives (0, 0) ``features`` instead of a ValueError.
            desc: the progress bar's words.

        Returns:
            :class:`TrainingFeatures`: (P, D) float16 (float32: ``feature_dtype``) rows image by
            image, row-major on each grid; names and ``(H, W, h, w)`` grids of the readable
            images; the skipped inputs.

        On the CPU, batches run side by side on one torch thread each
        (:func:`~patchcore.core.sampling.parallel_blocks`: the same features, and no
        stalls when the cores are shared).
        """
        self._validate()
        check_on_error(on_error)
        progress = self.progress if progress is None else bool(progress)
        items = as_list(images)
        self._extractor_for_hooks()
        skipped: list[Skipped] = []
        grids: list[tuple[int, int, int, int]] = []
        names: list[str] = []
        pieces: list[tuple[int, augmentation.View, int, int]] = []
        views = augmentation.views(self.augment)
        store = FeatureStore(len(items) * len(views), FEATURE_DTYPES[self.feature_dtype])
        batches = self._batches(items, on_error, progress, desc)
        workers = None if self.device_.type == "cpu" else 1  # CPU: batches side by side

        def embedded(batch: Batch) -> tuple[Batch, list[torch.Tensor] | None]:
            if batch.pixels is None:
                return batch, None
            return batch, [self._embed(augmentation.apply(batch.pixels, v)) for v in views]

        for batch, embs in sampling.parallel_blocks(embedded, batches, workers):
            skipped += batch.skipped
            if embs is not None:
                h, w = int(embs[0].shape[-2]), int(embs[0].shape[-1])  # the identity view's
                for view, emb in zip(views, embs, strict=True):
                    store.add(flatten_patches(emb).float().cpu(), len(batch.indices))
                    pieces += [(len(names) + j, view, h, w) for j in range(len(batch.indices))]
                for i, (height, width) in zip(batch.indices, batch.sizes, strict=True):
                    names.append(input_name(items[i], first_image + len(names)))
                    grids.append((height, width, h, w))
        if store.overflow:
            warnings.warn(
                "training features exceed float16's range (|x| > 65504): stored in float32 "
                "instead (feature_dtype='float32' avoids the switch)",
                UserWarning,
                stacklevel=3,
            )
        dtype = str(store.dtype).removeprefix("torch.")
        if store.rows == 0:
            if allow_empty:
                return TrainingFeatures(torch.empty(0, 0), dtype, grids, names, skipped)
            raise ValueError(
                f"no readable training images: all {len(items)} failed, e.g. "
                f"{skipped[0].name}: {skipped[0].reason}"
                if skipped
                else "fit needs at least one image, got none"
            )
        return TrainingFeatures(store.result(), dtype, grids, names, skipped, pieces)

    def fit_from_features(
        self,
        train: TrainingFeatures,
        *,
        progress: bool | None = None,
        feature_seconds: float = 0.0,
    ) -> PatchCore:
        """Select the memory bank from :meth:`extract_features`' result and install it: the
        rest of :meth:`fit` (which also warns about ``skipped_``). Returns self, fitted."""
        progress = self.progress if progress is None else bool(progress)
        t0 = time.perf_counter()
        idx = self._select_bank(train.features, progress)
        bank = train.features[idx].float().contiguous()
        return self.install_bank(
            bank,
            idx,
            names=train.names,
            grids=train.grids,
            feature_dtype=train.dtype,
            skipped=train.skipped,
            feature_seconds=feature_seconds,
            coreset_seconds=time.perf_counter() - t0,
            pieces=train.pieces,
        )

    def install_bank(
        self,
        bank: torch.Tensor,
        indices: torch.Tensor,
        *,
        names: Sequence[str],
        grids: Sequence[tuple[int, int, int, int]],
        feature_dtype: str = "float16",
        skipped: Sequence[Skipped] = (),
        feature_seconds: float = 0.0,
        coreset_seconds: float = 0.0,
        pieces: Sequence[tuple[int, augmentation.View, int, int]] | None = None,
    ) -> PatchCore:
        """Make a selected memory bank the fitted state, with its provenance. Returns self.

        Args:
            bank: (M, D) the selected training patch features (kept as float32).
            indices: (M,) their positions among all training patches laid out as
                :meth:`extract_features` gives them: each row's image and grid cell, which
                :meth:`explain` traces.
            names, grids: the training images read, in order, and their ``(H, W, h, w)``.
            feature_dtype, skipped, feature_seconds, coreset_seconds: the fit's facts.
            pieces: with bank augmentation, the layout of the training patches
                (:attr:`TrainingFeatures.pieces`); None: image by image, as ``grids``.

        Raises:
            ValueError: ``bank`` and ``indices`` disagree, or ``names`` and ``grids``.
        """
        if bank.ndim != 2 or indices.ndim != 1 or bank.shape[0] != indices.shape[0]:
            raise ValueError(
                f"bank (M, D) and indices (M,) must agree, got {tuple(bank.shape)} and "
                f"{tuple(indices.shape)}"
            )
        if len(names) != len(grids):
            raise ValueError(f"names ({len(names)}) and grids ({len(grids)}) must pair up")
        self._extractor_for_hooks()
        state = FittedState(
            memory_bank=bank.detach().float().cpu().contiguous(),
            layers=tuple(self.extractor_.layers),
            n_train_images=len(names),
            n_train_patches=int(sum(h * w for *_, h, w in (pieces or grids))),
            feature_dtype=feature_dtype,
            feature_seconds=feature_seconds,
            coreset_seconds=coreset_seconds,
            fit_seconds=feature_seconds + coreset_seconds,
            skipped=sorted(skipped),
            provenance=(
                bank_provenance(indices, grids)
                if pieces is None
                else augmentation.provenance(indices, pieces)
            ),
            train_names=list(names),
            train_grids=[tuple(int(v) for v in g) for g in grids],
        )
        self._set_fitted(state, self.extractor_)
        return self

    def bank_size(self, n_patches: int) -> int:
        """Memory-bank rows a fit keeps of ``n_patches`` training patches (``coreset_ratio``,
        capped at ``max_bank_size``)."""
        n = sampling.coreset_size(n_patches, self.coreset_ratio)
        return n if self.max_bank_size is None else min(n, int(self.max_bank_size))

    def _extractor_for_hooks(self) -> None:
        """Build the feature extractor from the parameters if the detector has none yet."""
        if getattr(self, "extractor_", None) is None:
            self.device_ = resolve_device(self.device)
            self.extractor_ = FeatureExtractor(
                self.backbone, self.layers, self.weights, dtype=BACKBONE_DTYPES[self.backbone_dtype]
            ).to(self.device_)

    # ================================================================ end of the scale-out hooks
