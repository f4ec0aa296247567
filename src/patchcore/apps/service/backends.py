"""What the service scores with: the :class:`Backend` protocol and its two implementations.

- :class:`~patchcore.apps.service.torch_backend.TorchBackend`: a fitted
  :class:`~patchcore.core.detector.PatchCore` (a ``.pt`` model file), records from
  :meth:`PatchCore.iter_inspect`; explains. Imported only when it is built, so this package
  loads without torch.
- :class:`RuntimeBackend`: an export folder scored by the torch-free
  :class:`~patchcore.lean.runtime.ExportedModel` (onnxruntime or OpenVINO).

Both return :class:`patchcore.lean.record.Inspection` records, so the routes, limits, token,
readiness and errors above them are one service (``patchcore serve MODEL.pt`` and
``patchcore-run serve EXPORT_DIR`` differ only in the backend).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from patchcore.lean import record
from patchcore.lean.pixels import output_size
from patchcore.lean.runtime import MANIFEST, ExportedModel

__all__ = [
    "Backend",
    "ExplainUnavailableError",
    "RuntimeBackend",
    "is_backend",
    "open_backend",
    "status_of",
]

#: Grey image the backends warm up on (and check for a finite score).
WARM_UP_SIDE = 256


class ExplainUnavailableError(NotImplementedError):
    """The backend cannot explain a score (the export has no memory-bank provenance)."""


class Backend(Protocol):
    """A fitted model the service can score with.

    ``load()`` runs once in a worker thread at start-up (read, check finite, warm up; it
    raises to keep the service unready); everything else is called after it succeeded.
    ``inspect`` and ``explain`` run in the worker threads, never on the event loop.
    """

    #: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``: named in every answer.
    kind: str
    #: The model file or export folder, when there is one (its name goes in the card).
    path: Path | None

    def load(self) -> None: ...

    @property
    def threshold(self) -> float: ...

    def stored_display_range(self) -> tuple[float, float] | None:
        """The colour range chosen at calibration, if the model holds one."""
        ...

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) an image of this size is scored at (its ``image_size`` / ``scale``)."""
        ...

    def inspect(self, images: list[tuple[str, np.ndarray]]) -> list[record.Inspection]:
        """One record per (name, pixels), in order, each with its native-size anomaly map;
        ``index`` is the position in ``images``. An image it cannot read is an ``error``
        record with no size; a non-finite score an ``error`` record with its size."""
        ...

    def explain(self, name: str, image: np.ndarray) -> tuple[record.Inspection, dict[str, Any]]:
        """One image's record (no map) and why it scored so: ``distance``, the
        ``worst_patch`` and ``nearest`` boxes, ``note`` (empty for an error record); raises
        :class:`ExplainUnavailableError` when the backend cannot."""
        ...

    def card(self) -> dict[str, Any]:
        """Facts about the model: at least ``backbone``, ``image_size``, ``scale``,
        ``bank_size``, ``threshold_method``."""
        ...


def status_of(rec: record.Inspection) -> int:
    """The HTTP status of one record: 200 with a verdict, 400 for an image the backend could
    not read (an error record without a size), 500 for one it read but could not judge."""
    if rec.verdict != record.ERROR:
        return 200
    return 400 if rec.width is None else 500


def warm_up_image(backend: Backend) -> np.ndarray:
    """A mid-grey image of the backend's own processed size (or 256 x 256)."""
    h, w = backend.processed_size(WARM_UP_SIDE, WARM_UP_SIDE)
    return np.full((h, w, 3), 128, np.uint8)


def check_warm_up(backend: Backend) -> None:
    """Score :func:`warm_up_image`; raise unless the score is finite (a model that holds
    NaN/inf never becomes ready)."""
    [rec] = backend.inspect([("warm-up", warm_up_image(backend))])
    if rec.score is None or not math.isfinite(rec.score):
        raise ValueError(f"the warm-up image scored {rec.score!r}: {rec.error}")


class RuntimeBackend:
    """An export folder, scored torch-free by :class:`~patchcore.lean.runtime.ExportedModel`.

    Args:
        export: the folder written by ``patchcore export`` (or an :class:`ExportedModel`). It
            must hold a threshold (set it before exporting): there is no override here.
        engine: ``"onnxruntime"`` or ``"openvino"`` (None: by the export's format).
        threads: the engine's intra-op threads (None: its default).
    """

    def __init__(
        self,
        export: str | os.PathLike | ExportedModel,
        *,
        engine: str | None = None,
        threads: int | None = None,
    ) -> None:
        self._engine, self._threads = engine, threads
        self._loaded = False
        self.model: ExportedModel | None = None
        self.path: Path | None = None
        if isinstance(export, ExportedModel):
            self.model = export
            self._check()
        else:
            self.path = Path(export)
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no such export folder")
        self.kind = self.model.backend if self.model is not None else (engine or "onnxruntime")

    def _check(self) -> None:
        if self.threshold is None:
            raise ValueError(
                f"{self.path or 'the export'}: has no threshold, so it cannot give verdicts; "
                "calibrate the model and export it again"
            )

    def load(self) -> None:
        """Open the export (manifest, digests, engine session), warm up; once."""
        if self._loaded:
            return
        if self.model is None:
            self.model = ExportedModel(
                self.path, backend=self._engine, threads=self._threads, batch_size=None
            )
            self.kind = self.model.backend
            self._check()
        check_warm_up(self)
        self._loaded = True

    @property
    def threshold(self) -> float:
        assert self.model is not None
        return record.check_threshold(self.model.threshold, "the export's threshold")  # type: ignore[return-value]

    def _info(self) -> dict[str, Any]:
        assert self.model is not None
        return self.model.info

    def stored_display_range(self) -> tuple[float, float] | None:
        stored = self._info().get("display_range")
        return None if stored is None else (float(stored[0]), float(stored[1]))

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        size = self._info().get("image_size")
        return output_size(height, width, tuple(size) if size else None, self._info().get("scale"))

    def region_cut(self) -> float:
        """Where regions are cut: the export's region threshold, else the verdict threshold
        (as :meth:`PatchCore.region_cut`)."""
        cut = self._info().get("region_threshold")
        return self.threshold if cut is None else float(cut)

    def inspect(self, images: list[tuple[str, np.ndarray]]) -> list[record.Inspection]:
        assert self.model is not None
        records = self.model.inspect([a for _, a in images], on_error="skip")
        return [replace(r, image=name) for r, (name, _) in zip(records, images, strict=True)]

    def explain(self, name: str, image: np.ndarray) -> tuple[record.Inspection, dict[str, Any]]:
        raise ExplainUnavailableError(
            "explain needs the model file (patchcore serve MODEL.pt): an export has no "
            "memory-bank provenance"
        )

    def card(self) -> dict[str, Any]:
        info = {k: v for k, v in self._info().items() if not k.startswith("_")}
        size = info.get("image_size")
        return {
            **info,
            "image_size": size[0] if size and len(set(size)) == 1 else size,
            "bank_size": info.get("bank_rows"),
            "patchcore_version": info.get("package_version"),
        }


def _is_export(path: Path) -> bool:
    return path.is_dir() or path.name == MANIFEST or path.suffix in (".onnx", ".xml")


def is_backend(obj: Any) -> bool:
    """Whether ``obj`` implements :class:`Backend` (checked on its class, so no property of
    an unloaded backend is evaluated)."""
    names = ("kind", "load", "inspect", "explain", "processed_size", "stored_display_range", "card")
    return all(hasattr(type(obj), n) or n == "kind" and hasattr(obj, n) for n in names)


def open_backend(model: Any, *, threshold: float | None = None, **runtime: Any) -> Backend:
    """The backend for ``model``: a :class:`Backend` as it is; a ``PatchCore`` or a model
    file (``.pt``) -> the torch backend (torch imported now); an :class:`ExportedModel` or an
    export folder -> :class:`RuntimeBackend` (``runtime``: its ``engine`` / ``threads``).

    Raises:
        FileNotFoundError: no such file or folder.
        TypeError: ``threshold`` given with a ready-made backend or an export, or runtime
            options for the torch backend.
    """
    if is_backend(model):
        if threshold is not None or runtime:
            raise TypeError("give the threshold and options to the backend itself")
        return model
    if isinstance(model, ExportedModel) or (
        isinstance(model, (str, os.PathLike)) and _is_export(Path(model))
    ):
        if threshold is not None:
            raise TypeError("an export's threshold is fixed at export: calibrate and export again")
        return RuntimeBackend(model, **runtime)
    if runtime:
        raise TypeError(f"options {sorted(runtime)} are for an export folder, not a model file")
    torch_backend = importlib.import_module("patchcore.apps.service.torch_backend")
    return torch_backend.TorchBackend(model, threshold=threshold)
