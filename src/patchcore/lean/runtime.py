"""Torch-free runtime for exported detectors: onnxruntime (or OpenVINO) + numpy + Pillow only.

Reads a folder written by :func:`patchcore.core.export.export` (``patchcore-export.json`` plus the
graph, checked by :func:`patchcore.lean.manifest.load_export`: every field, the digest and each
file's SHA-256) and inspects images with the same decoding and resizing as the torch path
(:mod:`patchcore.lean.pixels`). Its answer is the one inspection record of
:mod:`patchcore.lean.record`, as the library's ``PatchCore.inspect``::

    from patchcore.lean.runtime import ExportedModel
    model = ExportedModel("export_dir")
    for r in model.iter_inspect(["part.png", "folder/other.png"]):
        r.verdict, r.score, r.normalized_score, r.regions, r.anomaly_map

Scores are raw distances, higher = more anomalous; the verdict comes only from
:func:`patchcore.lean.record.judge`; the regions follow it (:func:`~patchcore.lean.record.
verdict_regions`), cut at the export's region threshold. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from patchcore.lean import ood
from patchcore.lean import record as rec
from patchcore.lean.inputs import Batch, as_list, decode_input, iter_batches
from patchcore.lean.manifest import MANIFEST, ExportFileError, LoadedExport, load_export
from patchcore.lean.pixels import (
    ImageReadError,
    input_limits,
    output_size,
    read_image,
    resize_maps,
    to_chw,
)
from patchcore.lean.regions import DEFAULT_MIN_AREA

__all__ = ["BACKENDS", "MANIFEST", "ExportFileError", "ExportedModel", "open_sessions"]

BACKENDS = ("onnxruntime", "openvino")


class _Session:
    """One graph ready to run: ``run(pixels (B, 3, H, W) float32) -> (scores (B,), maps)``.

    Built from the bytes :func:`load_export` checked (never re-read from disk): ``graph`` is
    one entry of the manifest's ``graphs`` (its ONNX file, and its OpenVINO one if any).
    """

    def __init__(
        self, export: LoadedExport, graph: dict[str, Any], backend: str, threads: int | None
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
            raise ValueError(f"threads must be >= 1 (or None: all cores), got {threads!r}")
        self.backend = backend
        if backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # idle worker threads sleep instead of spinning: on a busy 2-core machine spinning
            # cost a quarter more wall time (benchmarks/RESULTS.md, "Export and runtime")
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if threads is not None:
                opts.intra_op_num_threads = int(threads)
            self._ort = ort.InferenceSession(
                export.data[graph["onnx"]], opts, providers=["CPUExecutionProvider"]
            )
            return
        try:
            import openvino as ov
        except ImportError:
            raise ExportFileError(
                "backend 'openvino' needs the openvino package: pip install openvino"
            ) from None
        core = ov.Core()
        xml = graph["openvino"]
        if xml is not None:
            model = core.read_model(export.data[xml], export.data[xml[: -len(".xml")] + ".bin"])
        else:
            model = core.read_model(export.data[graph["onnx"]])
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        self._ov = core.compile_model(model, "CPU", config)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.backend == "onnxruntime":
            scores, maps = self._ort.run(["scores", "maps"], {"pixels": x})
        else:
            res = self._ov(x)
            scores, maps = res[0], res[1]
        return np.asarray(scores), np.asarray(maps)


def open_sessions(
    export: LoadedExport | str | os.PathLike,
    *,
    backend: str | None = None,
    threads: int | None = None,
) -> dict[tuple[int, int] | None, _Session]:
    """A session per graph of an export (folder or :class:`LoadedExport`), by the processed
    size it takes (``None``: any size); ``backend`` None: OpenVINO for an OpenVINO export,
    onnxruntime otherwise."""
    if not isinstance(export, LoadedExport):
        export = load_export(export)
    graphs = export.info["graphs"]
    if backend is None:
        backend = "openvino" if graphs[0]["openvino"] else "onnxruntime"
    return {
        None if g["size"] is None else tuple(g["size"]): _Session(export, g, backend, threads)
        for g in graphs
    }


class ExportedModel:
    """An exported detector, run without torch.

    Args:
        folder: the export folder (or its manifest / graph file).
        backend: ``"onnxruntime"`` or ``"openvino"``; ``None``: by the export's format.
        threads: intra-op threads (``None``: the backend's default, all cores).
        batch_size: images per graph call (``None``: the model's ``batch_size``).

    Raises:
        ExportFileError: see :func:`patchcore.lean.manifest.load_export`.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        backend: str | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.export = load_export(folder)
        self.info = self.export.info
        self.sessions = open_sessions(self.export, backend=backend, threads=threads)
        self.backend = next(iter(self.sessions.values())).backend
        self.batch_size = int(batch_size or self.info["batch_size"])

    @property
    def threshold(self) -> float | None:
        """The verdict threshold (checked finite when read), None if never set."""
        return self.info["threshold"]

    @property
    def normalization(self) -> dict[str, Any] | None:
        """The score normalisation mapping (see :mod:`patchcore.lean.normalization`), or None."""
        return self.info["normalization"]

    @property
    def region_cut(self) -> float | None:
        """The anomaly-map value regions are cut at: the model's region threshold, else its
        threshold; None without either."""
        cut = self.info.get("region_threshold")
        return self.threshold if cut is None else cut

    @property
    def display_range(self) -> tuple[float, float] | None:
        """The heatmap colour range, by :func:`patchcore.lean.record.display_range`."""
        return rec.display_range(self.info.get("display_range"), self.threshold)

    # ------------------------------------------------------------------ records
    def iter_inspect(
        self,
        images: Any,
        *,
        regions: bool = True,
        min_area: int = DEFAULT_MIN_AREA,
        on_error: str = "skip",
    ) -> Iterator[rec.Inspection]:
        """Stream one :class:`~patchcore.lean.record.Inspection` per input, in input order,
        each with its native-size anomaly map (as ``PatchCore.iter_inspect``).

        Args:
            images: a path, PIL image or numpy array, or a list of them (anything
                :func:`patchcore.lean.inputs.as_list` takes).
            regions: cut each map into defect regions (needs a threshold).
            min_area: smallest region kept, in pixels.
            on_error: ``"skip"`` (default) gives an unreadable input an ``"error"`` record;
                ``"raise"`` stops at the first one (:class:`ImageReadError`).
        """
        threshold = self.threshold
        cut = self.region_cut if regions and threshold is not None else None
        profile = self.info.get("input_profile")  # None: no hint, no pixel statistics
        for batch in self._batches(images, on_error):
            records = [
                rec.error_record(s.name, s.index, s.reason, threshold=threshold)
                for s in batch.skipped
            ]
            if batch.pixels is not None:
                scores, maps = self.run(batch.pixels)
                stats = (
                    ood.pixel_stats(batch.pixels) if profile is not None else [None] * len(scores)
                )
                for j, i in enumerate(batch.indices):
                    records.append(
                        rec.inspection(
                            batch.names[j],
                            i,
                            float(scores[j]),
                            threshold=threshold,
                            normalization_map=self.normalization,
                            anomaly_map=resize_maps(maps[j], batch.sizes[j]),
                            region_cut=cut,
                            min_area=min_area,
                            profile=profile,
                            pixel_stats=stats[j],
                        )
                    )
            yield from sorted(records, key=lambda r: r.index)

    def inspect(self, images: Any, **kwargs: Any) -> list[rec.Inspection]:
        """``list(iter_inspect(images, **kwargs))``: one record per input, in input order."""
        return list(self.iter_inspect(images, **kwargs))

    def score_samples(self, images: Any) -> np.ndarray:
        """(N,) float64 raw scores, higher = more anomalous (no maps; unreadable inputs
        raise :class:`ImageReadError`)."""
        parts = [self.run(b.pixels)[0] for b in self._batches(images, "raise")]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)

    def anomaly_map(self, image: Any) -> np.ndarray:
        """Per-pixel anomaly map of one image, float32 HxW at the image's own size."""
        (r,) = self.inspect([image], regions=False, on_error="raise")
        if r.anomaly_map is None:
            raise FloatingPointError(f"{r.image}: {r.error}")
        return r.anomaly_map

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph on (B, 3, H, W) float32 pixels at a processed size -> (scores (B,), maps
        (B, H, W)): the fixed-size graph of that size when the export has one, else the
        export's own graph."""
        size = tuple(int(v) for v in pixels.shape[-2:])
        session = self.sessions.get(size) or next(iter(self.sessions.values()))
        return session.run(pixels)

    # ------------------------------------------------------------------ the pipeline
    def _batches(self, images: Any, on_error: str) -> Iterator[Batch]:
        """The one input pipeline (:func:`patchcore.lean.inputs.iter_batches`) at this
        export's processed sizes."""
        return iter_batches(
            as_list(images),
            batch_size=self.batch_size,
            target_size=lambda h, w: self._target("image", h, w),
            decode=self._decode,
            on_error=on_error,
        )

    def _target(self, name: str, h: int, w: int) -> tuple[int, int]:
        """The processed size of an (h, w) input; refuses sizes the graph cannot take."""
        info = self.info
        size = info["image_size"]
        target = output_size(h, w, tuple(size) if size else None, info["scale"])
        fixed = info["processed_size"]
        if fixed is not None and tuple(target) != tuple(fixed):
            raise ImageReadError(name, f"processed size {target} differs from the export's {fixed}")
        side = max(int(info["blur_radius"]), 31)
        if info["dynamic"] and min(target) <= side:
            raise ImageReadError(
                name,
                f"would be processed at {target[1]}x{target[0]}: the dynamic export needs both "
                f"sides > {side} pixels",
            )
        return target

    def _decode(self, image: Any) -> np.ndarray:
        """One input -> float32 (3, H, W); a file's processed size is checked from its header,
        before its pixels are decoded."""
        if not isinstance(image, (str, os.PathLike)):
            return decode_input(image)
        name = str(image)

        def check(h: int, w: int) -> None:
            input_limits().check_processed(name, *self._target(name, h, w))

        return to_chw(read_image(image, check_size=check), name)
