"""A fit across Ray workers, from the detector's public hooks and the coreset's stages.

The training images are cut into contiguous shards, one a worker (:class:`FitShard`). Each
worker extracts its shard's features (:meth:`PatchCore.extract_features
<patchcore.core.detector.PatchCore.extract_features>`) and keeps them; the coreset is
:func:`~patchcore.core.sampling.chunked_greedy_coreset`'s three stages
(:mod:`patchcore.core.sampling.stages`) across them: the chunk stage on each worker's rows, the
union's greedy on the driver, the repair scan on the workers again (each sending only its
farthest rows), the repair's greedy on the driver, then the certification of the coverage
radius. The driver installs the bank with its provenance (:meth:`PatchCore.install_bank
<patchcore.core.detector.PatchCore.install_bank>`), so a Ray-fitted model explains its scores
like any other. With one worker the bank and its provenance are the single-process fit's.

A worker that dies is restarted by Ray; the driver then rebuilds its shard's state (the
features, and the repair scan's bounds if they were made) by calling again what built it,
and runs the lost call once more: a fit survives killed workers.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchcore.core.detector import PatchCore, TrainingFeatures
from patchcore.core.inputs import Skipped, as_list, warn_skipped
from patchcore.core.sampling import stages
from patchcore.core.validation import validate_params
from patchcore.scale.session import (
    RETRY_PAUSE,
    UNAVAILABLE_SECONDS,
    Session,
    ShardLostError,
    WorkerLostError,
    worker_id,
    worker_loss,
)

__all__ = ["DistributedFit", "FitShard", "fit_distributed"]

#: Tries of a call on a shard whose worker died (state rebuilt before each).
SHARD_TRIES = 4
#: Calls that build a shard's state: replayed, in order, on a restarted worker.
STATEFUL = ("extract", "repair_scan", "doubtful")

StageFn = Callable[[str, list[str]], None]


class FitShard:
    """One worker's share of a distributed fit: its images' features and its coreset work."""

    def __init__(self, params: dict[str, Any], threads: int) -> None:
        torch.set_num_threads(int(threads))
        self.det = PatchCore(**params)
        self.x: torch.Tensor | None = None
        self.upper: torch.Tensor | None = None
        self.doubt: torch.Tensor | None = None

    def _rows(self) -> torch.Tensor:
        if self.x is None:
            raise ShardLostError(f"worker {worker_id()} holds no features (restarted)")
        return self.x

    def extract(self, items: list[Any], first_image: int) -> dict[str, Any]:
        """Features of ``items`` (training images numbered from ``first_image``), kept here;
        returns what the driver needs to know of them."""
        found = self.det.extract_features(
            items, first_image=first_image, on_error="skip", progress=False, allow_empty=True
        )
        self.x = found.features
        return {
            "rows": int(found.features.shape[0]),
            "names": found.names,
            "grids": found.grids,
            "digests": found.digests,
            "stats": found.stats,
            "skipped": [tuple(s) for s in found.skipped],  # plain tuples: Ray returns them so
            "dtype": found.dtype,
            "worker": worker_id(),
        }

    def features(self) -> torch.Tensor:
        return self._rows()

    def chunk_select(self, keep: float, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk stage on this shard: (local indices, their rows)."""
        x = self._rows()
        idx = stages.chunk_stage(x, keep, starts=starts)
        return idx, x[idx]

    def repair_scan(self, bank: torch.Tensor, n_repair: int) -> tuple[torch.Tensor, ...]:
        """The repair's scan on this shard: every row's bound on its squared distance to
        ``bank``, kept here; returns the candidates (bounds, local indices, rows)."""
        x = self._rows()
        self.upper = stages.repair_bounds(x, bank)
        vals, rows = stages.repair_candidates(self.upper, n_repair)
        return vals, rows, x[rows]

    def doubtful(self, taken: torch.Tensor, radius2: float) -> tuple[int, float]:
        """Rows not taken as candidates whose bound exceeds ``radius2``: (count, largest)."""
        if self.upper is None:
            raise ShardLostError(f"worker {worker_id()} holds no repair bounds (restarted)")
        self.upper[taken] = -1.0
        self.doubt = stages.doubtful_rows(self.upper, radius2)
        count = int(self.doubt.numel())
        return count, float(self.upper.max()) if count else -1.0

    def recheck(self, final: torch.Tensor) -> float:
        """Largest exact squared distance from a doubtful row to the final bank."""
        if self.doubt is None:
            raise ShardLostError(f"worker {worker_id()} holds no doubtful rows (restarted)")
        if self.doubt.numel() == 0:
            return -1.0
        return float(stages.exact_sq_distances(self._rows()[self.doubt], final).max())


class _Shards:
    """Calls on every shard at once, through Ray (``ray``) or in this process (None); a call
    whose worker died is run again after the shard's state is rebuilt."""

    def __init__(self, objs: list[Any], ray: Any = None) -> None:
        self.objs, self.ray = objs, ray
        self.history: list[list[tuple[str, tuple]]] = [[] for _ in objs]
        self.restarts = 0

    def call(self, method: str, args: Sequence[tuple], which: Sequence[int] | None = None) -> list:
        which = list(range(len(self.objs))) if which is None else list(which)
        if self.ray is None:
            out = [getattr(self.objs[k], method)(*a) for k, a in zip(which, args, strict=True)]
        else:
            refs = [self._submit(k, method, a) for k, a in zip(which, args, strict=True)]
            out = [self._get(k, method, a, r) for k, a, r in zip(which, args, refs, strict=True)]
        if method in STATEFUL:
            for k, a in zip(which, args, strict=True):
                self.history[k].append((method, a))
        return out

    def _submit(self, k: int, method: str, args: tuple) -> Any:
        return getattr(self.objs[k], method).remote(*args)

    def _get(self, k: int, method: str, args: tuple, ref: Any) -> Any:
        """``ref``'s result; while its worker is lost, the call again (after the shard's state
        is rebuilt when a restarted worker lacks it)."""
        tries, since = 0, time.monotonic()
        while True:
            try:
                return self.ray.get(ref)
            except Exception as exc:
                loss = worker_loss(exc)
                if loss is None:
                    raise
                if loss == "unavailable":
                    if time.monotonic() - since > UNAVAILABLE_SECONDS:
                        raise WorkerLostError(
                            f"shard {k}'s worker stayed unavailable {UNAVAILABLE_SECONDS:.0f} s"
                        ) from None
                    time.sleep(RETRY_PAUSE)
                else:
                    tries += 1
                    self.restarts += 1
                    if tries >= SHARD_TRIES:
                        raise WorkerLostError(
                            f"shard {k}'s worker died {tries} times ({exc.__class__.__name__})"
                        ) from None
                if loss == "empty":  # a restarted worker: its state first, then the call
                    for m, a in self.history[k]:
                        self._get(k, m, a, self._submit(k, m, a))
                ref = self._submit(k, method, args)


@dataclass
class DistributedFit:
    """What :func:`fit_distributed` did.

    Attributes:
        detector: the fitted :class:`~patchcore.core.detector.PatchCore`.
        coverage_radius: largest distance from a training patch to its nearest bank row, as
            the repair stage certifies it (0 when every patch is kept).
        shard_rows: training patches per worker.
        seconds: wall time (actor start included).
        restarts: calls run again because their worker died.
    """

    detector: Any
    coverage_radius: float
    shard_rows: list[int] = field(default_factory=list)
    seconds: float = 0.0
    restarts: int = 0


def fit_distributed(
    images: Any,
    *,
    workers: int = 2,
    address: str | None = None,
    threads_per_worker: int = 1,
    object_store_memory: int | None = None,
    shards: Sequence[Any] | None = None,
    on_stage: StageFn | None = None,
    **params: Any,
) -> DistributedFit:
    """Fit a :class:`~patchcore.core.detector.PatchCore` with its features and coreset on workers.

    The images (paths the workers can read) are cut into ``workers`` contiguous shards. Each
    worker extracts its shard's features; the coreset is
    :func:`~patchcore.core.sampling.chunked_greedy_coreset` split across them (module docstring):
    the chunk starts come from one seeded generator in chunk order and the union's start after
    them, as in the single-process call, so one worker gives the single-process bank and
    provenance. Unreadable images are skipped (listed in ``skipped_``, with the usual warning).
    Only ``sampling="greedy"`` is distributed; ``"greedy_exact"`` and ``"random"`` (and small
    sets whose stage 1 would keep every row) gather the features on the driver and select there.

    Args:
        images: paths (or anything ``PatchCore.fit`` takes that Ray can send).
        workers: actors (shards).
        address: as :func:`~patchcore.scale.batch.batch_score`.
        threads_per_worker: torch threads (and Ray CPUs) per actor.
        object_store_memory: as :func:`~patchcore.scale.batch.batch_score`.
        shards: already-built shard objects (:class:`FitShard`), run in this process; tests.
        on_stage: called with the words of each stage as it starts and the workers
            (``host:pid``, known once the features are extracted).
        **params: PatchCore parameters (``progress`` is ignored).

    Returns:
        :class:`DistributedFit`.

    Raises:
        WorkerLostError: a worker died :data:`SHARD_TRIES` times in one call.
    """
    params.pop("progress", None)
    det = PatchCore(**params, progress=False)
    validate_params(det)  # before any worker starts
    items = as_list(images)
    if not items:
        raise ValueError("fit needs at least one image, got none")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    stage = on_stage or (lambda words, ids: None)
    if shards is not None:
        return _fit_on(det, items, _Shards(list(shards)), stage, t0)
    with Session(address, workers * threads_per_worker, object_store_memory) as session:
        args = (det.get_params(), threads_per_worker)
        handles = session.actors(FitShard, args, count=workers, num_cpus=threads_per_worker)
        return _fit_on(det, items, _Shards(handles, session.ray), stage, t0)


def _fit_on(
    det: PatchCore, items: list[Any], shards: _Shards, stage: StageFn, t0: float
) -> DistributedFit:
    """The distributed fit on ``shards``: features, bank, fitted state."""
    w = len(shards.objs)
    bounds = [int(b) for b in np.linspace(0, len(items), w + 1).round()]
    stage("reading the training images", [])
    info = shards.call("extract", [(items[bounds[k] : bounds[k + 1]], bounds[k]) for k in range(w)])
    rows = [i["rows"] for i in info]
    skipped = [Skipped(s[0] + bounds[k], *s[1:]) for k, i in enumerate(info) for s in i["skipped"]]
    if sum(rows) == 0:
        raise ValueError(
            f"no readable training images: all {len(items)} failed, e.g. "
            f"{skipped[0].name}: {skipped[0].reason}"
        )
    dtype = "float32" if any(i["dtype"] == "float32" for i in info) else "float16"
    if dtype != det.feature_dtype:
        warnings.warn(
            "training features exceed float16's range (|x| > 65504): stored in float32 "
            "instead (feature_dtype='float32' avoids the switch)",
            UserWarning,
            stacklevel=3,
        )
    names = [name for i in info for name in i["names"]]
    grids = [tuple(g) for i in info for g in i["grids"]]
    digests = [d for i in info for d in i["digests"]]
    stats = [tuple(v) for i in info for v in i["stats"]]
    train = TrainingFeatures(torch.empty(0, 0), dtype, grids, names, skipped, digests, stats)
    workers = [i["worker"] for i in info]
    t1 = time.perf_counter()
    num = sum(rows)
    n = det.bank_size(num)
    keep = stages.keep_fraction(num, n)
    live = [k for k in range(w) if rows[k]]
    plan = None
    if n < num and det.sampling == "greedy" and keep < 1.0:
        plan = _sharded(shards, live, rows, n, keep, det.seed, stage, workers)
    if plan is None:  # every row counts: on the driver, as the single-process fit
        stage("gathering the training features", workers)
        train.features = torch.cat(shards.call("features", [()] * len(live), live))
        det.fit_from_features(train, progress=False, feature_seconds=t1 - t0)
        radius = 0.0
        if n < num:
            radius = math.sqrt(
                float(stages.exact_sq_distances(train.features, det.memory_bank_).max())
            )
    else:
        ids, bank, radius = plan
        det.install_bank(
            bank,
            ids,
            names=names,
            grids=grids,
            digests=digests,
            pixel_stats=stats,
            feature_dtype=dtype,
            skipped=skipped,
            feature_seconds=t1 - t0,
            coreset_seconds=time.perf_counter() - t1,
        )
    warn_skipped("fit skipped {n} unreadable image(s)", det.state_.skipped)
    return DistributedFit(det, radius, rows, time.perf_counter() - t0, shards.restarts)


def _sharded(
    shards: _Shards,
    live: list[int],
    rows: list[int],
    n: int,
    keep: float,
    seed: int,
    stage: StageFn,
    workers: list[str],
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """:func:`~patchcore.core.sampling.chunked_greedy_coreset` across shards: the bank's
    indices among all training patches, the bank, its certified coverage radius; None when
    the chunk stage kept every row (the exact greedy on all rows is then the selection)."""
    num = sum(rows)
    offset = [int(v) for v in np.cumsum([0, *rows[:-1]])]
    gen = torch.Generator().manual_seed(seed)
    starts = [stages.chunk_starts(rows[k], stages.CHUNK_ROWS, gen) for k in live]
    stage(stages.PASS_WORDS.format(k=1), workers)
    picks = shards.call("chunk_select", [(keep, s) for s in starts], live)
    union_ids = torch.cat([offset[k] + idx for k, (idx, _) in zip(live, picks, strict=True)])
    union_rows = torch.cat([r for _, r in picks])
    if union_rows.shape[0] == num:
        return None
    n_repair = stages.repair_size(n, num)
    start = int(torch.randint(union_rows.shape[0], (1,), generator=gen).item())
    stage(stages.PASS_WORDS.format(k=2), workers)
    picked = stages.union_greedy(union_rows, n - n_repair, start)
    bank = union_rows[picked].float()
    stage(stages.PASS_WORDS.format(k=3), workers)
    scans = shards.call("repair_scan", [(bank, n_repair)] * len(live), live)
    vals = torch.cat([v for v, _, _ in scans])
    owner = torch.cat([torch.full((v.numel(),), j) for j, (v, _, _) in enumerate(scans)])
    local = torch.cat([r for _, r, _ in scans])
    cand = torch.cat([x for _, _, x in scans])
    if len(live) > 1:  # the global top rows among every shard's top rows
        top = stages.repair_candidates(vals, n_repair)[1]
        owner, local, cand = owner[top], local[top], cand[top]
    z = cand.float()
    u2 = stages.exact_sq_distances(z, bank).float()
    extra = torch.tensor(stages.continue_greedy(z, u2, n_repair), dtype=torch.long)
    final = torch.cat([bank, z[extra]])
    ids = torch.cat(
        [union_ids[picked], torch.tensor(offset)[torch.tensor(live)][owner[extra]] + local[extra]]
    )
    radius2 = float(u2.max())
    taken = [(local[owner == j], radius2) for j in range(len(live))]
    doubts = shards.call("doubtful", taken, live)
    if sum(c for c, _ in doubts) > stages.RECHECK_ROWS:
        radius2 = max(radius2, *(u for _, u in doubts))
    elif any(c for c, _ in doubts):
        radius2 = max(radius2, *shards.call("recheck", [(final,)] * len(live), live))
    return ids, final.contiguous(), math.sqrt(radius2)
