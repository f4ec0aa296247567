"""The PatchCore detector: a scikit-learn style estimator over a frozen CNN and a memory bank.

Scores are distances to normal patches: **higher means more anomalous** (the opposite sign of
scikit-learn's ``score_samples``).
"""

from __future__ import annotations

import copy
import itertools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from patchcore.core import augment as augmentation
from patchcore.core import persistence, sampling, scoring, search
from patchcore.core.backbones import BACKBONE_DTYPES, FeatureExtractor, resolve_device
from patchcore.core.embedding import FEATURE_DTYPES, FeatureStore, embed, flatten_patches
from patchcore.core.explain import ExplainMixin, Explanation
from patchcore.core.images import output_size
from patchcore.core.inference import ScoreMixin
from patchcore.core.inputs import (
    Batch,
    Skipped,
    as_list,
    check_on_error,
    group_batches,
    input_name,
    iter_batches,
    warn_skipped,
)
from patchcore.core.inspection import InspectMixin
from patchcore.core.params import PatchCoreParams, check_settable
from patchcore.core.persistence import FORMAT_NAME, FORMAT_VERSION, ModelFileError
from patchcore.core.presets import with_preset
from patchcore.core.regions import RegionsMixin
from patchcore.core.results import Classification, ImageResult, MapSize, ScoreResult
from patchcore.core.search import NearestNeighborIndex, resolve_precision
from patchcore.core.state import FittedAttributes, FittedState, NotFittedError
from patchcore.core.update import UpdateMixin
from patchcore.core.validation import validate_params
from patchcore.core.verdicts import VerdictMixin
from patchcore.lean import ood
from patchcore.lean.fingerprints import content_digest

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
    grid), per piece ``(image, view, h, w)``; the unreadable inputs; per image its content
    digest (:mod:`patchcore.lean.fingerprints`) and pixel statistics
    (:func:`patchcore.lean.ood.pixel_stats`), from which the model's input profile is made."""

    features: torch.Tensor
    dtype: str
    grids: list[tuple[int, int, int, int]]
    names: list[str]
    skipped: list[Skipped]
    digests: list[str | None] = field(default_factory=list)
    stats: list[tuple[float, float, float]] = field(default_factory=list)
    pieces: list[tuple[int, augmentation.View, int, int]] | None = None  # None: image by image

    def provenance(self, indices: torch.Tensor, first_image: int = 0) -> torch.Tensor:
        """(M, 3) int32 origins (image, row, column) of the feature rows ``indices``."""
        return augmentation.origins(indices, self.grids, self.pieces, first_image)


class PatchDistances(NamedTuple):
    """A batch's patches and their nearest-bank distances (:meth:`PatchCore._distances`):
    patches (B, P, D) float32, distances (B, P) (each image's ``top_k`` largest exact),
    image_max / arg (B,) the exact largest distance and its patch, grid the (h, w) patch grid."""

    patches: torch.Tensor
    distances: torch.Tensor
    image_max: torch.Tensor
    arg: torch.Tensor
    grid: tuple[int, int]


class PatchCore(
    PatchCoreParams,
    FittedAttributes,
    VerdictMixin,
    RegionsMixin,
    InspectMixin,
    ExplainMixin,
    UpdateMixin,
    ScoreMixin,
):
    """PatchCore anomaly detector (Roth et al., 2022).

    Keyword-only parameters, listed once (signature, defaults and their meaning) in
    :class:`~patchcore.core.params.PatchCoreParams`, whose ``__init__`` this is: torch-free, so
    the command line derives its options from them without loading torch.

    Fitted attributes (views of ``state_``, a :class:`~patchcore.core.state.FittedState`):
    ``memory_bank_``, ``layers_``, ``threshold_``, ``threshold_method_``, ``n_train_images_``,
    ``n_train_patches_``, ``feature_dtype_``, ``skipped_``, ``metadata_``, ``*_seconds_``,
    ``region_threshold_`` (defect regions: :class:`~patchcore.core.regions.RegionsMixin`),
    ``map_scale_`` and ``display_range_`` (chosen at calibration:
    :mod:`patchcore.core.calibration`).

    Fit-shaping parameters are frozen once fitted, score-shaping ones once a threshold exists
    (:meth:`set_params`).
    """

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
        return cls(**with_preset(name, overrides))

    def set_params(self, **params: Any) -> PatchCore:
        """Set constructor arguments by name, as far as a fitted model allows.

        Fit-shaping parameters (:data:`~patchcore.core.params.FIT_PARAMS`: backbone, layers,
        weights, sizes, bank and sampling settings, feature and backbone dtypes, embed_dim,
        kernel_size, seed) are refused on a fitted model, and those that change what a score or
        map means (:data:`~patchcore.core.params.SCORE_PARAMS`: top_k, num_neighbors, sigma)
        once a threshold exists: a ``ValueError`` names the parameter and what to do (fit
        again, or :meth:`clear_threshold` and calibrate again). Scoring settings (batch_size,
        device, progress, search_precision) apply from the next call.

        Returns:
            self
        """
        check_settable(self, params)
        super().set_params(**params)
        if hasattr(self, "state_") and {"device", "search_precision"} & params.keys():
            self._set_fitted(self.state_, self.extractor_)  # bank and index moved / rebuilt
        return self

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

    def _batches(  # noqa: ANN202
        self, items: list[Any], on_error: str, progress: bool, desc: str, window: int = 0
    ):
        return iter_batches(
            items,
            batch_size=int(self.batch_size),
            target_size=lambda h, w: output_size(h, w, self.image_size, self.scale),
            on_error=on_error,
            progress=progress,
            desc=desc,
            window=window,
        )

    @torch.inference_mode()
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D, h, w) patch embedding."""
        return self._embed_many([pixels])[0]

    @torch.inference_mode()
    def _embed_many(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`_embed` of batches of different sizes, their backbone passes shared
        (:meth:`FeatureExtractor.forward_many`)."""
        xs = [p.to(self.device_, non_blocking=True) for p in groups]
        mean = torch.tensor(self.extractor_.mean, device=self.device_).view(1, 3, 1, 1)
        std = torch.tensor(self.extractor_.std, device=self.device_).view(1, 3, 1, 1)
        feats = self.extractor_.forward_many([(x - mean) / std for x in xs])
        return [embed(f, kernel_size=self.kernel_size, embed_dim=self.embed_dim) for f in feats]

    def _distances(self, pixels: torch.Tensor) -> PatchDistances:
        """Embed (B, 3, H, W) pixels and search the bank (distances only: the nearest row is
        looked up for each image's worst patch alone, in :func:`search.patch_scores`)."""
        return self._distances_groups([pixels])[0]

    @torch.inference_mode()
    def _distances_groups(self, groups: list[torch.Tensor]) -> list[PatchDistances]:
        """:meth:`_distances` of several batches (images of different sizes) with one search
        for them all (:func:`search.patch_scores_groups`)."""
        grids, patches = [], []
        for emb in self._embed_many(groups):
            b, _, h, w = emb.shape
            grids.append((h, w))
            patches.append(flatten_patches(emb).float().view(b, h * w, -1))
        found = search.patch_scores_groups(self._index, patches, int(self.top_k))
        return [
            PatchDistances(x, *f, grid) for x, f, grid in zip(patches, found, grids, strict=True)
        ]

    def reference_scores(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) float64 and processed-size maps (B, H, W) float32 of (B, 3, H, W) pixels
        in [0, 1], with the search and the backbone in float32 whatever the parameters say:
        the reference an exported graph is checked against (:mod:`patchcore.core.export`).
        Swaps the model's index for the call: not while another thread scores with it."""
        self._check_fitted("reference_scores")
        index, extractor = self._index, self.extractor_
        self._index = NearestNeighborIndex(self._bank, precision="float32")
        if extractor.dtype != torch.float32:
            self.extractor_ = copy.deepcopy(extractor)
            self.extractor_.dtype = torch.float32
        try:
            b = pixels.shape[0]
            batch = Batch(list(range(b)), pixels, [tuple(pixels.shape[-2:])] * b, [""] * b)
            scores, maps = self._score_batch(batch, "processed")
        finally:
            self._index, self.extractor_ = index, extractor
        return scores, np.stack(maps)

    def _score_batch(self, batch: Batch, maps: MapSize) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (B,) float64 and, unless ``maps`` is None, B float32 maps."""
        return self._score_batches([batch], maps)[0]

    @torch.inference_mode()
    def _score_batches(
        self, batches: list[Batch], maps: MapSize
    ) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """:meth:`_score_batch` of each batch, the bank searched once for them all."""
        pixels = [b.pixels for b in batches]
        assert all(p is not None for p in pixels)
        out_all = []
        for batch, found in zip(batches, self._distances_groups(pixels), strict=True):  # type: ignore[arg-type]
            assert batch.pixels is not None
            image_scores = self._image_scores(found)
            out: list[np.ndarray] = []
            if maps is not None:
                b, (h, w) = len(image_scores), found.grid
                processed = (int(batch.pixels.shape[-2]), int(batch.pixels.shape[-1]))
                want = {"processed": [processed] * b, "native": batch.sizes}.get(maps, [maps] * b)
                grid = found.distances.view(b, 1, h, w)
                out = scoring.maps_at_sizes(grid, processed, want, self.sigma)
            out_all.append((image_scores.double().cpu().numpy(), out))
        return out_all

    def _image_scores(self, found: PatchDistances) -> torch.Tensor:
        """(B,) image scores by the one rule (:func:`patchcore.core.scoring.image_scores`)."""
        return scoring.image_scores(
            found.distances,
            int(self.top_k),
            patches=found.patches,
            best=(found.image_max, found.arg),
            support=self._eq7_support(),
        )

    def _eq7_support(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """(B, D) worst patches -> (B, k, D): the ``num_neighbors`` bank rows around each one's
        nearest row m* (eq. 7's support), or None where eq. 7 does not apply."""
        k = min(int(self.num_neighbors), self.memory_bank_.shape[0])
        if int(self.top_k) > 1 or k <= 1:
            return None
        bank, index = self._bank, self._index  # the bank on the index's device

        def support(worst: torch.Tensor) -> torch.Tensor:
            nearest = bank[index.search(worst, k=1)[1][:, 0]]  # (B, D) m*, its nearest row
            return bank[index.search(nearest, k=k)[1]]  # (B, k, D) the neighbours of m*

        return support

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
        det, state, extractor = persistence.load(cls, path, device=device)
        det._set_fitted(state, extractor)
        return det

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
        digests: list[str | None] = []
        stats: list[tuple[float, float, float]] = []
        pieces: list[tuple[int, augmentation.View, int, int]] = []
        views = augmentation.views(self.augment)
        store = FeatureStore(len(items) * len(views), FEATURE_DTYPES[self.feature_dtype])
        batches = self._batches(items, on_error, progress, desc)
        workers = None if self.device_.type == "cpu" else 1  # CPU: batches side by side

        def embedded(group: list[Batch]) -> list[tuple[Batch, list[torch.Tensor] | None]]:
            live = [b for b in group if b.pixels is not None]
            per_view = [
                self._embed_many([augmentation.apply(b.pixels, v) for b in live]) for v in views
            ]
            embs = iter(zip(*per_view, strict=True))
            return [(b, None if b.pixels is None else list(next(embs))) for b in group]

        groups = group_batches(batches, int(self.batch_size))  # mixed sizes: one pass
        for batch, embs in itertools.chain.from_iterable(
            sampling.parallel_blocks(embedded, groups, workers)
        ):
            skipped += batch.skipped
            if embs is not None:
                h, w = int(embs[0].shape[-2]), int(embs[0].shape[-1])  # the identity view's
                for view, emb in zip(views, embs, strict=True):
                    store.add(flatten_patches(emb).float().cpu(), len(batch.indices))
                    pieces += [(len(names) + j, view, h, w) for j in range(len(batch.indices))]
                stats += [tuple(v) for v in ood.pixel_stats(batch.pixels.numpy()).tolist()]
                for i, (height, width) in zip(batch.indices, batch.sizes, strict=True):
                    names.append(input_name(items[i], first_image + len(names)))
                    grids.append((height, width, h, w))
                    digests.append(content_digest(items[i]))
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
                return TrainingFeatures(torch.empty(0, 0), dtype, grids, names, skipped, [], [])
            raise ValueError(
                f"no readable training images: all {len(items)} failed, e.g. "
                f"{skipped[0].name}: {skipped[0].reason}"
                if skipped
                else "fit needs at least one image, got none"
            )
        return TrainingFeatures(
            store.result(), dtype, grids, names, skipped, digests, stats, pieces
        )

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
            digests=train.digests or None,  # none recorded (e.g. built by hand): None
            pixel_stats=train.stats or None,
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
        digests: Sequence[str | None] | None = None,
        pixel_stats: Sequence[Sequence[float]] | None = None,
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
            digests: the images' content digests (``train_digests_``, what the leakage guard
                of calibration and evaluation compares); None: none recorded.
            pixel_stats: the images' pixel statistics; with ``grids`` they make
                ``input_profile_``, the profile out-of-distribution hints are judged on (None:
                no hints).
            pieces: with bank augmentation, the layout of the training patches
                (:attr:`TrainingFeatures.pieces`); None: image by image, as ``grids``.

        Raises:
            ValueError: ``bank`` and ``indices`` disagree, or ``names``, ``grids``,
                ``digests`` and ``pixel_stats``.
        """
        if bank.ndim != 2 or indices.ndim != 1 or bank.shape[0] != indices.shape[0]:
            raise ValueError(
                f"bank (M, D) and indices (M,) must agree, got {tuple(bank.shape)} and "
                f"{tuple(indices.shape)}"
            )
        for what, given in (("grids", grids), ("digests", digests), ("pixel_stats", pixel_stats)):
            if given is not None and len(given) != len(names):
                raise ValueError(f"names ({len(names)}) and {what} ({len(given)}) must pair up")
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
            provenance=augmentation.origins(indices, grids, pieces),
            train_names=list(names),
            train_grids=[tuple(int(v) for v in g) for g in grids],
            train_digests=None if digests is None else list(digests),
            input_profile=(
                ood.profile([g[:2] for g in grids], pixel_stats) if pixel_stats and names else None
            ),
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
