"""What the routes share, reached as FastAPI dependencies: the limits, the token check and the
service object (:class:`Service`: the backend, readiness, worker pools, admission gates,
upload slots and the heatmap store)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from patchcore.apps.service.backends import Backend
from patchcore.apps.service.errors import Reject, logger
from patchcore.apps.service.heatmaps import HeatmapStore
from patchcore.lean import record
from patchcore.lean.pixels import SURFACE_LIMITS
from patchcore.lean.util import one_line

__all__ = ["Service", "ServiceDep", "ServiceLimits", "get_service", "require_token"]


_INPUT = SURFACE_LIMITS["service"]


@dataclass(frozen=True)
class ServiceLimits:
    """Resource limits of the service, the same on both backends (``create_app(m, workers=2)``).

    Args:
        max_request_bytes: largest request body (413 from ``Content-Length`` before reading,
            or as soon as a streamed body passes it).
        max_pixels: largest image, width x height (413, from the header before decoding).
        max_aspect_ratio: largest long side / short side (413, from the header).
        max_processed_pixels: largest size the backend works at after its ``image_size`` /
            ``scale`` (413, from the header).
        max_batch_images: most images in one ``/v1/inspect/batch`` request (413).
        max_batch_pixels: most pixels, all images of one batch request together, from their
            headers before any is decoded (413).
        workers: threads that decode and score, i.e. requests scored at once.
        queue_length: requests allowed to wait for a worker; beyond ``workers +
            queue_length`` in flight the service answers 503 with ``Retry-After``.
        upload_slots: request bodies being received at once (503 beyond); a slot is held
            only while the body arrives, never while the request waits or is scored.
        client_upload_slots: bodies one client (remote address) may send at once once half
            of ``upload_slots`` are taken (503 beyond), so slow clients from one address
            cannot take every slot.
        body_timeout_s: seconds a client has to send its whole body (408 after).
        header_timeout_s: seconds a client has to send a request's headers (408 and closed
            after); applied by the server :func:`~patchcore.apps.service.server.serve` runs.
        heatmap_store_items: overlays kept for ``GET /v1/heatmaps/{id}`` (oldest dropped).
        heatmap_store_bytes: memory budget of that store (image + map bytes).
        retry_after_s: the ``Retry-After`` value sent with 503 answers.
    """

    max_request_bytes: int = 20 * 1024 * 1024
    # the three input bounds: the service's row of the one table (lean/pixels.SURFACE_LIMITS)
    max_pixels: int = int(_INPUT.max_pixels or 0)
    max_aspect_ratio: int = int(_INPUT.max_aspect_ratio or 0)
    max_processed_pixels: int = int(_INPUT.max_processed_pixels or 0)
    max_batch_images: int = 16
    max_batch_pixels: int = 50_000_000
    workers: int = 1
    queue_length: int = 8
    upload_slots: int = 32
    client_upload_slots: int = 8
    body_timeout_s: int = 30
    header_timeout_s: int = 10
    heatmap_store_items: int = 64
    heatmap_store_bytes: int = 256 * 1024 * 1024
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "queue_length" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{f.name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def from_kwargs(cls, limits: dict[str, Any]) -> ServiceLimits:
        """Build from keyword arguments (None keeps a default), naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(limits) - known)
        if unknown:
            raise TypeError(
                f"unknown service limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in limits.items() if v is not None})


class Gate:
    """Non-blocking admission counter (used from the event loop only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.capacity:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


class UploadSlots:
    """Upload slots, all clients together and per client (remote address); event loop only."""

    def __init__(self, capacity: int, per_client: int) -> None:
        self.capacity = capacity
        self.per_client = per_client
        self.by_client: Counter[str] = Counter()

    @property
    def in_use(self) -> int:
        return sum(self.by_client.values())

    def refusal(self, client: str) -> str | None:
        """Why ``client`` cannot have a slot now (None: it can). A client may take more than
        its ``per_client`` share only while at least half of all slots are free."""
        in_use = self.in_use
        if in_use >= self.capacity:
            return f"{self.capacity} uploads already being received (upload_slots)"
        if self.by_client[client] >= self.per_client and 2 * in_use >= self.capacity:
            return (
                f"{self.by_client[client]} uploads from this client already being received "
                f"(client_upload_slots {self.per_client}, with half of upload_slots taken)"
            )
        return None

    def take(self, client: str) -> None:
        self.by_client[client] += 1

    def give_back(self, client: str) -> None:
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


class Service:
    """Everything the routes share: the backend and its readiness, the pools, gates, upload
    slots and the heatmap store."""

    def __init__(
        self,
        backend: Backend,
        limits: ServiceLimits,
        token: str | None,
        display_range: tuple[float, float] | None,
    ) -> None:
        self.backend = backend
        self.limits = limits
        self.token = token or None
        self.display_range_arg = display_range
        self.gate = Gate(limits.workers + limits.queue_length)
        self.uploads = UploadSlots(limits.upload_slots, limits.client_upload_slots)
        self.free_workers = asyncio.Semaphore(limits.workers)
        self.render_gate = Gate(2 + limits.queue_length)
        self.store = HeatmapStore(limits.heatmap_store_items, limits.heatmap_store_bytes)
        self.pool: ThreadPoolExecutor | None = None
        self.render_pool: ThreadPoolExecutor | None = None
        self.ready = False
        self.load_error: str | None = None
        self.started = time.time()
        self.inspected = 0

    # -- life cycle

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="patchcore-score")
        self.render_pool = ThreadPoolExecutor(2, thread_name_prefix="patchcore-render")
        self.pool.submit(self._load)

    def stop(self) -> None:
        for pool in (self.pool, self.render_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        try:
            self.backend.load()
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and logged once
            self.load_error = f"{type(exc).__name__}: {one_line(exc, 200)}"
            logger.error("model could not be loaded: %s", self.load_error)

    # -- facts

    @property
    def threshold(self) -> float:
        return self.backend.threshold

    def display_range(self) -> tuple[float, float] | None:
        """Map values shown as the coldest / hottest colour, fixed so colours compare: the
        one given to :func:`create_app`, else :func:`record.display_range`."""
        if self.display_range_arg is not None:
            return self.display_range_arg
        return record.display_range(self.backend.stored_display_range(), self.threshold)

    # -- admission

    def check_ready(self) -> None:
        if not self.ready:
            reason = self.load_error or "model is still loading / warming up"
            raise Reject(503, f"not ready: {reason}", retry_after=self.limits.retry_after_s)

    @contextlib.asynccontextmanager
    async def admitted(self, gate: Gate) -> AsyncIterator[float]:
        """Hold a slot of ``gate`` (503 when full or not ready); yields the admission time."""
        self.check_ready()
        if not gate.try_enter():
            raise Reject(
                503,
                f"busy: {gate.capacity} requests already in flight (workers + queue_length); "
                "retry later",
                retry_after=self.limits.retry_after_s,
            )
        try:
            yield time.perf_counter()
        finally:
            gate.leave()

    @contextlib.asynccontextmanager
    async def receiving(self, request: Request) -> AsyncIterator[None]:
        """Hold an upload slot of the request's client while its body is received (503 when
        the client's or all slots are taken, or not ready)."""
        self.check_ready()
        client = request.client.host if request.client is not None else "?"
        refusal = self.uploads.refusal(client)
        if refusal is not None:
            raise Reject(
                503, f"busy: {refusal}; retry later", retry_after=self.limits.retry_after_s
            )
        self.uploads.take(client)
        try:
            yield
        finally:
            self.uploads.give_back(client)

    async def receive(self, reading: Any) -> Any:
        """Await ``reading`` (the body) within ``body_timeout_s`` (408 after it)."""
        timeout = self.limits.body_timeout_s
        try:
            return await asyncio.wait_for(reading, timeout)
        except TimeoutError:
            raise Reject(
                408, f"request body not received within {timeout} s (body_timeout_s)"
            ) from None

    async def run(self, pool: ThreadPoolExecutor | None, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` in ``pool``, awaited without blocking the event loop."""
        assert pool is not None
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def get_service(request: Request) -> Service:
    """The shared state of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
_bearer = HTTPBearer(auto_error=False, description="the service's token (--token-file)")


async def require_token(
    svc: ServiceDep, cred: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """401 unless the request carries the service's bearer token (when one is set); the
    scheme word ``Bearer`` is matched in any case."""
    if svc.token is None:
        return
    given = cred.credentials if cred is not None else ""
    if not secrets.compare_digest(given.encode(), svc.token.encode()):
        raise HTTPException(
            401,
            "missing or wrong bearer token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
