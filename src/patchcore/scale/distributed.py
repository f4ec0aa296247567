"""Scale-out on Ray: batch scoring of stored images into Parquet, and a fit across workers.

:func:`batch_score` scores a list of stored images with a pool of Ray actors (Ray Data's
``map_batches`` over blocks of paths); each actor loads the model once, from bytes sent through
the object store and checked against the driver's SHA-256, and scores its blocks with
:meth:`PatchCore.iter_score` -- the single-process library's own scoring, so the scores are
the library's. The driver writes one Parquet file per finished block (a temporary name, then a
rename), keyed by the absolute path: a re-run with the same output folder skips the paths
already written, a crash loses only unfinished blocks, and a block retried after a worker died
is written once. The output folder is a Parquet dataset (``pyarrow.dataset.dataset(out)``).

:func:`fit_distributed` extracts training features on the workers (contiguous shards of the
training images) and runs :func:`patchcore.core.sampling.chunked_greedy_coreset`'s three stages
across them: stage 1 (a greedy per chunk of rows) on each worker's own rows, the union's greedy
on the driver, and the repair scan (every row's distance to the picks) on the workers again,
each sending only its farthest rows. With one worker the bank is the single-process fit's.

Ray is an optional dependency (``pip install 'patchcore[ray]'``); this module imports it only
when a function here is called.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore.core import sampling
from patchcore.core.images import IMAGE_SUFFIXES, list_images

__all__ = [
    "BatchError",
    "BatchSummary",
    "DistributedFit",
    "batch_schema",
    "batch_score",
    "fit_distributed",
    "list_sources",
    "read_results",
]

ProgressFn = Callable[[int], None]


class BatchError(ValueError):
    """Bad input to a batch job (no images, a foreign output folder...); names the culprit."""


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BatchError(
            "Ray is not installed: pip install 'patchcore[ray]' (ray[data] and pyarrow)"
        ) from None
    return ray


def _pa() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.dataset  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise BatchError("pyarrow is not installed: pip install 'patchcore[ray]'") from None
    return pa


# ---------------------------------------------------------------------------------- the output


def _schema() -> Any:
    pa = _pa()
    return pa.schema(
        [
            ("path", pa.string()),  # absolute local path or the URI as given: the row's key
            ("score", pa.float64()),  # higher = more anomalous; null for an error row
            ("verdict", pa.string()),  # anomalous | normal | error; null without a threshold
            ("map_max", pa.float32()),  # anomaly map maximum (map at the image's own size)
            ("map_y", pa.int32()),  # its row and column in the image's own pixels
            ("map_x", pa.int32()),
            ("height", pa.int32()),  # the image's own size
            ("width", pa.int32()),
            ("error", pa.string()),  # why the image could not be scored; null otherwise
            ("model_digest", pa.string()),  # SHA-256 of the model file's bytes
            ("heatmap", pa.string()),  # overlay PNG path, when asked
            ("worker", pa.string()),  # host:pid of the process that scored the row
        ]
    )


def batch_schema() -> Any:
    """The ``pyarrow.Schema`` of a batch job's rows (one row per input)."""
    return _schema()


def read_results(out: str | os.PathLike, columns: list[str] | None = None) -> Any:
    """The table a batch job wrote to ``out`` (a ``pyarrow.Table``; empty if nothing yet).

    Args:
        out: the output folder.
        columns: read only these (default: all of :func:`batch_schema`).
    """
    pa = _pa()
    out = Path(out)
    if not out.is_dir() or not any(out.glob("*.parquet")):
        empty = _schema().empty_table()
        return empty.select(columns) if columns else empty
    try:
        ds = pa.dataset.dataset(out, format="parquet", schema=_schema())
        return ds.to_table(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise BatchError(f"{out}: holds a damaged or foreign Parquet file ({exc})") from None


def _done(out: Path, digest: str) -> set[str]:
    """Paths already written to ``out`` by this model; BatchError if another model wrote it."""
    table = read_results(out, ["path", "model_digest"])
    if table.num_rows == 0:
        return set()
    digests = set(table.column("model_digest").unique().to_pylist())
    if digests != {digest}:
        other = sorted(str(d) for d in digests - {digest})[0]
        raise BatchError(
            f"{out}: holds results of another model (digest {other[:12]}...): give a new --out "
            "folder, or remove it to re-score"
        )
    return set(table.column("path").to_pylist())


def _write_part(out: Path, table: Any) -> Path:
    """One Parquet file for one finished block: written under a hidden name, then renamed."""
    pq = _pa().parquet
    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = out / f".{name}.tmp"  # dot-prefixed: pyarrow.dataset ignores it
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out / name


# ---------------------------------------------------------------------------------- the inputs


def _is_uri(s: str) -> bool:
    return "://" in s


def _key(path: str) -> str:
    """The row key of an input: its absolute local path, or a URI as given.

    Absolute and normalised (``..`` and ``.`` removed) but symbolic links are not followed: two
    links to one file are two inputs, each named in the output as it was listed.
    """
    return path if _is_uri(path) else os.path.abspath(os.path.expanduser(path))


def _read_list(spec: str) -> list[str]:
    """The paths in a ``.txt`` (one per line, ``#`` comments) or ``.parquet`` list file."""
    pa = _pa()
    from pyarrow import fs as pafs

    if _is_uri(spec):
        filesystem, where = pafs.FileSystem.from_uri(spec)
    else:
        filesystem, where = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))
    try:
        if spec.lower().endswith(".parquet"):
            table = pa.parquet.read_table(where, filesystem=filesystem)
            if "path" not in table.column_names:
                raise BatchError(
                    f"{spec}: a Parquet list needs a 'path' column, has {table.column_names}"
                )
            paths = [p for p in table.column("path").to_pylist() if p]
        else:
            with filesystem.open_input_stream(where) as f:
                text = f.read().decode("utf-8")
            lines = (ln.strip() for ln in text.splitlines())
            paths = [ln for ln in lines if ln and not ln.startswith("#")]
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise BatchError(f"{spec}: cannot read the list of paths ({exc})") from None
    # relative paths in a local list are relative to the list's folder
    base = None if _is_uri(spec) else Path(where).parent
    return [p if _is_uri(p) or base is None else str(base / Path(p).expanduser()) for p in paths]


def list_sources(sources: Sequence[str | os.PathLike], *, recursive: bool = False) -> list[str]:
    """Folders, globs, list files and image paths -> the inputs, each once, in order.

    Args:
        sources: each a folder (its images), a glob (``"/data/**/*.png"``), a ``.txt`` list
            (one path per line) or a ``.parquet`` list (a ``path`` column), local or a URI
            any pyarrow filesystem opens (``s3://``, ``gs://``, ``file://``...), or an image
            path (kept even if missing: it becomes an error row).
        recursive: also list sub-folders of folders.

    Returns:
        row keys (absolute local paths, URIs as given), duplicates dropped.

    Raises:
        BatchError: a folder without images, a glob matching nothing, an unreadable list, or
            no input at all.
    """
    found: list[str] = []
    for src in map(str, sources):
        low = src.lower()
        p = Path(src).expanduser()
        if low.endswith((".txt", ".parquet")):
            found += _read_list(src)
        elif _is_uri(src):
            found.append(src)
        elif p.is_dir():
            images = list_images(p, recursive=recursive)
            if not images:
                raise BatchError(f"{p}: no images found ({', '.join(IMAGE_SUFFIXES)})")
            found += map(str, images)
        elif glob.has_magic(src):
            matches = sorted(glob.glob(str(p), recursive=True))
            matches = [m for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise BatchError(f"{src}: the pattern matches no image")
            found += matches
        else:
            found.append(src)
    keys = list(dict.fromkeys(_key(f) for f in found))
    if not keys:
        raise BatchError("no images given")
    return keys


# ---------------------------------------------------------------------------------- the workers


def _file_digest(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _load_from_bytes(data: bytes, digest: str, device: str | None) -> Any:
    """A detector from a model file's bytes, refused unless they hash to ``digest``."""
    from patchcore.core.detector import PatchCore

    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise BatchError(f"model bytes arrived damaged (SHA-256 {got[:12]}..., not {digest[:12]})")
    with tempfile.TemporaryDirectory(prefix="patchcore-model-") as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(data)
        return PatchCore.load(path, device=device)


def _heatmap_name(key: str) -> str:
    """A file name unique to the input (its stem plus a hash of its key): retries overwrite."""
    stem = Path(key.rsplit("/", 1)[-1]).stem or "image"
    return f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:12]}_heatmap.png"


class _Scorer:
    """A Ray Data actor: loads the model once, scores blocks of paths into result rows."""

    def __init__(
        self,
        model: list[Any],
        digest: str,
        threshold: float | None,
        heatmaps: str | None,
        threads: int,
        device: str | None,
    ) -> None:
        import ray

        torch.set_num_threads(int(threads))
        # model: [ObjectRef of the file's bytes] (a list, so Ray hands the reference over and
        # the bytes stay in the object store, owned by the driver, for restarted actors too)
        self.det = _load_from_bytes(ray.get(model[0]), digest, device)
        self.digest = digest
        self.threshold = threshold if threshold is not None else self.det.threshold_
        self.heatmaps = Path(heatmaps) if heatmaps else None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        if self.heatmaps is not None:
            self.heatmaps.mkdir(parents=True, exist_ok=True)

    def _item(self, key: str) -> Any:
        """What the detector reads for ``key``: the path, or a URI's decoded pixels."""
        if not _is_uri(key):
            return key
        from pyarrow import fs as pafs

        from patchcore.core.images import input_limits
        from patchcore.lean.decode import decode_bytes

        filesystem, where = pafs.FileSystem.from_uri(key)
        with filesystem.open_input_stream(where) as f:
            data = f.read()
        lim = input_limits()  # the limits read_image applies to local files
        return decode_bytes(
            data, name=key, max_pixels=lim.max_pixels, max_aspect_ratio=lim.max_aspect_ratio
        )

    def __call__(self, batch: Any) -> Any:
        """``batch``: a pyarrow table of ``paths`` lists -> one result row per path, in order."""
        from patchcore.core.images import ImageReadError

        keys = [k for block in batch.column("paths").to_pylist() for k in block]
        rows = [dict.fromkeys(_schema().names) for _ in keys]
        items: list[Any] = []
        where: list[int] = []
        for i, key in enumerate(keys):
            rows[i].update(path=key, model_digest=self.digest, worker=self.worker)
            try:
                items.append(self._item(key))
                where.append(i)
            except ImageReadError as exc:
                rows[i].update(verdict="error", error=exc.problem)
            except (OSError, ValueError) as exc:  # the URI's file system: missing, no access
                rows[i].update(verdict="error", error=f"cannot read: {exc}")
        maps = "native"
        for r in self.det.iter_score(items, maps=maps, on_error="skip", progress=False):
            row = rows[where[r.index]]
            if r.error is not None:
                row.update(verdict="error", error=r.error)
                continue
            if not math.isfinite(r.score):  # fail closed: no verdict on a non-finite score
                row.update(verdict="error", error=f"scored {r.score!r}: the model is not finite")
                continue
            m = r.map
            y, x = np.unravel_index(int(np.argmax(m)), m.shape)
            row.update(
                score=float(r.score),
                map_max=float(m[y, x]),
                map_y=int(y),
                map_x=int(x),
                height=int(m.shape[0]),
                width=int(m.shape[1]),
            )
            if self.threshold is not None:
                row["verdict"] = "anomalous" if r.score >= self.threshold else "normal"
            if self.heatmaps is not None:
                row["heatmap"] = self._heatmap(row["path"], items[r.index], m)
        return _pa().Table.from_pylist(rows, schema=_schema())

    def _heatmap(self, key: str, item: Any, amap: np.ndarray) -> str:
        from patchcore.apps import plots
        from patchcore.apps.workflow.model import display_range
        from patchcore.core.images import read_image

        pixels = read_image(item) if isinstance(item, str) else item
        overlay = plots.anomaly_map_overlay(pixels, amap, display_range(self.det), 0.5)
        assert self.heatmaps is not None
        path = self.heatmaps / _heatmap_name(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        plots.save_png(overlay, tmp)  # then renamed: a killed worker leaves no half PNG
        os.replace(tmp, path)
        return str(path)


@dataclass
class BatchSummary:
    """What :func:`batch_score` did.

    Attributes:
        out: the Parquet dataset folder.
        inputs: distinct inputs listed.
        already_done: of them, written by an earlier run (skipped).
        written: rows written by this run (scored and error rows).
        errors: error rows among them.
        anomalous: rows with the verdict "anomalous" among them.
        parts: Parquet files written by this run.
        seconds: wall time of the scoring (model load and actor start included).
        workers: actors in the pool.
        model_digest: SHA-256 of the model file.
    """

    out: Path
    inputs: int
    already_done: int
    written: int
    errors: int
    anomalous: int
    parts: int
    seconds: float
    workers: int
    model_digest: str

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


class _Session:
    """Joins Ray at ``address``, or starts a local Ray; shuts down only what it started."""

    def __init__(self, address: str | None, num_cpus: int, object_store_memory: int | None):
        self.ray = _ray()
        self.started = False
        if self.ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address:
            self.ray.init(address=address, **kwargs)
        else:
            self.ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, **kwargs)
        self.started = True

    def __enter__(self) -> Any:
        return self.ray

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()


def batch_score(
    model: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int = 2,
    address: str | None = None,
    threshold: float | None = None,
    heatmaps: str | os.PathLike | None = None,
    block_size: int = 256,
    threads_per_worker: int = 1,
    recursive: bool = False,
    device: str | None = "cpu",
    gpus_per_worker: float = 0.0,
    object_store_memory: int | None = None,
    progress: ProgressFn | None = None,
    total: ProgressFn | None = None,
) -> BatchSummary:
    """Score stored images on Ray into a Parquet dataset at ``out``, resuming what is there.

    Args:
        model: model file written by ``PatchCore.save`` (read on the driver, sent to every
            actor through the object store and checked against its SHA-256 there).
        sources: folders, globs, ``.txt`` / ``.parquet`` lists or image paths (see
            :func:`list_sources`).
        out: output folder: one Parquet file per finished block, schema :func:`_schema`.
        workers: actors in the pool (each loads the model once).
        address: ``"auto"`` or ``"ray://host:10001"`` joins a cluster; ``None`` starts a
            local Ray with ``workers * threads_per_worker`` CPUs (or uses the Ray already
            initialised in this process).
        threshold: verdict threshold instead of the model's; without either the verdict is
            null.
        heatmaps: folder for an overlay PNG per image (a shared folder on a cluster).
        block_size: images per block (one Ray task and one Parquet file), rounded up to a
            multiple of the model's ``batch_size`` so that a fresh run batches images as one
            single-process ``score`` call does (its scores are then equal bit for bit; where
            batches differ -- a resumed run, images of several sizes -- or the torch
            thread count differs -- the convolutions may sum in another order: scores within
            float32 rounding, see benchmarks/RESULTS.md); a crash loses at most
            the blocks in flight.
        threads_per_worker: torch threads (and Ray CPUs) per actor.
        recursive: also list sub-folders of folder sources.
        device: where the actors compute (``"cpu"``, ``"cuda"``, ``None`` = as saved).
        gpus_per_worker: GPUs Ray reserves per actor (with ``device="cuda"``).
        object_store_memory: bytes of object store for a local Ray (Ray's default if None).
        progress: called with the number of rows each finished block added.
        total: called once with the number of rows this run will write.

    Returns:
        :class:`BatchSummary`.

    Raises:
        BatchError: no inputs, an output folder written by another model, Ray missing.
        ModelFileError: the model file cannot be used.
    """
    from patchcore.core.detector import PatchCore

    if workers < 1 or threads_per_worker < 1 or block_size < 1:
        raise BatchError(
            f"workers, threads_per_worker and block_size must be >= 1, got {workers}, "
            f"{threads_per_worker}, {block_size}"
        )
    model = Path(model)
    # fail here, naming the file, not in every actor
    per_batch = int(PatchCore.load(model, device="cpu").batch_size)
    block_size = -(-int(block_size) // per_batch) * per_batch
    data, digest = _file_digest(model)
    keys = list_sources(sources, recursive=recursive)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out, digest)
    todo = [k for k in keys if k not in done]
    if total is not None:
        total(len(todo))
    t0 = time.perf_counter()
    written = errors = anomalous = parts = 0
    if todo:
        pa = _pa()
        with _Session(address, workers * threads_per_worker, object_store_memory) as ray:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            # one row per block of paths: a Ray task (and a Parquet part) scores one block
            blocks = [
                {"paths": todo[lo : lo + block_size]} for lo in range(0, len(todo), block_size)
            ]
            ds = ray.data.from_items(blocks, override_num_blocks=len(blocks)).map_batches(
                _Scorer,
                fn_constructor_args=(
                    [ray.put(data)],
                    digest,
                    threshold,
                    None if heatmaps is None else str(Path(heatmaps).resolve()),
                    threads_per_worker,
                    device,
                ),
                batch_size=1,  # one block of paths per call: the library batches inside it
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=threads_per_worker,
                num_gpus=gpus_per_worker or None,
            )
            seen = set(done)
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                fresh = [k not in seen for k in table.column("path").to_pylist()]
                if not all(fresh):  # a block retried after its first result arrived
                    table = table.filter(pa.array(fresh))
                if table.num_rows == 0:
                    continue
                _write_part(out, table)
                parts += 1
                seen.update(table.column("path").to_pylist())
                written += table.num_rows
                verdicts = table.column("verdict").to_pylist()
                errors += verdicts.count("error")
                anomalous += verdicts.count("anomalous")
                if progress is not None:
                    progress(table.num_rows)
    return BatchSummary(
        out=out,
        inputs=len(keys),
        already_done=len(keys) - len(todo),
        written=written,
        errors=errors,
        anomalous=anomalous,
        parts=parts,
        seconds=time.perf_counter() - t0,
        workers=workers,
        model_digest=digest,
    )


# ---------------------------------------------------------------------------------- the fit


class _FitShard:
    """One worker's share of a distributed fit: its images' features and its coreset work."""

    def __init__(self, params: dict[str, Any], threads: int) -> None:
        from patchcore.core.backbones import BACKBONE_DTYPES, FeatureExtractor, resolve_device
        from patchcore.core.detector import PatchCore

        torch.set_num_threads(int(threads))
        self.det = PatchCore(**params)
        self.det._validate()
        self.det.device_ = resolve_device(self.det.device)
        self.det.extractor_ = FeatureExtractor(
            self.det.backbone,
            self.det.layers,
            self.det.weights,
            dtype=BACKBONE_DTYPES[self.det.backbone_dtype],
        ).to(self.det.device_)
        self.x: torch.Tensor | None = None
        self.upper: torch.Tensor | None = None

    def extract(self, items: list[Any], offset: int) -> dict[str, Any]:
        """Features of ``items`` (input positions from ``offset``), as ``PatchCore.fit``."""
        from patchcore.core.embedding import FEATURE_DTYPES, FeatureStore, flatten_patches
        from patchcore.core.inputs import Skipped

        det = self.det
        skipped: list[Skipped] = []
        store = FeatureStore(len(items), FEATURE_DTYPES[det.feature_dtype])
        for batch in det._batches(items, "skip", False, "fit: features"):
            skipped += [Skipped(s.index + offset, s.name, s.reason) for s in batch.skipped]
            if batch.pixels is not None:
                rows = flatten_patches(det._embed(batch.pixels)).float().cpu()
                store.add(rows, len(batch.indices))
        self.x = store.result() if store.rows else torch.empty(0, 0)
        return {
            "rows": int(store.rows),
            "skipped": [tuple(x) for x in skipped],  # plain tuples: Ray returns them as such
            "overflow": store.overflow,
            "dtype": str(store.dtype).removeprefix("torch."),
            "layers": tuple(det.extractor_.layers),
        }

    def features(self) -> torch.Tensor:
        assert self.x is not None
        return self.x

    def chunk_select(self, keep: float, chunk_rows: int, starts: list[int]) -> tuple:
        """Stage 1 on this shard: (local indices, their rows) of every chunk's greedy picks."""
        assert self.x is not None
        out = []
        with sampling._OneThread():
            for j, lo in enumerate(range(0, self.x.shape[0], chunk_rows)):
                part = self.x[lo : lo + chunk_rows]
                m = max(1, math.ceil(part.shape[0] * keep))
                out.append(lo + sampling._greedy_naive(part, m, starts[j]))
        idx = torch.cat(out) if out else torch.empty(0, dtype=torch.long)
        return idx, self.x[idx]

    def repair_scan(self, bank: torch.Tensor, size: int) -> tuple:
        """Stage 3's scan: every row's upper bound on its squared distance to ``bank``;
        returns the ``size`` largest (values, local indices, rows)."""
        from patchcore.core.search import NearestNeighborIndex, resolve_precision

        assert self.x is not None
        index = NearestNeighborIndex(bank, precision=resolve_precision("auto", bank.device))
        num = self.x.shape[0]
        upper = torch.empty(num)
        step = 16384
        for lo in range(0, num, step):
            d2, err = index.min_sq_bounded(self.x[lo : lo + step])
            upper[lo : lo + step] = d2.add_(err)
        self.upper = upper
        vals, rows = torch.topk(upper, min(num, size))
        return vals, rows, self.x[rows]

    def doubtful(self, taken: torch.Tensor, radius2: float) -> tuple[int, float]:
        """Rows not taken whose bound exceeds ``radius2``: (count, largest bound)."""
        assert self.upper is not None
        self.upper[taken] = -1.0
        doubt = self.upper > radius2
        count = int(doubt.sum())
        return count, float(self.upper.max()) if count else -1.0

    def recheck(self, final: torch.Tensor, radius2: float) -> float:
        """Largest exact squared distance from a doubtful row to the final bank."""
        from patchcore.core.search import NearestNeighborIndex

        assert self.x is not None and self.upper is not None
        doubt = (self.upper > radius2).nonzero().squeeze(1)
        if doubt.numel() == 0:
            return -1.0
        return float(NearestNeighborIndex(final).min_distances(self.x[doubt]).max()) ** 2


@dataclass
class DistributedFit:
    """What :func:`fit_distributed` did.

    Attributes:
        detector: the fitted :class:`~patchcore.core.detector.PatchCore`.
        coverage_radius: largest distance from a training patch to its nearest bank row, as
            :class:`~patchcore.core.sampling.CoresetSelection` certifies it (0 when every patch is
            kept; NaN when the bank came from the single-process selection on gathered rows).
        shard_rows: training patches per worker.
        seconds: wall time (actor start included).
    """

    detector: Any
    coverage_radius: float
    shard_rows: list[int] = field(default_factory=list)
    seconds: float = 0.0


def fit_distributed(
    images: Any,
    *,
    workers: int = 2,
    address: str | None = None,
    threads_per_worker: int = 1,
    object_store_memory: int | None = None,
    shards: Sequence[Any] | None = None,
    **params: Any,
) -> DistributedFit:
    """Fit a :class:`~patchcore.core.detector.PatchCore` with its features and coreset on workers.

    The images (paths the workers can read) are cut into ``workers`` contiguous shards. Each
    worker extracts its shard's features; the coreset is
    :func:`~patchcore.core.sampling.chunked_greedy_coreset` split across them (module docstring):
    the chunk starts come from one seeded generator in chunk order and the union's start after
    them, as in the single-process call, so one worker gives the single-process bank. Unreadable
    images are skipped (listed in ``skipped_``, with the usual warning). Only ``sampling=
    "greedy"`` is distributed; ``"greedy_exact"`` and ``"random"`` (and small sets whose stage
    1 would keep every row) gather the features on the driver and select there.

    Args:
        images: paths (or anything ``PatchCore.fit`` takes that Ray can send).
        workers: actors (shards).
        address: as :func:`batch_score`.
        threads_per_worker: torch threads (and Ray CPUs) per actor.
        object_store_memory: as :func:`batch_score`.
        shards: already-built shard objects (``_FitShard`` or Ray handles); tests only.
        **params: PatchCore parameters (``progress`` is ignored).

    Returns:
        :class:`DistributedFit`.
    """
    from patchcore.core.detector import PatchCore
    from patchcore.core.inputs import as_list

    params.pop("progress", None)
    det = PatchCore(**params, progress=False)
    det._validate()
    if det.augment is not None:  # the shards extract the images as they are
        raise ValueError(
            f"augment={det.augment!r} is not supported on Ray yet; fit on one machine instead"
        )
    items = as_list(images)
    if not items:
        raise ValueError("fit needs at least one image, got none")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    if shards is not None:
        return _fit_on(det, items, list(shards), _local_call, t0)
    with _Session(address, workers * threads_per_worker, object_store_memory) as ray:
        actor = ray.remote(num_cpus=threads_per_worker, max_restarts=0)(_FitShard)
        handles = [actor.remote(det.get_params(), threads_per_worker) for _ in range(workers)]

        def call(objs: list[Any], method: str, args: list[tuple]) -> list[Any]:
            return ray.get([getattr(o, method).remote(*a) for o, a in zip(objs, args, strict=True)])

        try:
            return _fit_on(det, items, handles, call, t0)
        finally:
            for h in handles:
                ray.kill(h)


def _local_call(objs: list[Any], method: str, args: list[tuple]) -> list[Any]:
    return [getattr(o, method)(*a) for o, a in zip(objs, args, strict=True)]


def _fit_on(
    det: Any,
    items: list[Any],
    shards: list[Any],
    call: Callable[[list[Any], str, list[tuple]], list[Any]],
    t0: float,
) -> DistributedFit:
    """The distributed fit on ``shards`` (``call`` runs a method on each, in parallel)."""
    from patchcore.core.backbones import BACKBONE_DTYPES, FeatureExtractor
    from patchcore.core.inputs import Skipped, warn_skipped
    from patchcore.core.state import FittedState

    w = len(shards)
    bounds = np.linspace(0, len(items), w + 1).round().astype(int)
    info = call(
        shards, "extract", [(items[bounds[k] : bounds[k + 1]], int(bounds[k])) for k in range(w)]
    )
    rows = [i["rows"] for i in info]
    skipped = [Skipped(*s) for i in info for s in i["skipped"]]
    num = sum(rows)
    if num == 0:
        first = skipped[0]
        raise ValueError(
            f"no readable training images: all {len(items)} failed, e.g. "
            f"{first.name}: {first.reason}"
        )
    if any(i["overflow"] for i in info):
        warnings.warn(
            "training features exceed float16's range (|x| > 65504): stored in float32 "
            "instead (feature_dtype='float32' avoids the switch)",
            UserWarning,
            stacklevel=3,
        )
    t1 = time.perf_counter()
    n = sampling.coreset_size(num, det.coreset_ratio)
    if det.max_bank_size is not None:
        n = min(n, int(det.max_bank_size))
    keep = min(1.0, 10.0 * n / num)  # chunked_greedy_coreset's default oversample
    live = [k for k in range(w) if rows[k]]
    if n >= num or det.sampling != "greedy" or keep >= 1.0:
        bank, radius = _gathered_bank(det, [shards[k] for k in live], n, num, call)
    else:
        bank, radius = _sharded_coreset(det, shards, live, rows, n, keep, call)
    t2 = time.perf_counter()
    state = FittedState(
        memory_bank=bank,
        layers=tuple(info[0]["layers"]),
        n_train_images=len(items) - len(skipped),
        n_train_patches=num,
        feature_dtype="float32" if any(i["dtype"] == "float32" for i in info) else "float16",
        feature_seconds=t1 - t0,
        coreset_seconds=t2 - t1,
        fit_seconds=t2 - t0,
        skipped=sorted(skipped),
    )
    extractor = FeatureExtractor(
        det.backbone, det.layers, det.weights, dtype=BACKBONE_DTYPES[det.backbone_dtype]
    )
    det._set_fitted(state, extractor)
    warn_skipped("fit skipped {n} unreadable image(s)", state.skipped)
    return DistributedFit(det, radius, rows, time.perf_counter() - t0)


def _gathered_bank(
    det: Any,
    objs: list[Any],
    n: int,
    num: int,
    call: Callable[[list[Any], str, list[tuple]], list[Any]],
) -> tuple[torch.Tensor, float]:
    """Every shard's features on the driver, selected as the single-process fit does."""
    feats = torch.cat(call(objs, "features", [()] * len(objs)))
    if n >= num:
        return feats.float().contiguous(), 0.0
    if det.sampling == "greedy":
        sel = sampling.chunked_greedy_coreset(feats, n, seed=det.seed)
        return feats[sel.indices].float().contiguous(), sel.radius
    return feats[det._select_bank(feats, False)].float().contiguous(), math.nan


def _sharded_coreset(
    det: Any,
    shards: list[Any],
    live: list[int],
    rows: list[int],
    n: int,
    keep: float,
    call: Callable[[list[Any], str, list[tuple]], list[Any]],
) -> tuple[torch.Tensor, float]:
    """:func:`~patchcore.core.sampling.chunked_greedy_coreset` across shards: (bank, radius)."""
    chunk_rows, repair_fraction = 2048, 0.1  # the single-process defaults
    objs = [shards[k] for k in live]
    gen = torch.Generator().manual_seed(det.seed)
    starts = [
        [
            int(torch.randint(min(chunk_rows, rows[k] - lo), (1,), generator=gen).item())
            for lo in range(0, rows[k], chunk_rows)
        ]
        for k in live
    ]
    picks = call(objs, "chunk_select", [(keep, chunk_rows, s) for s in starts])
    union_rows = torch.cat([r for _, r in picks])
    num = sum(rows)
    if union_rows.shape[0] == num:  # stage 1 kept every row: the exact search, on the driver
        return _gathered_bank(det, objs, n, num, call)
    n_repair = min(int(round(repair_fraction * n)), num - n)
    start = int(torch.randint(union_rows.shape[0], (1,), generator=gen).item())
    picked = sampling._greedy_batched(union_rows, n - n_repair, start)
    picked_rows = union_rows[picked]
    bank = picked_rows.float()
    size = min(num, max(1, 20 * n_repair))
    scans = call(objs, "repair_scan", [(bank, size)] * len(objs))
    vals = torch.cat([v for v, _, _ in scans])
    owner = torch.cat([torch.full((v.numel(),), j) for j, (v, _, _) in enumerate(scans)])
    local = torch.cat([r for _, r, _ in scans])
    cand = torch.cat([x for _, _, x in scans])
    if len(objs) > 1:  # the global top rows among every shard's top rows
        top = torch.topk(vals, min(size, vals.numel())).indices
        owner, local, cand = owner[top], local[top], cand[top]
    from patchcore.core.search import NearestNeighborIndex, resolve_precision

    index = NearestNeighborIndex(bank, precision=resolve_precision("auto", bank.device))
    z = cand.float()
    u2 = index.exact_min_distances(z).double().square().float()
    extra = sampling._continue_greedy(z, u2, n_repair)
    final = torch.cat([picked_rows.float(), z[torch.tensor(extra, dtype=torch.long)]])
    radius2 = float(u2.max())
    taken = [local[owner == j] for j in range(len(objs))]
    doubts = call(objs, "doubtful", [(taken[j], radius2) for j in range(len(objs))])
    count = sum(c for c, _ in doubts)
    if count > sampling._RECHECK_ROWS:
        radius2 = max(radius2, max(u for _, u in doubts))
    elif count:
        radius2 = max(radius2, *call(objs, "recheck", [(final, radius2)] * len(objs)))
    return final.contiguous(), math.sqrt(radius2)
