"""Batch scoring of stored images on Ray into a Parquet dataset: one inspection record a row.

:func:`batch_score` lists the inputs (:func:`~patchcore.scale.sources.list_sources`), cuts the
ones not yet written into blocks and scores them on a pool of actors (:class:`BlockScorer`).
Each actor loads the model once, from bytes sent through the object store and checked against
the driver's SHA-256, and makes its rows with :meth:`PatchCore.iter_inspect
<patchcore.core.inspection.InspectMixin.iter_inspect>`: the library's own scores, verdicts
(:func:`patchcore.lean.record.judge`), normalised scores, map maxima and regions. The rows
follow :func:`patchcore.lean.record.arrow_schema` plus three columns of the batch's own
(:func:`batch_schema`).

The driver writes one Parquet file per finished block (a temporary name, then a rename),
keyed by the ``image`` column (absolute path or URI): a re-run with the same output folder
skips the images already written, a crash loses only unfinished blocks, and a block whose
worker died is scored again by the restarted actor and written once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore.lean import record
from patchcore.lean.pixels import ImageReadError, read_image
from patchcore.scale.session import (
    RETRY_PAUSE,
    UNAVAILABLE_SECONDS,
    BatchError,
    Session,
    WorkerLostError,
    pyarrow_module,
    worker_id,
    worker_loss,
)
from patchcore.scale.sources import is_uri, list_sources, read_uri

__all__ = [
    "BatchSummary",
    "BlockScorer",
    "Overlay",
    "batch_schema",
    "batch_score",
    "read_results",
]

ProgressFn = Callable[[int], None]
#: ``overlay(image uint8 HxW[x3], anomaly map HxW, display range or None) -> uint8 HxWx3``,
#: e.g. :func:`patchcore.apps.plots.anomaly_map_overlay` (a module-level function: it travels
#: to the workers by name).
Overlay = Callable[[np.ndarray, np.ndarray, "tuple[float, float] | None"], np.ndarray]

#: Blocks queued on one actor at a time (the next one waits there while the driver writes).
IN_FLIGHT = 2
#: Tries of a block whose worker died before it is given up (a block that kills its worker).
BLOCK_TRIES = 3


def batch_schema() -> Any:
    """The ``pyarrow.Schema`` of a batch job's rows: the inspection record's fields
    (:data:`patchcore.lean.record.FIELDS`; ``image`` is the row's key, ``index`` its position
    among the listed inputs), then ``model_digest`` (SHA-256 of the model file), ``heatmap``
    (the overlay PNG's path, when asked) and ``worker`` (``host:pid`` that scored it)."""
    pa = pyarrow_module()
    return record.arrow_schema(
        extra=[("model_digest", pa.string()), ("heatmap", pa.string()), ("worker", pa.string())]
    )


def read_results(out: str | os.PathLike, columns: list[str] | None = None) -> Any:
    """The table a batch job wrote to ``out`` (a ``pyarrow.Table``; empty if nothing yet).

    Args:
        out: the output folder.
        columns: read only these (default: all of :func:`batch_schema`).
    """
    pa = pyarrow_module()
    out = Path(out)
    schema = batch_schema()
    if not out.is_dir() or not any(out.glob("*.parquet")):
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    try:
        return pa.dataset.dataset(out, format="parquet", schema=schema).to_table(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise BatchError(f"{out}: holds a damaged or foreign Parquet file ({exc})") from None


def _done(out: Path, digest: str) -> set[str]:
    """Images already written to ``out`` by this model; BatchError if another model wrote it."""
    table = read_results(out, ["image", "model_digest"])
    if table.num_rows == 0:
        return set()
    digests = set(table.column("model_digest").unique().to_pylist())
    if digests != {digest}:
        other = sorted(str(d) for d in digests - {digest})[0]
        raise BatchError(
            f"{out}: holds results of another model (digest {other[:12]}...): give a new --out "
            "folder, or remove it to re-score"
        )
    return set(table.column("image").to_pylist())


def _write_part(out: Path, table: Any) -> Path:
    """One Parquet file for one finished block: written under a hidden name, then renamed."""
    pq = pyarrow_module().parquet
    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = out / f".{name}.tmp"  # dot-prefixed: pyarrow.dataset ignores it
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out / name


def _heatmap_name(key: str) -> str:
    """A file name unique to the input (its stem plus a hash of its key): retries overwrite."""
    stem = Path(key.rsplit("/", 1)[-1]).stem or "image"
    return f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:12]}_heatmap.png"


@dataclass(frozen=True)
class ScorerSettings:
    """What every :class:`BlockScorer` is told (small and plain: Ray keeps it for restarts)."""

    digest: str
    threshold: float | None
    scores_only: bool
    heatmaps: str | None
    overlay: Overlay | None
    threads: int
    device: str | None


class BlockScorer:
    """A Ray actor: loads the model once (at its first block, again after a restart) and
    turns blocks of inputs into result rows."""

    def __init__(self, settings: ScorerSettings) -> None:
        torch.set_num_threads(int(settings.threads))
        self.settings = settings
        self.det: Any = None
        self.worker = worker_id()
        self.display: tuple[float, float] | None = None

    def _load(self, model: list[Any]) -> None:
        """The detector from the model file's bytes (``model``: [ObjectRef]), refused unless
        they hash to the driver's digest."""
        import ray

        from patchcore.core.detector import PatchCore

        s = self.settings
        data = ray.get(model[0])
        got = hashlib.sha256(data).hexdigest()
        if got != s.digest:
            raise BatchError(
                f"model bytes arrived damaged (SHA-256 {got[:12]}..., not {s.digest[:12]})"
            )
        with tempfile.TemporaryDirectory(prefix="patchcore-model-") as tmp:
            path = Path(tmp) / "model.pt"
            path.write_bytes(data)
            det = PatchCore.load(path, device=s.device)
        if s.scores_only:  # no verdict to give: the records carry scores and maps only
            det.state_.threshold = det.state_.normalization = None
        elif s.threshold is not None:
            det.set_threshold(s.threshold)
        self.display = record.display_range(det.display_range_, det.threshold_)
        if s.heatmaps is not None:
            Path(s.heatmaps).mkdir(parents=True, exist_ok=True)
        self.det = det

    def score(self, model: list[Any], block: list[tuple[int, str]]) -> Any:
        """``block``: (input index, key) pairs -> a pyarrow table of one row per input."""
        if self.det is None:
            self._load(model)
        rows: dict[int, dict[str, Any]] = {}
        items: list[Any] = []
        where: list[tuple[int, str]] = []
        threshold = self.det.threshold_
        for index, key in block:
            try:
                items.append(read_uri(key) if is_uri(key) else key)
                where.append((index, key))
            except (OSError, ValueError) as exc:  # undecodable; the URI's file system: missing
                err = exc.problem if isinstance(exc, ImageReadError) else f"cannot read: {exc}"
                rows[index] = self._row(record.error_record(key, index, err, threshold=threshold))
        regions = not self.settings.scores_only
        for rec in self.det.iter_inspect(items, regions=regions, on_error="skip", progress=False):
            index, key = where[rec.index]
            heatmap = None
            if rec.anomaly_map is not None and self.settings.heatmaps is not None:
                heatmap = self._heatmap(key, items[rec.index], rec.anomaly_map)
            rows[index] = self._row(rec, image=key, index=index, heatmap=heatmap)
        ordered = [rows[index] for index, _ in block]
        return pyarrow_module().Table.from_pylist(ordered, schema=batch_schema())

    def _row(self, rec: record.Inspection, heatmap: str | None = None, **fields: Any) -> dict:
        row = record.as_dict(rec)
        row.update(fields, model_digest=self.settings.digest, heatmap=heatmap, worker=self.worker)
        return row

    def _heatmap(self, key: str, item: Any, amap: np.ndarray) -> str:
        """The overlay PNG of one image (written under a temporary name, then renamed: a killed
        worker leaves no half PNG)."""
        from PIL import Image

        s = self.settings
        assert s.heatmaps is not None and s.overlay is not None
        pixels = read_image(item) if isinstance(item, str) else item
        rgb = s.overlay(pixels, amap, self.display)
        path = Path(s.heatmaps) / _heatmap_name(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
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
        retried: blocks scored again because their worker died.
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
    retried: int = 0

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _check_model(model: Path, threshold: float | None, scores_only: bool) -> int:
    """Fail here, naming the file or the threshold, not in every actor: the model's batch size.

    Raises:
        ModelFileError: the file cannot be used. NonFiniteScoreError: a threshold (given or the
        model's) that is not a finite number. BatchError: no threshold and not scores only.
    """
    from patchcore.core.detector import PatchCore

    det = PatchCore.load(model, device="cpu")
    record.check_threshold(threshold, "--threshold")
    if scores_only:
        if threshold is not None:
            raise BatchError("give either a threshold or scores only, not both")
    elif (
        threshold is None and record.check_threshold(det.threshold_, f"{model}: threshold") is None
    ):
        raise BatchError(
            f"{model}: the model has no threshold, so no verdict can be given: calibrate "
            "it, give a threshold, or ask for scores only (no verdicts)"
        )
    return int(det.batch_size)


def batch_score(
    model: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int = 2,
    address: str | None = None,
    threshold: float | None = None,
    scores_only: bool = False,
    heatmaps: str | os.PathLike | None = None,
    overlay: Overlay | None = None,
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
            :func:`~patchcore.scale.sources.list_sources`).
        out: output folder: one Parquet file per finished block, schema :func:`batch_schema`.
        workers: actors in the pool (each loads the model once).
        address: ``"auto"`` or ``"ray://host:10001"`` joins a cluster; ``None`` starts a
            local Ray with ``workers * threads_per_worker`` CPUs (or uses the Ray already
            initialised in this process).
        threshold: verdict threshold instead of the model's; a finite number.
        scores_only: write scores and map maxima without verdicts (``verdict``,
            ``normalized_score``, ``threshold`` and ``regions`` null). Needed for a model
            without a threshold, which is refused otherwise: a null verdict must never pass
            for a normal one.
        heatmaps: folder for an overlay PNG per image (a shared folder on a cluster), drawn by
            ``overlay`` in the colour range of :func:`patchcore.lean.record.display_range`.
        overlay: the overlay function (:data:`Overlay`); needed with ``heatmaps``.
        block_size: images per block (one Ray task, one Parquet file; a crash loses at most
            the blocks in flight), rounded up to a multiple of the model's ``batch_size``: a
            fresh run batches as one ``score`` call does, so its scores are equal bit for bit
            (other batches or thread counts: within float32 rounding, benchmarks/RESULTS.md).
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
        BatchError: no inputs, an output folder written by another model, a model without a
            threshold (unless ``scores_only``), ``heatmaps`` without ``overlay``, Ray missing.
        NonFiniteScoreError: a threshold that is not a finite number (checked before any work).
        ModelFileError: the model file cannot be used.
        WorkerLostError: a block's worker died :data:`BLOCK_TRIES` times.
    """
    if min(workers, threads_per_worker, block_size) < 1:
        got = f"{workers}, {threads_per_worker}, {block_size}"
        raise BatchError(f"workers, threads_per_worker and block_size must be >= 1, got {got}")
    if heatmaps is not None and overlay is None:
        raise BatchError("heatmaps need an overlay function (patchcore.apps.plots has one)")
    model, out = Path(model), Path(out)
    per_batch = _check_model(model, threshold, scores_only)
    block_size = -(-int(block_size) // per_batch) * per_batch
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    keys = list_sources(sources, recursive=recursive)
    done = _prepare_out(out, digest)
    todo = [(i, k) for i, k in enumerate(keys) if k not in done]
    if total is not None:
        total(len(todo))
    settings = ScorerSettings(
        digest=digest,
        threshold=threshold,
        scores_only=scores_only,
        heatmaps=None if heatmaps is None else str(Path(heatmaps).resolve()),
        overlay=overlay,
        threads=threads_per_worker,
        device=device,
    )
    summary = BatchSummary(out, len(keys), len(keys) - len(todo), 0, 0, 0, 0, 0.0, workers, digest)
    t0 = time.perf_counter()
    if todo:
        blocks = [todo[lo : lo + block_size] for lo in range(0, len(todo), block_size)]
        with Session(address, workers * threads_per_worker, object_store_memory) as session:
            gpus, threads = gpus_per_worker, threads_per_worker
            actors = session.actors(
                BlockScorer, (settings,), count=workers, num_cpus=threads, num_gpus=gpus
            )
            model_ref = [session.ray.put(data)]  # in a list: the bytes stay in the store
            _write_blocks(session.ray, actors, model_ref, blocks, out, done, summary, progress)
    summary.seconds = time.perf_counter() - t0
    return summary


def _prepare_out(out: Path, digest: str) -> set[str]:
    """The output folder made and writable; the images this model already wrote there."""
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise BatchError(f"{out}: the output folder is not writable")
    return _done(out, digest)


def _write_blocks(
    ray: Any,
    actors: list[Any],
    model_ref: list[Any],
    blocks: list[list[tuple[int, str]]],
    out: Path,
    done: set[str],
    summary: BatchSummary,
    progress: ProgressFn | None,
) -> None:
    """Write each finished block's rows once, as they come."""
    pa = pyarrow_module()
    seen = set(done)
    for table in _scored_blocks(ray, actors, model_ref, blocks, summary):
        fresh = [k not in seen for k in table.column("image").to_pylist()]
        if not all(fresh):  # never expected (a block is returned once): written once anyway
            table = table.filter(pa.array(fresh))
        if table.num_rows == 0:
            continue
        _write_part(out, table)
        seen.update(table.column("image").to_pylist())
        verdicts = table.column("verdict").to_pylist()
        summary.parts += 1
        summary.written += table.num_rows
        summary.errors += verdicts.count(record.ERROR)
        summary.anomalous += verdicts.count(record.ANOMALOUS)
        if progress is not None:
            progress(table.num_rows)


def _scored_blocks(
    ray: Any,
    actors: list[Any],
    model_ref: list[Any],
    blocks: list[list[tuple[int, str]]],
    summary: BatchSummary,
) -> Iterator[Any]:
    """Each block's table as it finishes: at most :data:`IN_FLIGHT` blocks per actor; a block
    whose worker died goes back to the queue (Ray restarts the actor)."""
    queue = deque(range(len(blocks)))
    tries = [0] * len(blocks)
    started = [time.monotonic()] * len(blocks)
    load = [0] * len(actors)
    pending: dict[Any, tuple[int, int]] = {}
    while queue or pending:
        while queue and min(load) < IN_FLIGHT:
            a = load.index(min(load))
            b = queue.popleft()
            pending[actors[a].score.remote(model_ref, blocks[b])] = (b, a)
            load[a] += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        b, a = pending.pop(ready[0])
        load[a] -= 1
        try:
            table = ray.get(ready[0])
        except Exception as exc:
            loss = worker_loss(exc)
            if loss is None:
                raise
            if loss == "unavailable":  # restarting: try again soon, for a while
                if time.monotonic() - started[b] > UNAVAILABLE_SECONDS:
                    raise WorkerLostError(
                        f"no worker came back for {UNAVAILABLE_SECONDS:.0f} s"
                    ) from None
                time.sleep(RETRY_PAUSE)
                queue.appendleft(b)
                continue
            tries[b] += 1
            if tries[b] >= BLOCK_TRIES:
                raise WorkerLostError(
                    f"the worker scoring the block from {blocks[b][0][1]} died {tries[b]} "
                    f"times ({exc.__class__.__name__}); its images may crash a worker"
                ) from None
            summary.retried += 1
            queue.appendleft(b)
            continue
        yield table
