"""The PatchCore detector: a scikit-learn style estimator over a frozen CNN and a memory bank.

Scores are distances to normal patches: **higher means more anomalous** (the opposite sign of
scikit-learn's ``score_samples``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import sampling
from .anomaly_map import upsample_blur
from .backbones import FeatureExtractor, get_spec
from .embedding import embed, flatten_patches
from .images import ImageInput, output_size
from .inputs import Batch, Skipped, as_list, check_on_error, iter_batches
from .search import NearestNeighborIndex

FORMAT_NAME = "patchcore"
FORMAT_VERSION = 1


class NotFittedError(RuntimeError):
    """A method that needs a fitted (or calibrated) detector was called too early."""


class ModelFileError(ValueError):
    """A saved model file that cannot be used; the message names the file and the problem."""


class Classification(NamedTuple):
    """Output of :meth:`PatchCore.classify`.

    labels: (N,) bool, True = anomalous. scores: (N,) float. maps: N float32 arrays HxW at each
    input's own size.
    """

    labels: np.ndarray
    scores: np.ndarray
    maps: list[np.ndarray]


MapSize = str | tuple[int, int] | None
"""``None``, ``"processed"``, ``"native"`` or ``(H, W)``: see :meth:`PatchCore.iter_score`."""


class ImageResult(NamedTuple):
    """One input's outcome, yielded by :meth:`PatchCore.iter_score` in input order.

    index: position in the input. name: its path, or ``"image #<index>"``. score: higher = more
    anomalous, NaN when skipped. map: float32 HxW or None. error: None, or why it was skipped.
    """

    index: int
    name: str
    score: float
    map: np.ndarray | None
    error: str | None


@dataclass
class ScoreResult:
    """What :meth:`PatchCore.score` did.

    Attributes:
        scores: (N,) float64, higher = more anomalous; NaN for skipped inputs.
        maps: N float32 HxW arrays (None for skipped inputs), or None when no maps were asked.
        skipped: the unreadable inputs, as (index, name, reason) records.
    """

    scores: np.ndarray
    maps: list[np.ndarray | None] | None
    skipped: list[Skipped]


class PatchCore:
    """PatchCore anomaly detector (Roth et al., 2022).

    Args:
        backbone: feature extractor name (see :data:`patchcore.backbones.BACKBONES`).
        layers: tapped layers, shallow to deep; ``None`` = the backbone's default pair.
        weights: ``"imagenet"``, a local weights file, or ``None`` (random; tests only).
        image_size: resize every image to this (int = square, or (H, W)); ``None`` keeps size.
        scale: resize by this factor instead (MATLAB's reference uses 0.4).
        coreset_ratio: fraction of training patches kept in the memory bank, in (0, 1].
        sampling: ``"greedy"`` (k-center coreset) or ``"random"``.
        projection_dim: random projection size used by greedy selection; ``None`` (default)
            selects on the features themselves: on the 152-d default features the 128-d
            projection made the coverage radius ~10 % worse without being faster. Worth
            setting (e.g. 128) only for very wide features such as wide_resnet50_2's 1536-d.
        feature_dtype: ``"float16"`` (default) or ``"float32"``: how the training patch
            features are held during fit. Measured (benchmarks/bench_fit_memory.py, 1000
            casting images at 120 px, 225,000 x 152 patches): fit's peak memory above its
            start is 1.23x the float32 feature bytes with float16, 1.72x with float32 (4.32x
            before the memory-lean fit). The memory bank is float32 either way, its rows then
            rounded to float16 precision (casting, 40 train / 100 test images: image AUROC
            0.882 with both). Features beyond float16's range (|x| > 65504) switch the store
            to float32 with a warning.
        backbone_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: the precision
            the backbone runs in (features are float32 either way; search stays float32).
            bfloat16 is opt-in: on CPUs with AMX (Sapphire Rapids) it made the extractor
            1.5-2x faster, with features 3-6 % of their range away from float32's
            (benchmarks/bench_scoring.py; AUROC effect in benchmarks/RESULTS.md).
        num_neighbors: neighbours for the paper's image-score reweighting; 1 disables it.
        embed_dim: optional smaller patch dimension (channel averaging).
        kernel_size: local neighbourhood averaged into each patch feature.
        sigma: Gaussian blur of anomaly maps, in processed-image pixels.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: makes fitting reproducible bit for bit.
        progress: show progress bars.
    """

    def __init__(
        self,
        *,
        backbone: str = "efficientnet-lite0",
        layers: Sequence[str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        scale: float | None = None,
        coreset_ratio: float = 0.1,
        sampling: str = "greedy",
        projection_dim: int | None = None,
        feature_dtype: str = "float16",
        backbone_dtype: str = "float32",
        num_neighbors: int = 9,
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
        self.coreset_ratio = coreset_ratio
        self.sampling = sampling
        self.projection_dim = projection_dim
        self.feature_dtype = feature_dtype
        self.backbone_dtype = backbone_dtype
        self.num_neighbors = num_neighbors
        self.embed_dim = embed_dim
        self.kernel_size = kernel_size
        self.sigma = sigma
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.progress = progress

    # ------------------------------------------------------------------ parameters

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as given."""
        return {
            k: getattr(self, k)
            for k in (
                "backbone",
                "layers",
                "weights",
                "image_size",
                "scale",
                "coreset_ratio",
                "sampling",
                "projection_dim",
                "feature_dtype",
                "backbone_dtype",
                "num_neighbors",
                "embed_dim",
                "kernel_size",
                "sigma",
                "batch_size",
                "device",
                "seed",
                "progress",
            )
        }

    def _validate(self) -> None:
        get_spec(self.backbone)
        if not (isinstance(self.coreset_ratio, (int, float)) and 0 < self.coreset_ratio <= 1):
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}")
        if self.feature_dtype not in _FEATURE_DTYPES:
            raise ValueError(
                f"feature_dtype must be 'float16' or 'float32', got {self.feature_dtype!r}"
            )
        if self.backbone_dtype not in _BACKBONE_DTYPES:
            raise ValueError(
                "backbone_dtype must be 'float32', 'bfloat16' or 'float16', got "
                f"{self.backbone_dtype!r}"
            )
        if self.projection_dim is not None and int(self.projection_dim) < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {self.projection_dim!r}")
        if self.sampling not in ("greedy", "random"):
            raise ValueError(f"sampling must be 'greedy' or 'random', got {self.sampling!r}")
        if self.image_size is not None and self.scale is not None:
            raise ValueError("give image_size or scale, not both")
        if self.scale is not None and not (0 < self.scale <= 4):
            raise ValueError(f"scale must be in (0, 4], got {self.scale!r}")
        if self.image_size is not None:
            sizes = (
                (self.image_size,) if isinstance(self.image_size, int) else tuple(self.image_size)
            )
            if len(sizes) not in (1, 2) or any(int(s) < 32 for s in sizes):
                raise ValueError(
                    f"image_size must be an int or (H, W), each >= 32, got {self.image_size!r}"
                )
        if int(self.num_neighbors) < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {self.num_neighbors!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size!r}")

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

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
        self.device_ = self._device()
        self.extractor_ = FeatureExtractor(
            self.backbone, self.layers, self.weights, dtype=_BACKBONE_DTYPES[self.backbone_dtype]
        ).to(self.device_)
        self.layers_ = tuple(self.extractor_.layers)
        t0 = time.perf_counter()
        skipped: list[Skipped] = []
        store = _FeatureStore(len(items), _FEATURE_DTYPES[self.feature_dtype])
        for batch in self._batches(items, on_error, progress, "fit: features"):
            skipped += batch.skipped
            if batch.pixels is not None:
                rows = flatten_patches(self._embed(batch.pixels)).float().cpu()
                store.add(rows, len(batch.indices))
        if store.overflow:
            warnings.warn(
                "training features exceed float16's range (|x| > 65504): stored in float32 "
                "instead (feature_dtype='float32' avoids the switch)",
                UserWarning,
                stacklevel=2,
            )
        if store.rows == 0:
            raise ValueError(
                f"no readable training images: all {len(items)} failed, e.g. "
                f"{skipped[0].name}: {skipped[0].reason}"
            )
        features = store.result()
        del store
        t1 = time.perf_counter()
        idx = self._select_bank(features, progress)
        self.memory_bank_ = features[idx].float().contiguous()
        self.n_train_patches_ = int(features.shape[0])
        del features
        t2 = time.perf_counter()
        self.n_train_images_ = len(items) - len(skipped)
        self.skipped_ = [(s.name, s.reason) for s in skipped]
        self.feature_seconds_ = t1 - t0
        self.coreset_seconds_ = t2 - t1
        self.fit_seconds_ = t2 - t0
        self.threshold_: float | None = None
        self.threshold_method_: str | None = None
        self.metadata_: dict[str, Any] = {}
        self._index = NearestNeighborIndex(self.memory_bank_.to(self.device_))
        _warn_skipped("fit skipped {n} unreadable image(s)", skipped)
        return self

    def _select_bank(self, features: torch.Tensor, progress: bool) -> torch.Tensor:
        """Indices of the training patches kept in the memory bank (the coreset step)."""
        n = sampling.coreset_size(features.shape[0], self.coreset_ratio)
        if self.coreset_ratio >= 1:
            return torch.arange(features.shape[0])
        if self.sampling == "greedy":
            return sampling.greedy_coreset(
                features, n, projection_dim=self.projection_dim, seed=self.seed, progress=progress
            )
        return sampling.random_subsample(features.shape[0], n, seed=self.seed)

    # ------------------------------------------------------------------ internals

    def _check_fitted(self, what: str = "this method") -> None:
        if not hasattr(self, "memory_bank_"):
            raise NotFittedError(
                f"this PatchCore is not fitted yet; call fit(normal_images) or "
                f"PatchCore.load(path) before {what}"
            )

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
        patches = flatten_patches(emb).float()
        k = min(int(self.num_neighbors), self.memory_bank_.shape[0])
        # distances only: the nearest index is looked up for each image's worst patch alone
        patch_scores = self._index.min_distances(patches).view(b, h * w)
        image_scores, arg = patch_scores.max(dim=1)
        if k > 1:
            image_scores = self._reweight(patches.view(b, h * w, -1), arg, image_scores, k)
        out: list[np.ndarray] = []
        if maps is not None:
            H, W = batch.pixels.shape[-2:]
            up = upsample_blur(patch_scores.view(b, 1, h, w), (H, W), self.sigma)
            for j, size in enumerate(batch.sizes):
                m = up[j : j + 1]
                want = (H, W) if maps == "processed" else size if maps == "native" else maps
                if tuple(want) != (H, W):
                    m = torch.nn.functional.interpolate(
                        m, size=tuple(want), mode="bilinear", align_corners=False
                    )
                out.append(m[0, 0].cpu().numpy().astype(np.float32, copy=False))
        return image_scores.double().cpu().numpy(), out

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
        bank = self.memory_bank_.to(worst.device)
        nearest = bank[self._index.search(worst, k=1)[1][:, 0]]  # (B, D) m*, its nearest row
        _, support = self._index.search(nearest, k=k)  # (B, k) neighbours of m*
        d = torch.linalg.vector_norm(worst[:, None, :] - bank[support], dim=-1)  # (B, k)
        weights = 1.0 - torch.softmax(d, dim=1)[:, 0]
        return weights * scores

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
        maps = _check_maps(maps)
        items = as_list(images)
        progress = self.progress if progress is None else bool(progress)
        return self._stream(items, maps, on_error, progress)

    def _stream(
        self, items: list[Any], maps: MapSize, on_error: str, progress: bool
    ) -> Iterator[ImageResult]:
        for batch in self._batches(items, on_error, progress, "score"):
            results = [
                ImageResult(s.index, s.name, math.nan, None, s.reason) for s in batch.skipped
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
        results = list(stream)
        return ScoreResult(
            scores=np.array([r.score for r in results], dtype=np.float64),
            maps=None if maps is None else [r.map for r in results],
            skipped=[Skipped(r.index, r.name, r.error) for r in results if r.error is not None],
        )

    def _scored(
        self, images: Any, maps: MapSize, on_error: str, progress: bool | None
    ) -> ScoreResult:
        """:meth:`score`, warning about skipped inputs (the older methods' behaviour)."""
        result = self.score(images, maps=maps, on_error=on_error, progress=progress)
        _warn_skipped("{n} unreadable image(s) scored as NaN", result.skipped, stacklevel=4)
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

    def _check_threshold(self, what: str) -> float:
        self._check_fitted(what)
        if getattr(self, "threshold_", None) is None:
            raise NotFittedError(
                f"no threshold set; call calibrate(images, labels) or set_threshold(value) "
                f"before {what}"
            )
        return float(self.threshold_)  # type: ignore[arg-type]

    def predict(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> np.ndarray:
        """Verdicts, True = anomalous (score >= ``threshold_``). (N,) bool."""
        t = self._check_threshold("predict")
        return self._scored(images, None, on_error, progress).scores >= t

    def classify(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> Classification:
        """Verdicts, scores and anomaly maps (at each input's own size) in one pass."""
        t = self._check_threshold("classify")
        r = self._scored(images, "native", on_error, progress)
        return Classification(r.scores >= t, r.scores, r.maps)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ threshold

    def set_threshold(self, value: float, method: str = "manual") -> PatchCore:
        """Set ``threshold_`` by hand."""
        self._check_fitted("set_threshold")
        if not math.isfinite(float(value)):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        self.threshold_ = float(value)
        self.threshold_method_ = method
        return self

    def calibrate(
        self,
        images: Any,
        labels: Iterable[int | bool],
        *,
        method: str = "max_f1",
        max_fpr: float | None = None,
        max_fnr: float | None = None,
        scores: np.ndarray | None = None,
    ) -> PatchCore:
        """Choose ``threshold_`` on labelled images (1/True = anomalous).

        ``scores`` may be given to reuse already computed scores of ``images``.
        """
        from .metrics import anomaly_threshold

        self._check_fitted("calibrate")
        y = np.asarray(list(labels)).astype(int)
        s = self.score_samples(images) if scores is None else np.asarray(scores, dtype=float)
        if len(s) != len(y):
            raise ValueError(f"{len(s)} images but {len(y)} labels")
        ok = np.isfinite(s)
        self.threshold_ = float(
            anomaly_threshold(y[ok], s[ok], method=method, max_fpr=max_fpr, max_fnr=max_fnr)
        )
        self.threshold_method_ = method
        return self

    # ------------------------------------------------------------------ persistence

    def config(self) -> dict[str, Any]:
        """JSON-able configuration written into saved files."""
        self._check_fitted("config")
        p = self.get_params()
        p["layers"] = list(self.layers_)
        p["weights"] = None if self.weights is None else str(self.weights)
        if isinstance(p["image_size"], tuple):
            p["image_size"] = list(p["image_size"])
        p["mean"] = list(self.extractor_.mean)
        p["std"] = list(self.extractor_.std)
        p["device"] = self.device if self.device != "cuda" else "auto"
        # Fit-time only, and unknown to older readers' constructor: saved in "state" instead.
        p.pop("feature_dtype", None)
        if p["backbone_dtype"] == "float32":  # the default: files stay readable by older versions
            p.pop("backbone_dtype")
        return p

    def card(self) -> dict[str, Any]:
        """Human-readable facts about the fitted model (for reports and the service)."""
        self._check_fitted("card")
        return {
            "backbone": self.backbone,
            "layers": list(self.layers_),
            "image_size": self.image_size,
            "scale": self.scale,
            "coreset_ratio": self.coreset_ratio,
            "sampling": self.sampling,
            "num_neighbors": self.num_neighbors,
            "backbone_dtype": self.backbone_dtype,
            "training_images": self.n_train_images_,
            "bank_size": int(self.memory_bank_.shape[0]),
            "feature_dim": int(self.memory_bank_.shape[1]),
            "threshold": self.threshold_,
            "threshold_method": self.threshold_method_,
            "fit_seconds": round(float(self.fit_seconds_), 3),
            "format_version": FORMAT_VERSION,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write one file: tensors plus a versioned config (``torch.load(weights_only=True)``)."""
        self._check_fitted("save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self.config(),
            "memory_bank": self.memory_bank_.cpu(),
            "backbone_state": {k: v.cpu() for k, v in self.extractor_.state_dict().items()},
            "state": {
                "threshold": self.threshold_,
                "threshold_method": self.threshold_method_,
                "n_train_images": self.n_train_images_,
                "n_train_patches": self.n_train_patches_,
                "feature_seconds": self.feature_seconds_,
                "coreset_seconds": self.coreset_seconds_,
                "fit_seconds": self.fit_seconds_,
                "feature_dtype": self.feature_dtype,
                "metadata": self.metadata_,
            },
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> PatchCore:
        """Load a detector written by :meth:`save` (safe: no pickled code is executed)."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such model file")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(
                f"{path}: not a readable patchcore model file (damaged or another format: "
                f"{type(exc).__name__})"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise ModelFileError(f"{path}: not a patchcore model file")
        version = payload.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: written by a newer patchcore (model format {version}); this version "
                f"reads format {FORMAT_VERSION} and older: upgrade patchcore"
            )
        try:
            cfg = dict(payload["config"])
            state = payload["state"]
            bank = payload["memory_bank"]
            backbone_state = payload["backbone_state"]
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"{path}: incomplete model file (missing {exc})") from None
        for k in ("mean", "std"):
            cfg.pop(k, None)
        if isinstance(cfg.get("image_size"), list):
            cfg["image_size"] = tuple(cfg["image_size"])
        if device is not None:
            cfg["device"] = device
        try:
            det = cls(**cfg)
            det._validate()
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: invalid model configuration ({exc})") from None
        det.device_ = det._device()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # weights come from the file, not from weights=None
            ext = FeatureExtractor(
                det.backbone,
                cfg["layers"],
                weights=None,
                dtype=_BACKBONE_DTYPES[det.backbone_dtype],
            )
        try:
            ext.load_state_dict(backbone_state)
        except RuntimeError as exc:
            raise ModelFileError(f"{path}: backbone tensors do not fit ({exc})") from None
        det.extractor_ = ext.to(det.device_)
        det.layers_ = tuple(ext.layers)
        det.memory_bank_ = bank.float().contiguous()
        det.threshold_ = state["threshold"]
        det.threshold_method_ = state["threshold_method"]
        det.n_train_images_ = state["n_train_images"]
        det.n_train_patches_ = state["n_train_patches"]
        det.feature_seconds_ = state["feature_seconds"]
        det.coreset_seconds_ = state["coreset_seconds"]
        det.fit_seconds_ = state["fit_seconds"]
        det.feature_dtype = str(state.get("feature_dtype", "float32"))  # older files: float32
        det.metadata_ = dict(state.get("metadata") or {})
        det.skipped_ = []
        det._index = NearestNeighborIndex(det.memory_bank_.to(det.device_))
        return det

    def __repr__(self) -> str:
        fitted = (
            f", fitted: bank {tuple(self.memory_bank_.shape)}"
            if hasattr(self, "memory_bank_")
            else ", not fitted"
        )
        return (
            f"PatchCore(backbone={self.backbone!r}, image_size={self.image_size!r}, "
            f"scale={self.scale!r}, coreset_ratio={self.coreset_ratio!r}{fitted})"
        )


_FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_BACKBONE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class _FeatureStore:
    """Collects patch features in ``dtype`` without a second full copy at the end.

    While every image yields the same number of patches (fixed ``image_size``), rows go into one
    buffer preallocated for all images; otherwise chunks are kept and concatenated once. A float16
    store that receives a value beyond float16's range converts itself to float32 (once; the
    rows already stored are exact in float32) and sets ``overflow``.
    """

    def __init__(self, n_images: int, dtype: torch.dtype = torch.float32) -> None:
        self.n_images = n_images
        self.dtype = dtype
        self.overflow = False
        self.buffer: torch.Tensor | None = None
        self.per_image: int | None = None
        self.chunks: list[torch.Tensor] = []
        self.rows = 0

    def _widen(self) -> None:
        """Switch a float16 store to float32 (a value would overflow float16)."""
        self.overflow = True
        self.dtype = torch.float32
        if self.buffer is not None:
            self.buffer = self.buffer.float()
        self.chunks = [c.float() for c in self.chunks]

    def add(self, rows: torch.Tensor, n_images: int) -> None:
        if self.dtype == torch.float16 and rows.numel() and float(rows.abs().amax()) > _FLOAT16_MAX:
            self._widen()
        rows = rows.to(self.dtype)
        per_image = rows.shape[0] // n_images
        if self.buffer is None and not self.chunks:
            self.per_image = per_image
            self.buffer = torch.empty(self.n_images * per_image, rows.shape[1], dtype=rows.dtype)
        if self.buffer is not None and per_image != self.per_image:  # sizes vary: fall back
            self.chunks = [self.buffer[: self.rows]]
            self.buffer = None
        if self.buffer is not None:
            self.buffer[self.rows : self.rows + rows.shape[0]] = rows
        else:
            self.chunks.append(rows)
        self.rows += rows.shape[0]

    def result(self) -> torch.Tensor:
        if self.buffer is not None:
            return self.buffer[: self.rows]
        return torch.cat(self.chunks)


def _check_maps(maps: MapSize) -> MapSize:
    if maps is None or maps in ("processed", "native"):
        return maps
    if (
        isinstance(maps, (tuple, list))
        and len(maps) == 2
        and all(isinstance(v, (int, np.integer)) and v >= 1 for v in maps)
    ):
        return (int(maps[0]), int(maps[1]))
    raise ValueError(
        f"maps must be None, 'processed', 'native' or (height, width) in pixels, got {maps!r}"
    )


def _warn_skipped(message: str, skipped: list[Skipped], stacklevel: int = 3) -> None:
    """The one warning about unreadable inputs; ``message`` has an ``{n}`` field."""
    if skipped:
        warnings.warn(
            message.format(n=len(skipped))
            + ": "
            + "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""),
            UserWarning,
            stacklevel=stacklevel,
        )
