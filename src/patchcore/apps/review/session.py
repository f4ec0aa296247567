"""One review: a model file, a labelled data folder, their cached inspection records.

:class:`ReviewSession` loads the model and the data, digests every file (SHA-256 of its bytes),
reads what the cache already holds and scores the rest through
:meth:`~patchcore.PatchCore.iter_inspect` (so words, fields and verdicts are the ones every
other surface uses), in a background job whose progress the page polls. A file that cannot be
read is an ``"error"`` record, never a stop.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.apps.review.cache import MAP_SIDE, Cache, file_digest
from patchcore.core import datasets
from patchcore.core.datasets import ImageDataset
from patchcore.core.detector import PatchCore
from patchcore.lean import record as rec
from patchcore.lean.util import one_line, resize_map

__all__ = ["Item", "Job", "ReviewSession", "load_data", "score_into"]

#: Entries are written to the cache every this many scored images (and at the end).
SAVE_EVERY = 50


@dataclass
class Item:
    """One image of the data folder.

    ``digest`` is None (and ``error`` set) when the file cannot be read at all.
    """

    index: int
    name: str
    path: Path
    label: int
    defect_type: str
    mask: Path | None
    digest: str | None
    error: str | None = None

    @property
    def sample(self) -> datasets.Sample:
        return datasets.Sample(self.path, self.label, self.defect_type, self.mask, self.name)


@dataclass
class Job:
    """A background task of the page (scoring, update, comparison): what it does and how far."""

    what: str = ""
    done: int = 0
    total: int = 0
    running: bool = False
    error: str | None = None
    started: float = 0.0
    finished: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The job's progress as the page shows it (``result`` is fetched apart)."""
        shown = {k: getattr(self, k) for k in ("what", "done", "total", "running", "error")}
        elapsed = (self.finished or time.monotonic()) - self.started if self.started else 0.0
        return {**shown, "seconds": round(elapsed, 2)}


def load_data(data: str | os.PathLike) -> ImageDataset:
    """The labelled images of ``data``: ``data/test/<label>/`` when there is a ``test`` folder,
    else ``data/<label>/`` (``good`` = normal, any other folder = a defect type)."""
    root = Path(data)
    split = "test" if (root / "test").is_dir() else None
    return datasets.load_folder(root, split)


def items_of(ds: ImageDataset) -> list[Item]:
    """The data set's samples as items, each with its file digest (or why it has none)."""
    out = []
    for i, s in enumerate(ds):
        digest, error = None, None
        try:
            digest = file_digest(s.image)
        except OSError as exc:
            error = f"cannot read the file: {one_line(exc)}"
        mask = s.mask if isinstance(s.mask, Path) else None
        out.append(Item(i, s.name, Path(s.image), s.label, s.defect_type, mask, digest, error))
    return out


def shrink(anomaly_map: np.ndarray, side: int = MAP_SIDE) -> np.ndarray:
    """A map shrunk (never grown) so that its longer side is at most ``side``."""
    h, w = anomaly_map.shape
    f = min(1.0, side / max(h, w))
    return resize_map(anomaly_map, (max(1, round(h * f)), max(1, round(w * f))))


def entry_of(record: rec.Inspection, item: Item) -> dict[str, Any]:
    """What the cache keeps of one inspection record (the map goes to its own file)."""
    return {"name": item.name, "record": rec.as_dict(record.without_map())}


def score_into(
    det: PatchCore,
    cache: Cache,
    model_digest: str,
    items: Sequence[Item],
    entries: dict[str, dict[str, Any]],
    job: Job,
    *,
    progress: bool = False,
) -> None:
    """Score the ``items`` not yet in ``entries`` and add them (maps to the cache folder).

    Unreadable files become ``"error"`` records. ``job.done``/``job.total`` follow the work;
    entries are written every :data:`SAVE_EVERY` images and at the end.
    """
    todo = [it for it in items if it.digest is not None and it.digest not in entries]
    job.total, job.done = len(todo), 0
    since = 0
    stream = det.iter_inspect([str(it.path) for it in todo], on_error="skip", progress=progress)
    for record in stream:
        item = todo[record.index]
        if record.anomaly_map is not None:
            cache.save_map(model_digest, item.digest, shrink(record.anomaly_map))
        entries[item.digest] = entry_of(record, item)  # type: ignore[index]
        job.done += 1
        since += 1
        if since >= SAVE_EVERY:
            cache.save_entries(model_digest, entries)
            since = 0
    cache.save_entries(model_digest, entries)


class ReviewSession:
    """A model file reviewed on a labelled data folder.

    Args:
        model: the model file (it is rewritten, atomically, by "Save threshold" and "Mark as
            normal").
        data: the labelled images (see :func:`load_data`).
        cache_dir: the cache folder; default ``<model>.review`` beside the model.
        progress: also show scoring progress bars in the terminal.
        device: the torch device of the detector (None: the model's default).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        data: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = False,
        device: str | None = None,
    ) -> None:
        self.model_path = Path(model)
        self.data_path = Path(data)
        self.progress = progress
        self.device = device
        self.cache = Cache(self.model_path, cache_dir)
        self.lock = threading.RLock()
        self.job = Job()
        self.compare: dict[str, Any] | None = None
        self.last_update: dict[str, Any] | None = None
        self.det: PatchCore
        self.model_digest = ""
        self.entries: dict[str, dict[str, Any]] = {}
        self.reload_model()  # a bad model file fails first
        self.dataset = load_data(self.data_path)
        self.items = items_of(self.dataset)

    # ------------------------------------------------------------------ model and entries

    def reload_model(self) -> None:
        """(Re)load the model file and the entries its cache holds for it."""
        self.det = PatchCore.load(self.model_path, device=self.device)
        self.model_digest = file_digest(self.model_path)
        self.entries = self.cache.load_entries(self.model_digest)

    def missing(self) -> int:
        """How many readable images have no cached record for the current model."""
        return sum(1 for it in self.items if it.digest and it.digest not in self.entries)

    def record(self, item: Item) -> dict[str, Any]:
        """The record of an item: cached, or an error record (unreadable / not yet scored)."""
        if item.digest is not None and item.digest in self.entries:
            return self.entries[item.digest]["record"]
        why = item.error or "not scored yet"
        return rec.as_dict(rec.error_record(item.name, item.index, why))

    def excluded(self) -> set[str]:
        """Digests of the images marked as normal and added to the model (left out of the
        metrics), as the model's metadata records them."""
        marked = self.det.metadata_.get("review_marked_normal") or []
        return {m["digest"] for m in marked if isinstance(m, dict) and m.get("digest")}

    def small_map(self, item: Item) -> np.ndarray | None:
        """The cached (shrunk) anomaly map of an item, or None."""
        if item.digest is None:
            return None
        return self.cache.load_map(self.model_digest, item.digest)

    # ------------------------------------------------------------------ background jobs

    def start(self, what: str, work: Callable[[Job], None]) -> bool:
        """Run ``work(job)`` in a background thread; False when another job is running."""
        with self.lock:
            if self.job.running:
                return False
            self.job = Job(what=what, running=True, started=time.monotonic())
            job = self.job

        def run() -> None:
            try:
                work(job)
            except Exception as exc:  # noqa: BLE001 - shown on the page, never a crash
                job.error = f"{what} failed: {one_line(exc)}"
                traceback.print_exc()
            finally:
                job.finished = time.monotonic()
                job.running = False

        threading.Thread(target=run, name=f"review: {what}", daemon=True).start()
        return True

    def score_missing(self) -> bool:
        """Start scoring the images the cache lacks (a no-op job when none)."""
        return self.start("scoring", self._score_job)

    def _score_job(self, job: Job) -> None:
        score_into(
            self.det, self.cache, self.model_digest, self.items, self.entries, job,
            progress=self.progress,
        )  # fmt: skip

    def wait(self, timeout: float = 600.0) -> Job:
        """Block until the running job ends (tests, the benchmark, the CLI's --no-browser)."""
        end = time.monotonic() + timeout
        while self.job.running and time.monotonic() < end:
            time.sleep(0.05)
        return self.job
