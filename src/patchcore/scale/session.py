"""A Ray session for one job: join a cluster or start a local Ray, create restartable actors,
and end with nothing left running.

Actors are created with ``max_restarts=-1`` (Ray starts a new process when one dies) and no
automatic task retries: the job resubmits a lost task itself (the batch its block, the fit its
shard, after rebuilding the shard's state), so it knows what was lost. An actor's constructor
takes only small plain arguments; large inputs (the model's bytes) travel as object references
inside method calls (Ray warns when a restartable actor's constructor arguments live in the
object store, issue ray-project/ray#53727).

When the job ends (normally, on an error or on Ctrl-C) every actor is killed, and a Ray the
session started is shut down and its worker processes are reaped: no process outlives the
driver holding its memory.

Ray is an optional dependency (``pip install 'patchcore[ray]'``); it is imported only when a
session starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Any

__all__ = [
    "BatchError",
    "Session",
    "WorkerLostError",
    "worker_loss",
    "pyarrow_module",
    "ray_module",
    "worker_id",
]

#: Seconds between tries of a task whose worker is unavailable (restarting).
RETRY_PAUSE = 0.5
#: Seconds a task keeps being tried while its worker stays unavailable.
UNAVAILABLE_SECONDS = 600.0
#: Seconds a session waits for its Ray processes to exit before it kills them.
REAP_SECONDS = 1.0


class BatchError(ValueError):
    """Bad input to a scale-out job (no images, a foreign output folder, Ray missing...);
    names the culprit."""


class WorkerLostError(RuntimeError):
    """A task's worker died more often than the job retries it."""


class ShardLostError(RuntimeError):
    """An actor restarted after its process died and no longer holds the state a call needs
    (raised in the actor; the driver rebuilds the state and calls again)."""


def ray_module() -> Any:
    """``ray`` (with ``ray.exceptions``), or BatchError naming the extra to install."""
    try:
        import ray
        import ray.exceptions  # noqa: F401
    except ImportError:
        raise BatchError(
            "Ray is not installed: pip install 'patchcore[ray]' (ray[data] and pyarrow)"
        ) from None
    return ray


def pyarrow_module() -> Any:
    """``pyarrow`` (with ``dataset``, ``parquet`` and ``fs``), or BatchError."""
    try:
        import pyarrow as pa
        import pyarrow.dataset  # noqa: F401
        import pyarrow.fs  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise BatchError("pyarrow is not installed: pip install 'patchcore[ray]'") from None
    return pa


def worker_id() -> str:
    """``host:pid`` of this process (the ``worker`` column, and how a test finds a worker)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_loss(exc: BaseException) -> str | None:
    """What ``exc`` (from ``ray.get``) says about the task's worker: ``"unavailable"`` (for
    the moment: restarting, or out of reach; try again soon), ``"died"`` (the process ended;
    Ray restarts it), ``"empty"`` (:class:`ShardLostError`: restarted without its state), or
    None (the task itself failed: not a worker loss)."""
    ray = ray_module()
    if isinstance(exc, ShardLostError):
        return "empty"
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        return "unavailable"
    if isinstance(exc, ray.exceptions.RayActorError):
        return "died"
    return None


class Session:
    """Ray for one job (a context manager that returns itself).

    Args:
        address: ``"auto"``, ``"ray://host:10001"`` or ``"host:6379"`` joins a running
            cluster; None starts a local Ray with ``num_cpus`` CPUs (a Ray already initialised
            in this process is used as it is, and left running).
        num_cpus: CPUs of a local Ray.
        object_store_memory: bytes of a local Ray's object store (Ray's default if None).
    """

    def __init__(self, address: str | None, num_cpus: int, object_store_memory: int | None):
        self.ray = ray_module()
        self.started = False
        self.local = address is None
        self.handles: list[Any] = []
        if self.ray.is_initialized():
            self.local = False  # someone else's Ray: its processes are not ours to reap
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address:
            self.ray.init(address=address, **kwargs)
        else:
            self.ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, **kwargs)
        self.started = True

    def __enter__(self) -> Session:
        return self

    def actors(
        self, cls: type, args: tuple, *, count: int, num_cpus: float, num_gpus: float = 0.0
    ) -> list[Any]:
        """``count`` actors of ``cls(*args)``, restarted by Ray when their process dies."""
        remote = self.ray.remote(
            num_cpus=num_cpus, num_gpus=num_gpus or None, max_restarts=-1, max_task_retries=0
        )(cls)
        made = [remote.remote(*args) for _ in range(count)]
        self.handles += made
        return made

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(handle, no_restart=True)
        self.handles = []
        if not self.started:
            return
        ray_dir = os.path.dirname(self.ray.__file__)
        ours = _ray_processes(os.getpid(), ray_dir) if self.local else set()
        self.ray.shutdown()
        _reap(ours, REAP_SECONDS)


def _ray_processes(root: int, ray_dir: str) -> set[int]:
    """Ray's processes below ``root``: those run from Ray's package (raylet, GCS, agents) or
    named ``ray::...`` (workers), and everything below them; never another child of the
    caller's (Linux /proc; empty elsewhere)."""
    parents: dict[int, int] = {}
    cmds: dict[int, bytes] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmds[int(entry)] = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])

    def below(tops: set[int]) -> set[int]:
        found: set[int] = set()
        frontier = set(tops)
        while frontier:
            frontier = {p for p, pp in parents.items() if pp in frontier and p not in found}
            found |= frontier
        return found

    marker = ray_dir.encode()
    tops = {
        p
        for p in below({root})
        if cmds.get(p, b"").startswith(b"ray::") or marker in cmds.get(p, b"")
    }
    return tops | below(tops)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"  # a zombie has ended
    except OSError:
        return False


def _reap(pids: set[int], seconds: float) -> None:
    """Wait up to ``seconds`` for ``pids`` to end, then SIGKILL the rest."""
    deadline = time.monotonic() + seconds
    left = {p for p in pids if _alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {p for p in left if _alive(p)}
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
