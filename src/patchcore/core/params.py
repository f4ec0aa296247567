"""Estimator parameters read from ``__init__``'s signature, as ``sklearn.base.BaseEstimator`` does.

A class whose ``__init__`` takes keyword arguments and stores each one unchanged under its own
name gets ``get_params``, ``set_params`` and a ``repr`` listing the non-default values, with the
parameter list written once: in the signature.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BACKBONE_DTYPE_NAMES",
    "BACKBONE_NAMES",
    "FEATURE_DTYPE_NAMES",
    "FIT_PARAMS",
    "OFFLINE_BACKBONES",
    "PRECISIONS",
    "SAMPLINGS",
    "SCORE_PARAMS",
    "SETTINGS",
    "ParamsMixin",
    "PatchCoreParams",
    "check_settable",
]

#: Parameters that shape the memory bank (what is extracted, kept and how): fixed once fitted.
FIT_PARAMS = (
    "backbone",
    "layers",
    "weights",
    "image_size",
    "scale",
    "augment",
    "coreset_ratio",
    "max_bank_size",
    "sampling",
    "projection_dim",
    "feature_dtype",
    "backbone_dtype",
    "embed_dim",
    "kernel_size",
    "seed",
)
#: Parameters that change what a score or a map means (the image score's rule, the maps' blur):
#: free on a fitted model, fixed once a threshold (image or region) was chosen with them.
SCORE_PARAMS = ("top_k", "num_neighbors", "sigma")
#: Scoring settings: settable at any time, effective at the next call.
SETTINGS = ("batch_size", "device", "progress", "search_precision")

# The values string parameters accept, by name, without torch (the command line's choices). The
# registries that implement them are keyed by these (tests/test_cli_startup.py holds them equal).
#: Backbones that work offline (weights shipped by packages).
OFFLINE_BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
#: Keys of :data:`patchcore.core.backbones.BACKBONES`.
BACKBONE_NAMES = ("resnet18", "resnet50", "wide_resnet50_2", *OFFLINE_BACKBONES)
#: Keys of :data:`patchcore.core.backbones.BACKBONE_DTYPES`.
BACKBONE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Keys of :data:`patchcore.core.embedding.FEATURE_DTYPES`.
FEATURE_DTYPE_NAMES = ("float16", "float32")
#: Precisions of the bank search (``search_precision`` also takes ``"auto"``).
PRECISIONS = ("float32", "bfloat16", "int8")
#: Bank selection methods (``sampling``).
SAMPLINGS = ("greedy", "greedy_exact", "random")


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``__repr__`` from the signature of ``__init__``."""

    @classmethod
    def _param_names(cls) -> list[str]:
        """Keyword parameters of ``__init__``, in signature order."""
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as given."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Any:
        """Set constructor arguments by name.

        Learned state is not updated; an estimator may refuse changes its fitted state does
        not allow (PatchCore: :func:`check_settable`).

        Returns:
            self
        """
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; valid parameters: "
                    + ", ".join(valid)
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        changed = [
            f"{k}={v!r}"
            for k, v in self.get_params().items()
            if not _same(v, defaults.get(k, inspect.Parameter.empty))
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


class PatchCoreParams(ParamsMixin):
    """The parameters of :class:`patchcore.PatchCore` (its ``__init__`` is this one's): listed
    once, here, without torch, so that :mod:`patchcore.apps.cli` derives ``fit``'s options from
    this signature and docstring without loading the estimator.

    Args:
        backbone: feature extractor name (see :data:`patchcore.core.backbones.BACKBONES`).
        layers: tapped layers, shallow to deep; ``None`` = the backbone's default pair.
        weights: ``"imagenet"``, a local weights file, or ``None`` (random; tests only).
        image_size: resize every image to this (int = square, or (H, W)); ``None`` keeps size.
        scale: resize by this factor instead (MATLAB's reference uses 0.4).
        augment: ``None`` (default), ``"flips"`` or ``"rot90"``: also put the patches of each
            training image mirrored (left-right and up-down: 3x the training patches) or
            turned by quarter turns (4x) into the coreset's input; test images are scored as
            they are (:mod:`patchcore.core.augment`; for which parts it pays:
            benchmarks/RESULTS.md, "Leads of issue #23").
        coreset_ratio: fraction of training patches kept in the memory bank, in (0, 1]; the
            default 0.01 was measured against the exact greedy (benchmarks/RESULTS.md,
            "Defaults on full data").
        max_bank_size: cap on the memory bank's rows (``None``: no cap). The default 16,384
            leaves the shared sets' 1 % banks alone and caps deeppcb's, where a larger bank
            cost time without gaining accuracy (benchmarks/RESULTS.md).
        sampling: ``"greedy"`` (default: the k-center coreset in time linear in the number of
            patches, :func:`patchcore.core.sampling.chunked_greedy_coreset`), ``"greedy_exact"``
            (the exact greedy k-center, :func:`patchcore.core.sampling.greedy_coreset`: same
            quality, but its time grows with patches x bank rows and depends on the data) or
            ``"random"``.
        projection_dim: random projection size used by ``"greedy_exact"``; ``None`` (default)
            selects on the features themselves; a projection is worth it only for very wide
            features such as wide_resnet50_2's 1536-d (benchmarks/RESULTS.md).
        search_precision: ``"auto"`` (default), ``"float32"``, ``"bfloat16"`` or ``"int8"``:
            the precision of the scan against the memory bank. ``"auto"`` picks int8 on CPUs
            with native int8 dot products (AVX-512 VNNI, AVX-VNNI or AMX), else bfloat16 on
            CPUs with native bfloat16 ones (AVX-512 BF16 or AMX), else float32 (GPUs too).
            Image scores are exact in every precision (patches that could hold an image's
            top scores are re-checked in float32); map values are, with int8, the float32
            distance to the bank row the scan found (the nearest one for most patches, never
            below it), with bfloat16 the scan's estimate within its error bound (see
            :mod:`patchcore.core.search`; rates and errors in benchmarks/RESULTS.md).
        feature_dtype: ``"float16"`` (default) or ``"float32"``: how training patch features
            are held during fit (float16 lowers fit's peak memory,
            benchmarks/bench_fit_memory.py); the bank is float32 either way. Features beyond
            float16's range (|x| > 65504) switch the store to float32 with a warning.
        backbone_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: the precision
            the backbone runs in (features and search stay float32). bfloat16 is opt-in: faster
            with AMX, features a few per cent of their range off (benchmarks/bench_scoring.py,
            benchmarks/RESULTS.md).
        num_neighbors: neighbours for the paper's image-score reweighting; 1 disables it.
        top_k: the image score is the mean of the ``top_k`` largest patch distances (each
            re-checked in float32); 1 = the paper's score, the largest reweighted by eq. 7
            (``num_neighbors``; not applied when ``top_k > 1``); the rule is
            :func:`patchcore.core.scoring.image_scores`. Why 10: benchmarks/RESULTS.md,
            "Accuracy search".
        embed_dim: optional smaller patch dimension (channel averaging).
        kernel_size: local neighbourhood averaged into each patch feature.
        sigma: Gaussian blur of anomaly maps, in processed-image pixels.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: makes fitting reproducible bit for bit.
        progress: show progress bars (every method also takes a per-call ``progress``).
    """

    def __init__(
        self,
        *,
        backbone: str = "efficientnet-lite2",
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


def check_settable(det: Any, params: dict[str, Any]) -> None:
    """Refuse (``ValueError``) a change of a :data:`FIT_PARAMS` parameter on a fitted
    estimator, or of a :data:`SCORE_PARAMS` one once a threshold exists; the message names the
    parameter and what to do. Setting a parameter to its current value is always allowed."""
    state = getattr(det, "state_", None)
    if state is None:
        return
    name = type(det).__name__
    for key, value in params.items():
        if _same(value, getattr(det, key, inspect.Parameter.empty)):
            continue
        if key in FIT_PARAMS:
            raise ValueError(
                f"{key} is fixed by fit: this {name} was fitted with {key}="
                f"{getattr(det, key)!r}, and set_params({key}={value!r}) would score against a "
                f"bank built without it; fit again ({name}(**{{**det.get_params(), {key!r}: "
                "...}).fit(images)) or use a new estimator"
            )
        thresholds = (state.threshold, state.region_threshold)
        if key in SCORE_PARAMS and any(t is not None for t in thresholds):
            raise ValueError(
                f"{key} changes what a score or map means, and this {name}'s threshold was "
                f"chosen with {key}={getattr(det, key)!r}; call clear_threshold() first, then "
                f"set_params({key}={value!r}) and calibrate again (or use a new estimator)"
            )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - e.g. arrays: show them
        return False
