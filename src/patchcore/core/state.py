"""What fitting learns, in one typed object: :class:`FittedState`.

``PatchCore.fit`` builds it, :mod:`patchcore.core.persistence` writes and reads it, and the model
card
is made from it. The detector's familiar attributes (``memory_bank_``, ``threshold_``, ...) are
views of it (:class:`FittedAttributes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from patchcore.core.inputs import Skipped

__all__ = ["FittedAttributes", "FittedState", "NotFittedError"]


class NotFittedError(RuntimeError):
    """A method that needs a fitted (or calibrated) detector was called too early."""


@dataclass
class FittedState:
    """The learned state of a PatchCore detector.

    Attributes:
        memory_bank: (M, D) float32 on the CPU: the kept training patch features.
        layers: the backbone layers tapped, shallow to deep.
        n_train_images: training images read.
        n_train_patches: training patches before the coreset step.
        feature_dtype: ``"float16"`` or ``"float32"``: how the training features were held
            (``"float32"`` also when a float16 store overflowed and widened).
        feature_seconds: time to extract the training features.
        coreset_seconds: time of the coreset step.
        fit_seconds: both together.
        threshold: the verdict threshold (score >= threshold = anomalous), None until set.
        threshold_method: how ``threshold`` was chosen (``"max_f1"``, ``"conformal"``,
            ``"manual"``, ...).
        calibration: facts of that choice, JSON-able, or None: for ``"conformal"`` the
            requested false-alarm rate and the held-out normal images it rests on
            (``max_fpr``, ``n``, ``rank``, ``fpr_bounds``, ``calibration_fpr``); for a labelled
            calibration ``n_normal``, ``n_anomalous`` and the bounds asked.
        normalization: the mapping of raw scores onto [0, 1] with ``threshold`` at 0.5
            (:mod:`patchcore.lean.normalization`), set with every threshold; None without one.
        region_threshold: the anomaly-map threshold defect regions are cut at (chosen on
            images with masks by ``calibrate_regions``); None: ``threshold x map_scale``.
        region_threshold_method: how ``region_threshold`` was chosen.
        map_scale: median of ``map_max / score`` over the calibration images, which carries
            ``threshold`` onto the anomaly map's scale for the default region cut
            (:mod:`patchcore.core.calibration`); None when never calibrated on images (the
            cut is then ``threshold``).
        display_range: the heatmap colour range ``(lo, hi)`` chosen on the calibration maps;
            None: the rule's fallback (:func:`patchcore.lean.record.display_range`).
        metadata: plain JSON-able facts a caller stores with the model (data spec, names...).
        skipped: training inputs that could not be read (not saved).
        provenance: (M, 3) int32, per bank row the training image index (into
            ``train_names``), patch row and patch column on that image's feature grid; None in
            files written before it existed.
        train_names: the training images read, in order (their paths as given, or
            ``"image #i"`` for in-memory images, i = the training image index); None in older
            files.
        train_grids: per training image ``(H, W, h, w)``: its own size and its feature grid.
        updates: one record per :meth:`~patchcore.PatchCore.partial_fit` (UTC time, images and
            patches added, bank rows added and dropped, seconds, names), oldest first.
        train_digests: per training image (as ``train_names``, updates included) the content
            digest of :mod:`patchcore.lean.fingerprints` (``"file:<sha256>"`` of a file's
            bytes, ``"pixels:<sha256>"`` of an in-memory image); None in older files.
        input_profile: what the training inputs looked like (sizes, aspect, grey or colour,
            intensity; after a calibration the map reference of its normal images), the
            profile of :mod:`patchcore.lean.ood` that out-of-distribution hints are judged
            on; None in older files (no hints).
        threshold_history: one entry per threshold installed, oldest first, the one in use
            last (:func:`patchcore.core.calibration.history_entry`: UTC time, method, value,
            counts, the caller's data, split seed and warnings).
    """

    memory_bank: torch.Tensor
    layers: tuple[str, ...]
    n_train_images: int
    n_train_patches: int
    feature_dtype: str
    feature_seconds: float
    coreset_seconds: float
    fit_seconds: float
    threshold: float | None = None
    threshold_method: str | None = None
    calibration: dict[str, Any] | None = None
    normalization: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    region_threshold: float | None = None
    region_threshold_method: str | None = None
    map_scale: float | None = None
    display_range: tuple[float, float] | None = None
    skipped: list[Skipped] = field(default_factory=list)
    provenance: torch.Tensor | None = None
    train_names: list[str] | None = None
    train_grids: list[tuple[int, int, int, int]] | None = None
    updates: list[dict[str, Any]] = field(default_factory=list)
    train_digests: list[str | None] | None = None
    input_profile: dict[str, Any] | None = None
    threshold_history: list[dict[str, Any]] = field(default_factory=list)

    def card(self, params: dict[str, Any]) -> dict[str, Any]:
        """Human-readable facts about the model fitted with ``params``."""
        card = {
            "backbone": params["backbone"],
            "layers": list(self.layers),
            "image_size": params["image_size"],
            "scale": params["scale"],
            "coreset_ratio": params["coreset_ratio"],
            "sampling": params["sampling"],
            "num_neighbors": params["num_neighbors"],
            "top_k": params["top_k"],
            "backbone_dtype": params["backbone_dtype"],
            "training_images": self.n_train_images,
            "bank_size": int(self.memory_bank.shape[0]),
            "feature_dim": int(self.memory_bank.shape[1]),
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "calibration": self.calibration,
            "normalization": self.normalization,
            "fit_seconds": round(float(self.fit_seconds), 3),
            "provenance": self.provenance is not None,
            "updates": len(self.updates),
            "thresholds": len(self.threshold_history),
        }
        if self.region_threshold is not None:
            card["region_threshold"] = self.region_threshold
            card["region_threshold_method"] = self.region_threshold_method
        if self.map_scale is not None:
            card["map_scale"] = self.map_scale
        if self.display_range is not None:
            card["display_range"] = list(self.display_range)
        return card


def _view(name: str, doc: str, settable: bool = False) -> property:
    def get(self: Any) -> Any:
        return getattr(self.state_, name)

    def put(self: Any, value: Any) -> None:
        setattr(self.state_, name, value)

    return property(get, put if settable else None, doc=doc)


class FittedAttributes:
    """scikit-learn style learned attributes, read from ``self.state_`` (a FittedState).

    Before fitting, reading any of them raises ``AttributeError`` (``hasattr`` is False).
    """

    state_: FittedState

    memory_bank_ = _view("memory_bank", "(M, D) float32 memory bank on the CPU.")
    layers_ = _view("layers", "Tapped backbone layers.")
    n_train_images_ = _view("n_train_images", "Training images read.")
    n_train_patches_ = _view("n_train_patches", "Training patches before the coreset step.")
    feature_seconds_ = _view("feature_seconds", "Feature extraction time of fit, seconds.")
    coreset_seconds_ = _view("coreset_seconds", "Coreset time of fit, seconds.")
    fit_seconds_ = _view("fit_seconds", "Time of fit, seconds.")
    threshold_ = _view("threshold", "Verdict threshold, None until set.", settable=True)
    threshold_method_ = _view("threshold_method", "How it was chosen.", settable=True)
    metadata_ = _view("metadata", "Facts stored with the model (JSON-able).", settable=True)
    region_threshold_ = _view(
        "region_threshold", "Map threshold of defect regions, None: threshold_.", settable=True
    )
    feature_dtype_ = _view("feature_dtype", "How the training features were held in fit.")
    calibration_ = _view("calibration", "Facts of the threshold's choice (dict), or None.")
    normalization_ = _view("normalization", "Raw -> [0, 1] score mapping (dict), or None.")
    provenance_ = _view("provenance", "(M, 3) int32 bank-row origins (image, row, col), or None.")
    train_names_ = _view("train_names", "Training images read, in order, or None.")
    updates_ = _view("updates", "Records of the partial_fit calls, oldest first.")
    map_scale_ = _view("map_scale", "Map max / score at calibration (region cut), or None.")
    train_digests_ = _view("train_digests", "Content digests of the training images, or None.")
    input_profile_ = _view("input_profile", "The training inputs' profile (lean.ood), or None.")
    threshold_history_ = _view("threshold_history", "Every threshold installed, oldest first.")

    display_range_ = _view(
        "display_range",
        "Heatmap colour range (lo, hi) chosen at calibration, or None; every surface draws "
        "with record.display_range(display_range_, threshold_).",
    )

    @property
    def skipped_(self) -> list[tuple[str, str]]:
        """Unreadable training inputs as (name, reason) pairs."""
        return [(s.name, s.reason) for s in self.state_.skipped]

    def _check_fitted(self, what: str = "this method") -> None:
        if not hasattr(self, "state_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(normal_images) or "
                f"{type(self).__name__}.load(path) before {what}"
            )
