"""The inspection service: a FastAPI app that scores uploaded images with one fitted detector.

Start it with ``patchcore serve model.pt`` (or :func:`serve`) and open http://127.0.0.1:8000/.

Endpoints (``/v1/*`` need ``Authorization: Bearer TOKEN`` when a token is set):

- ``POST /v1/inspect``: one image, as a multipart upload (field ``file``) or as the raw body
  (``Content-Type: image/*`` or ``application/octet-stream``). JSON verdict; ``?heatmap=png``
  answers with the overlay PNG instead, ``?heatmap=url`` adds a ``heatmap_url`` to the JSON.
- ``POST /v1/inspect/batch``: several images in one multipart request.
- ``GET /v1/heatmaps/{id}``: an overlay kept in a bounded in-memory store (``?alpha=`` in [0, 1];
  1 = the colour map alone, 0 = the decoded image alone).
- ``GET /v1/model``: the model card. ``GET /healthz``: the process answers.
  ``GET /readyz``: 200 once the model is loaded and warmed up, else 503.
- ``GET /``: the inspection page (``static/``, no build step, no CDN). ``/docs``: the API as
  one self-contained page (no CDN); ``/openapi.json``: the schema.

Design: the model is loaded once, before or at start-up, from a path fixed by the operator; no
request can name a file. A request's body is received first, within ``body_timeout_s`` (408
after it), holding one of ``upload_slots`` (503 beyond, so memory stays bounded); only then does
it take a scoring slot of the admission gate (``workers + queue_length`` slots; a full queue
answers 503 with ``Retry-After`` at once), so slow uploads never hold a scoring slot. A client
that has disconnected by the time a worker is free is not scored; a disconnect logs one line.
Decoding and scoring run in a thread pool of
``workers`` threads (torch releases the GIL), off the event loop, so health checks stay fast.
Every rejected input gets a 4xx with a one-line ``detail`` and is logged once, at WARNING.
The service holds no algorithm: it decodes (:mod:`patchcore.lean.decode`), calls
:meth:`PatchCore.score`, and presents. The routes live on two ``APIRouter``s (``/v1/*`` behind
the token, and the public ones); the shared state, a ``_Service``, reaches them as a FastAPI
dependency (:func:`get_service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from patchcore.core.detector import PatchCore
from patchcore.core.images import ImageReadError, InputLimits, output_size
from patchcore.lean.decode import IMAGE_FORMATS as IMAGE_FORMATS
from patchcore.lean.decode import ImageTooLargeError, decode_bytes
from patchcore.lean.regions import Region, label_regions
from patchcore.lean.util import one_line, package_version

logger = logging.getLogger("patchcore.apps.service")

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_ENV = "PATCHCORE_TOKEN"
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
#: Default overlay colour scale, as multiples of the threshold: blurred maps peak a little below
#: the image score, so the threshold sits at 2/3 of the scale (orange) and red is beyond it.
DISPLAY_RANGE_FACTORS = (0.5, 1.25)


@dataclass(frozen=True)
class ServiceLimits:
    """Resource limits of the service (all configurable, e.g. ``create_app(m, workers=2)``).

    Args:
        max_request_bytes: largest request body accepted (413 above it).
        max_pixels: largest image, width x height, accepted; checked from the header before
            any pixel is decoded (413 above it).
        max_aspect_ratio: largest long side / short side of an image (413 above it, from the
            header): a tall strip costs far more than its pixels to resize.
        max_processed_pixels: largest image the detector works at after its ``image_size`` /
            ``scale`` (413 above it, from the header): bounds a native-resolution model's time
            and memory per image.
        max_batch_images: most images in one ``/v1/inspect/batch`` request (413 above it).
        workers: threads that decode and score, i.e. requests scored at once.
        queue_length: requests allowed to wait for a worker; beyond ``workers + queue_length``
            requests in flight the service answers 503 with ``Retry-After``.
        upload_slots: requests whose bodies are being received at once (503 beyond): a slow
            upload holds one of these, never a scoring slot.
        body_timeout_s: seconds a client has to send its whole request body (408 after).
        heatmap_store_items: overlays kept for ``GET /v1/heatmaps/{id}`` (oldest dropped first).
        heatmap_store_bytes: memory budget of that store (image + map bytes).
        retry_after_s: the ``Retry-After`` value sent with 503 answers.
    """

    max_request_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_aspect_ratio: int = 20
    max_processed_pixels: int = 4_194_304  # 2048 x 2048
    max_batch_images: int = 16
    workers: int = 1
    queue_length: int = 8
    upload_slots: int = 32
    body_timeout_s: int = 30
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
        """Build from keyword arguments, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(limits) - known)
        if unknown:
            raise TypeError(
                f"unknown service limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in limits.items() if v is not None})


class InputError(Exception):
    """A request the service refuses; ``status`` is the HTTP code, the message one line."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ---------------------------------------------------------------------- decoding


def decode_image(
    data: bytes,
    max_pixels: int,
    name: str = "image",
    *,
    max_aspect_ratio: float | None = None,
    processed: Any = None,
    max_processed_pixels: int | None = None,
) -> np.ndarray:
    """Decode uploaded bytes like :func:`patchcore.core.images.read_image` does a file, safely.

    See :func:`patchcore.lean.decode.decode_bytes`: the size is checked against ``max_pixels`` from
    the header before any pixel is decoded (and so are ``max_aspect_ratio`` and, with
    ``processed`` -- (h, w) -> the detector's processed (h, w) -- ``max_processed_pixels``);
    only :data:`IMAGE_FORMATS` are tried; truncated data is an error.

    Returns:
        uint8 array HxW (greyscale) or HxWx3 (colour).

    Raises:
        InputError: 400 (empty, not an image, damaged, truncated or smaller than 8x8) or 413
            (too many pixels).
    """
    if not data:
        raise InputError(400, f"{name}: empty body; send the bytes of one image")

    def check_size(height: int, width: int) -> None:
        if processed is not None:
            InputLimits(None, None, max_processed_pixels).check_processed(
                name, *processed(height, width)
            )

    try:
        array = decode_bytes(
            data,
            name=name,
            max_pixels=max_pixels,
            max_aspect_ratio=max_aspect_ratio,
            check_size=check_size,
        )
    except ImageTooLargeError as exc:
        raise InputError(413, str(exc)) from None
    except ImageReadError as exc:
        raise InputError(400, str(exc)) from None
    height, width = array.shape[:2]
    if min(height, width) < 8:
        raise InputError(400, f"{name}: {width}x{height} image is too small (at least 8x8)")
    return array


# ---------------------------------------------------------------------- API models


class Location(BaseModel):
    """A pixel position in the uploaded image (origin top left)."""

    x: int
    y: int


class DefectRegion(BaseModel):
    """A connected region of the anomaly map at or above ``region_threshold``, in the uploaded
    image's pixels: the box is ``[x0, x1) x [y0, y1)`` (x1, y1 exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int
    area: int = Field(description="pixels in the region")
    peak: float = Field(description="largest map value in the region")
    mean: float = Field(description="mean map value over the region")
    peak_x: int
    peak_y: int


class Timing(BaseModel):
    """Milliseconds spent in each stage of one request (server side)."""

    queue_ms: float = Field(description="waiting for a free worker")
    decode_ms: float = Field(description="decoding the upload")
    inference_ms: float = Field(description="detector (features, search, map)")
    total_ms: float = Field(description="from admission to the answer")


class _ImageVerdict(BaseModel):
    """The fields an inspection and an explanation of one image open with."""

    filename: str | None = None
    width: int
    height: int
    score: float = Field(description="image anomaly score")
    threshold: float
    verdict: Literal["pass", "fail"] = Field(description="fail when score >= threshold")


class Inspection(_ImageVerdict):
    """The verdict on one image. Scores: higher = more anomalous."""

    normalized_score: float = Field(
        description="score mapped onto [0, 1] with the threshold at 0.5, linear between the "
        "lowest / highest calibration score and the threshold, clipped (a mapping, not a "
        "probability); fail exactly when >= 0.5"
    )
    anomalous: bool
    map_max: float = Field(description="largest value of the anomaly map")
    map_max_location: Location
    heatmap_url: str | None = Field(None, description="overlay PNG, when heatmap=url was asked")
    region_threshold: float | None = Field(
        None, description="map value the defect regions are cut at"
    )
    regions: list[DefectRegion] = Field(
        default_factory=list,
        description="defect regions (at least the model's minimum area), largest peak first",
    )
    timing: Timing


class BatchItem(BaseModel):
    """One image of a batch: an inspection, or why the image was refused."""

    index: int
    filename: str | None = None
    result: Inspection | None = None
    status: int = Field(200, description="HTTP status this image alone would have had")
    error: str | None = None
    verdict: Literal["pass", "fail", "error"] | None = Field(
        None, description="the result's verdict, or error when the image scored non-finite"
    )


class BatchInspection(BaseModel):
    """All images of a batch, in upload order; a bad image does not spoil the others."""

    count: int
    flagged: int = Field(description="images with verdict fail (judged anomalous)")
    failed: int = Field(
        description="the same number as flagged, under its older name (kept for compatibility; "
        "it counts fail verdicts, not errors)"
    )
    errors: int = Field(description="images that could not be scored")
    results: list[BatchItem]
    total_ms: float


class PatchBox(BaseModel):
    """A patch's pixels, (top, left) inclusive, (bottom, right) exclusive."""

    top: int
    left: int
    bottom: int
    right: int


class NearestPatch(BaseModel):
    """The normal training patch nearest to the worst patch (from the bank's provenance)."""

    bank_row: int
    training_image: int | None = Field(None, description="training image index; None: unknown")
    training_file: str | None = Field(None, description="its file name (no folders)")
    box: PatchBox | None = Field(None, description="in the training image's own pixels")


class ExplanationResult(_ImageVerdict):
    """Why one image scored what it did. Scores: higher = more anomalous."""

    score: float = Field(description="image anomaly score, as /v1/inspect gives it")
    distance: float = Field(description="the worst patch's distance to the nearest bank row")
    worst_patch: PatchBox = Field(description="the image's worst patch, in its pixels")
    nearest: NearestPatch
    note: str | None = Field(None, description="why the training side is missing, if it is")
    inference_ms: float


def _box(b: Any) -> PatchBox:
    return PatchBox(top=b[0], left=b[1], bottom=b[2], right=b[3])


# ---------------------------------------------------------------------- state


class _Gate:
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


@dataclass
class _Stored:
    image: np.ndarray
    amap: np.ndarray
    display_range: tuple[float, float]

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.amap.nbytes)


class HeatmapStore:
    """Bounded in-memory store of (image, map) pairs, oldest evicted first."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, item: _Stored) -> str | None:
        """Store ``item``; returns its id, or None when it alone exceeds the budget."""
        if item.nbytes > self.max_bytes:
            return None
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = item
            self._bytes += item.nbytes
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return key

    def get(self, key: str) -> _Stored | None:
        with self._lock:
            return self._items.get(key)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Scored:
    score: float
    anomalous: bool
    amap: np.ndarray
    image: np.ndarray
    decode_ms: float
    inference_ms: float
    queue_ms: float
    regions: list[Region] = field(default_factory=list)


class _Service:
    """Everything the routes share: the detector, pools, gate, store and readiness."""

    def __init__(
        self,
        model: PatchCore | str | os.PathLike,
        limits: ServiceLimits,
        token: str | None,
        threshold: float | None,
        display_range: tuple[float, float] | None,
    ) -> None:
        self.limits = limits
        self.token = token or None
        self.threshold_override = threshold
        self.display_range_arg = display_range
        self.model_path: Path | None = None
        self.detector: PatchCore | None = None
        if isinstance(model, PatchCore):
            self.detector = model
            self._check_detector(model)
        else:
            self.model_path = Path(model)
            if not self.model_path.is_file():
                raise FileNotFoundError(f"{self.model_path}: no such model file")
        self.gate = _Gate(limits.workers + limits.queue_length)
        self.upload_gate = _Gate(limits.upload_slots)
        self.free_workers = asyncio.Semaphore(limits.workers)
        self.render_gate = _Gate(2 + limits.queue_length)
        self.store = HeatmapStore(limits.heatmap_store_items, limits.heatmap_store_bytes)
        self.pool: ThreadPoolExecutor | None = None
        self.render_pool: ThreadPoolExecutor | None = None
        self.ready = False
        self.load_error: str | None = None
        self.started = time.time()
        self.inspected = 0

    def _check_detector(self, det: PatchCore) -> None:
        if not hasattr(det, "memory_bank_"):
            raise ValueError("the detector is not fitted; fit or load one before serving it")
        if self.threshold_override is not None:
            det.set_threshold(self.threshold_override, method="manual (service)")
        if getattr(det, "threshold_", None) is None:
            raise ValueError(
                "the model has no threshold, so it cannot give verdicts; calibrate it "
                "(PatchCore.calibrate / set_threshold) and save it again, or pass a threshold"
            )

    # -- life cycle

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="patchcore-score")
        self.render_pool = ThreadPoolExecutor(2, thread_name_prefix="patchcore-render")
        self.pool.submit(self._load_and_warm_up)

    def stop(self) -> None:
        for pool in (self.pool, self.render_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _load_and_warm_up(self) -> None:
        try:
            if self.detector is None:
                assert self.model_path is not None
                det = PatchCore.load(self.model_path)
                self._check_detector(det)
                self.detector = det
            det = self.detector
            det.check_finite()  # a NaN in the bank, backbone or threshold: never ready
            t0 = time.perf_counter()
            h, w = output_size(256, 256, det.image_size, None)  # the model's size, or 256
            r = det.score([np.full((h, w, 3), 128, np.uint8)], maps="native", progress=False)
            if not np.isfinite(r.scores).all():
                raise ValueError(f"the warm-up image scored {r.scores[0]!r}, not a number")
            logger.info(
                "model ready: %s, bank %d, threshold %.6g (warm-up %.2f s)",
                det.backbone,
                det.memory_bank_.shape[0],
                det.threshold_,
                time.perf_counter() - t0,
            )
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and logged once
            self.load_error = f"{type(exc).__name__}: {one_line(exc, 200)}"
            logger.error("model could not be loaded: %s", self.load_error)

    # -- helpers

    @property
    def threshold(self) -> float:
        assert self.detector is not None
        return float(self.detector.threshold_)  # type: ignore[arg-type]

    @property
    def region_threshold(self) -> float:
        """The map value defect regions are cut at (``PatchCore.region_cut``)."""
        assert self.detector is not None
        return self.detector.region_cut()

    def display_range(self) -> tuple[float, float]:
        """Map values shown as the coldest / hottest colour: fixed, so colours compare."""
        if self.display_range_arg is not None:
            return self.display_range_arg
        assert self.detector is not None
        stored = self.detector.metadata_.get("display_range")  # chosen once, at calibration
        if stored:  # the same colours as the CLI's heatmaps and the report
            return float(stored[0]), float(stored[1])
        t = self.threshold
        lo, hi = DISPLAY_RANGE_FACTORS
        return (lo * t, hi * t) if t > 0 else (t - 1.0, t + 1.0)

    def check_ready(self) -> None:
        if not self.ready:
            reason = self.load_error or "model is still loading / warming up"
            raise _Reject(503, f"not ready: {reason}", retry_after=self.limits.retry_after_s)

    @contextlib.asynccontextmanager
    async def admitted(self, gate: _Gate) -> AsyncIterator[float]:
        """Hold a slot of ``gate`` (503 when full or not ready); yields the admission time."""
        self.check_ready()
        if not gate.try_enter():
            raise _Reject(
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
    async def receiving(self) -> AsyncIterator[None]:
        """Hold an upload slot while a body is received (503 when full or not ready)."""
        self.check_ready()
        if not self.upload_gate.try_enter():
            raise _Reject(
                503,
                f"busy: {self.upload_gate.capacity} uploads already being received "
                "(upload_slots); retry later",
                retry_after=self.limits.retry_after_s,
            )
        try:
            yield
        finally:
            self.upload_gate.leave()

    async def receive(self, reading: Any) -> Any:
        """Await ``reading`` (the body) within ``body_timeout_s`` (408 after it)."""
        timeout = self.limits.body_timeout_s
        try:
            return await asyncio.wait_for(reading, timeout)
        except TimeoutError:
            raise _Reject(
                408, f"request body not received within {timeout} s (body_timeout_s)"
            ) from None

    def inspection(
        self, name: str | None, s: _Scored, total_ms: float, heatmap_url: str | None
    ) -> Inspection:
        """The JSON answer for one scored image."""
        iy, ix = np.unravel_index(int(np.argmax(s.amap)), s.amap.shape)
        return Inspection(
            filename=name,
            width=int(s.image.shape[1]),
            height=int(s.image.shape[0]),
            score=s.score,
            threshold=self.threshold,
            verdict="fail" if s.anomalous else "pass",
            normalized_score=float(self.detector.normalize(s.score)),  # type: ignore[union-attr]
            anomalous=s.anomalous,
            map_max=float(s.amap[iy, ix]),
            map_max_location=Location(x=int(ix), y=int(iy)),
            heatmap_url=heatmap_url,
            region_threshold=self.region_threshold,
            regions=[DefectRegion(**r.as_dict()) for r in s.regions],
            timing=Timing(
                queue_ms=round(s.queue_ms, 2),
                decode_ms=round(s.decode_ms, 2),
                inference_ms=round(s.inference_ms, 2),
                total_ms=round(total_ms, 2),
            ),
        )

    def remember(self, s: _Scored) -> str | None:
        """Keep an overlay for ``GET /v1/heatmaps/{id}``; its URL, or None when too big."""
        key = self.store.put(_Stored(s.image, s.amap, self.display_range()))
        return None if key is None else f"/v1/heatmaps/{key}"

    async def score_or_500(
        self, request: Request, blobs: list[tuple[str, bytes]], t0: float
    ) -> list[Any]:
        """:meth:`score` in the worker pool once a worker is free, unless the client has gone
        by then (:class:`_GoneError`: nothing is scored); an unexpected failure is a logged 500."""
        async with self.free_workers:
            if await request.is_disconnected():
                raise _GoneError("client went away while queued; not scored")
            try:
                return await self.run(self.pool, self.score, blobs, t0)
            except Exception as exc:  # noqa: BLE001
                logger.exception("scoring failed")
                raise HTTPException(
                    500, f"internal error while scoring: {one_line(exc, 200)}"
                ) from None

    # -- work (runs in the worker threads)

    def _decode(self, det: Any, name: str, data: bytes) -> np.ndarray:
        """One upload decoded under the service's limits (raises InputError)."""
        return decode_image(
            data,
            self.limits.max_pixels,
            name,
            max_aspect_ratio=self.limits.max_aspect_ratio,
            processed=lambda h, w: output_size(h, w, det.image_size, det.scale),
            max_processed_pixels=self.limits.max_processed_pixels,
        )

    def score(self, blobs: list[tuple[str, bytes]], admitted: float) -> list[_Scored | InputError]:
        """Decode and score several uploads in one detector call; bad ones become InputError."""
        started = time.perf_counter()
        queue_ms = (started - admitted) * 1000.0
        det = self.detector
        assert det is not None
        decoded: list[np.ndarray | InputError] = []
        decode_ms: list[float] = []
        for name, data in blobs:
            t = time.perf_counter()
            try:
                decoded.append(self._decode(det, name, data))
            except InputError as exc:
                decoded.append(exc)
            decode_ms.append((time.perf_counter() - t) * 1000.0)
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        results: dict[int, _Scored | InputError] = {
            i: d for i, d in enumerate(decoded) if isinstance(d, InputError)
        }
        if good:
            images = [decoded[i] for i in good]
            t = time.perf_counter()
            try:
                r = det.score(images, maps="native", progress=False)
            except ImageReadError as exc:  # e.g. an array the detector cannot take
                bad = InputError(400, f"{blobs[good[0]][0]}: {exc.problem}")
                for i in good:
                    results[i] = bad
            else:
                cut = self.region_threshold
                per_image = (time.perf_counter() - t) * 1000.0 / len(good)
                assert r.maps is not None
                for j, i in enumerate(good):
                    if not math.isfinite(float(r.scores[j])):  # fail closed, never a pass
                        logger.error("%s scored %r: no verdict", blobs[i][0], r.scores[j])
                        results[i] = InputError(
                            500,
                            f"{blobs[i][0]}: scored {float(r.scores[j])!r}, so no verdict "
                            "(verdict error): the model holds non-finite values or overflowed",
                        )
                        continue
                    results[i] = _Scored(
                        score=float(r.scores[j]),
                        anomalous=bool(r.scores[j] >= self.threshold),
                        amap=r.maps[j],  # type: ignore[arg-type]
                        image=images[j],  # type: ignore[arg-type]
                        decode_ms=decode_ms[i],
                        inference_ms=per_image,
                        queue_ms=queue_ms,
                        regions=label_regions(r.maps[j], cut),
                    )
        return [results[i] for i in range(len(blobs))]

    def explain(self, name: str, data: bytes) -> ExplanationResult | InputError:
        """Decode one upload and explain its score (:meth:`PatchCore.explain`)."""
        det = self.detector
        assert det is not None
        try:
            image = self._decode(det, name, data)
        except InputError as exc:
            return exc
        t = time.perf_counter()
        try:
            [e] = det.explain([image], progress=False)
        except ImageReadError as exc:
            return InputError(400, f"{name}: {exc.problem}")
        if not math.isfinite(e.score):  # fail closed, never a pass
            return InputError(500, f"{name}: scored {e.score!r}, so no verdict (verdict error)")
        anomalous = e.score >= self.threshold
        return ExplanationResult(
            filename=None if name == "body" else name,
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            score=e.score,
            threshold=self.threshold,
            verdict="fail" if anomalous else "pass",
            distance=e.distance,
            worst_patch=_box(e.box),
            nearest=NearestPatch(
                bank_row=int(e.bank_row),  # type: ignore[arg-type]
                training_image=e.train_index,
                training_file=Path(e.train_name).name if e.train_name else None,
                box=_box(e.train_box) if e.train_box else None,
            ),
            note=e.note,
            inference_ms=round((time.perf_counter() - t) * 1000.0, 2),
        )

    def render(self, item: _Stored, alpha: float) -> bytes:
        from patchcore.apps.plots import anomaly_map_overlay

        rgb = anomaly_map_overlay(item.image, item.amap, item.display_range, alpha=alpha)
        return _png(rgb)

    async def run(self, pool: ThreadPoolExecutor | None, fn, *args):  # noqa: ANN001, ANN201
        assert pool is not None
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


class _GoneError(Exception):
    """The client disconnected: nothing to answer; logged as one line."""


class _Reject(HTTPException):
    """An HTTPException that is logged once (at WARNING) by the app's handler.

    ``verdict=True`` adds ``"verdict": "error"`` to the JSON body: the image was read but no
    verdict can be given (a non-finite score), which a client must not take for a pass.
    """

    def __init__(
        self, status: int, detail: str, retry_after: int | None = None, verdict: bool = False
    ) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.verdict_error = verdict


# ---------------------------------------------------------------------- request bodies


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise _Reject(400, f"bad Content-Length header {declared!r}") from None
        if n > limit:
            raise _Reject(
                413, f"request of {n:,} bytes is over the limit of {limit:,} (max_request_bytes)"
            )
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _Reject(
                    413, f"request is over the limit of {limit:,} bytes (max_request_bytes)"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise _GoneError(f"client went away after {total:,} bytes of the body") from None
    return b"".join(chunks)


async def _uploads(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """The (filename, bytes) of every file part of a multipart body, in order."""

    async def replay() -> dict[str, Any]:
        nonlocal body
        chunk, body = body, b""
        return {"type": "http.request", "body": chunk, "more_body": False}

    parsed = Request(request.scope, receive=replay)
    try:
        form = await parsed.form(max_files=max_files, max_fields=max_files + 16)
    except MultiPartException as exc:
        # starlette's message for too many files mentions the limit; keep it on one line.
        raise _Reject(400, f"malformed multipart body: {one_line(exc, 200)}") from None
    try:
        out = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append(((value.filename or key)[:200], await value.read()))
        return out
    finally:
        await form.close()


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _wrong_type(ctype: str, batch: bool) -> _Reject:
    if batch:
        return _Reject(
            415,
            f"unsupported Content-Type {ctype!r}; send multipart/form-data with one or more "
            "'files' parts (curl -F files=@a.png -F files=@b.png)",
        )
    return _Reject(
        415,
        f"unsupported Content-Type {ctype!r}; send multipart/form-data with a 'file' part "
        "(curl -F file=@x.png) or the raw image with Content-Type image/* or "
        "application/octet-stream",
    )


# ---------------------------------------------------------------------- routes


def get_service(request: Request) -> _Service:
    """The shared state of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.service


ServiceDep = Annotated[_Service, Depends(get_service)]
_bearer = HTTPBearer(auto_error=False, description="the token given to `patchcore serve`")


async def require_token(
    svc: ServiceDep, cred: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """401 unless the request carries the service's bearer token (when one is set)."""
    if svc.token is None:
        return
    given = cred.credentials if cred is not None else ""
    if not secrets.compare_digest(given.encode(), svc.token.encode()):
        raise HTTPException(
            401,
            "missing or wrong bearer token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


#: ``/v1/*``: behind the token.
api = APIRouter(dependencies=[Depends(require_token)])
#: Health, readiness and the page: always open.
public = APIRouter()

#: The error answers of the routes that take one uploaded image (/v1/inspect, /v1/explain).
_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "empty, not an image, damaged or truncated"},
    401: {"description": "token required"},
    413: {"description": "request or image too large"},
    415: {"description": "unsupported Content-Type"},
    503: {"description": "busy or not ready; see Retry-After"},
}

_BINARY = {"type": "string", "format": "binary"}
_INSPECT_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": _BINARY},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
        "required": True,
    }
}
_BATCH_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": _BINARY}},
                    "required": ["files"],
                }
            }
        },
        "required": True,
    }
}


async def _one_upload(request: Request, multipart: bool, limit: int) -> tuple[str | None, bytes]:
    body = await _read_body(request, limit)
    if not multipart:
        return None, body
    files = await _uploads(request, body, max_files=1)
    if not files:
        raise _Reject(400, "multipart body has no file part; send it as 'file'")
    return files[0]


@api.post(
    "/v1/inspect",
    response_model=Inspection,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG overlay"},
        **_UPLOAD_ERRORS,
    },
    summary="Inspect one image",
    openapi_extra=_INSPECT_BODY,
)
async def inspect(
    request: Request,
    svc: ServiceDep,
    heatmap: Literal["none", "png", "url"] = Query(
        "none", description="png: answer with the overlay PNG; url: add heatmap_url"
    ),
    alpha: float = Query(0.5, ge=0.0, le=1.0, description="overlay opacity for heatmap=png"),
) -> Any:
    """Score one image: a multipart `file` part, or the raw bytes as the body."""
    ctype = _content_type(request)
    multipart = ctype == "multipart/form-data"
    if not (multipart or ctype == "" or ctype.startswith(RAW_CONTENT_TYPES)):
        raise _wrong_type(ctype, batch=False)
    async with svc.receiving():
        upload = _one_upload(request, multipart, svc.limits.max_request_bytes)
        name, data = await svc.receive(upload)
        async with svc.admitted(svc.gate) as t0:
            [result] = await svc.score_or_500(request, [(name or "body", data)], t0)
            return await _answer(svc, name, result, heatmap, alpha, t0)


async def _answer(
    svc: _Service, name: str | None, result: Any, heatmap: str, alpha: float, t0: float
) -> Any:
    """The answer to ``/v1/inspect``: JSON, or the overlay PNG; an InputError is raised."""
    if isinstance(result, InputError):
        raise _Reject(result.status, result.detail, verdict=result.status >= 500)
    svc.inspected += 1
    if heatmap == "png":
        item = _Stored(result.image, result.amap, svc.display_range())
        png = await svc.run(svc.pool, svc.render, item, alpha)
        total = (time.perf_counter() - t0) * 1000.0
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Patchcore-Score": repr(result.score),
                "X-Patchcore-Threshold": repr(svc.threshold),
                "X-Patchcore-Normalized-Score": repr(float(svc.detector.normalize(result.score))),  # type: ignore[union-attr]
                "X-Patchcore-Verdict": "fail" if result.anomalous else "pass",
                "X-Patchcore-Total-Ms": f"{total:.2f}",
            },
        )
    url = svc.remember(result) if heatmap == "url" else None
    return svc.inspection(name, result, (time.perf_counter() - t0) * 1000.0, url)


@api.post(
    "/v1/explain",
    response_model=ExplanationResult,
    responses={**_UPLOAD_ERRORS},
    summary="Explain one image's score",
    openapi_extra=_INSPECT_BODY,
)
async def explain(request: Request, svc: ServiceDep) -> ExplanationResult:
    """The image's worst patch and the nearest normal training patch: which training image,
    where in its pixels, how far. The same body as `/v1/inspect`."""
    ctype = _content_type(request)
    multipart = ctype == "multipart/form-data"
    if not (multipart or ctype == "" or ctype.startswith(RAW_CONTENT_TYPES)):
        raise _wrong_type(ctype, batch=False)
    async with svc.receiving():
        name, data = await svc.receive(
            _one_upload(request, multipart, svc.limits.max_request_bytes)
        )
        async with svc.admitted(svc.gate), svc.free_workers:
            result = await svc.run(svc.pool, svc.explain, name or "body", data)
    if isinstance(result, InputError):
        raise _Reject(result.status, result.detail, verdict=result.status >= 500)
    return result


@api.post(
    "/v1/inspect/batch",
    response_model=BatchInspection,
    summary="Inspect several images",
    responses={
        400: {"description": "no file parts, or malformed multipart"},
        401: {"description": "token required"},
        413: {"description": "request too large or too many images"},
        415: {"description": "not multipart/form-data"},
        503: {"description": "busy or not ready; see Retry-After"},
    },
    openapi_extra=_BATCH_BODY,
)
async def inspect_batch(
    request: Request,
    svc: ServiceDep,
    heatmap: Literal["none", "url"] = Query("none", description="url: add heatmap_url"),
) -> BatchInspection:
    """Score several images (multipart parts, any field name). An unreadable image gets its
    own `status` and `error` in its slot; the others are still scored."""
    ctype = _content_type(request)
    if ctype != "multipart/form-data":
        raise _wrong_type(ctype, batch=True)
    lim = svc.limits
    async with svc.receiving():
        files = await svc.receive(_batch_upload(request, lim))
        async with svc.admitted(svc.gate) as t0:
            results = await svc.score_or_500(request, files, t0)
            return _batch_answer(svc, files, results, heatmap, t0)


async def _batch_upload(request: Request, lim: ServiceLimits) -> list[tuple[str, bytes]]:
    body = await _read_body(request, lim.max_request_bytes)
    files = await _uploads(request, body, max_files=lim.max_batch_images + 1)
    if not files:
        raise _Reject(400, "multipart body has no file parts; send them as 'files'")
    if len(files) > lim.max_batch_images:
        raise _Reject(
            413, f"more than {lim.max_batch_images} images in one batch (max_batch_images)"
        )
    return files


def _batch_answer(
    svc: _Service, files: list[tuple[str, bytes]], results: list[Any], heatmap: str, t0: float
) -> BatchInspection:
    """The answer to ``/v1/inspect/batch``: one entry per image, in upload order."""
    total = (time.perf_counter() - t0) * 1000.0
    items = []
    for i, ((name, _), r) in enumerate(zip(files, results, strict=True)):
        if isinstance(r, InputError):
            logger.warning("POST /v1/inspect/batch image %d -> %d: %s", i, r.status, r.detail)
            items.append(
                BatchItem(
                    index=i,
                    filename=name,
                    status=r.status,
                    error=r.detail,
                    verdict="error" if r.status >= 500 else None,
                )
            )
        else:
            url = svc.remember(r) if heatmap == "url" else None
            result = svc.inspection(name, r, total, url)
            items.append(BatchItem(index=i, filename=name, result=result, verdict=result.verdict))
    svc.inspected += sum(1 for it in items if it.result is not None)
    flagged = sum(1 for it in items if it.result is not None and it.result.anomalous)
    return BatchInspection(
        count=len(items),
        flagged=flagged,
        failed=flagged,
        errors=sum(1 for it in items if it.error is not None),
        results=items,
        total_ms=round(total, 2),
    )


@api.get(
    "/v1/heatmaps/{key}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown or evicted"}},
    summary="An overlay from a recent inspection",
)
async def heatmap_png(
    key: str,
    svc: ServiceDep,
    alpha: float = Query(0.5, ge=0.0, le=1.0, description="1: colour map only; 0: image only"),
) -> Response:
    """The overlay PNG of a recent `heatmap=url` inspection (kept in a bounded store)."""
    item = svc.store.get(key)
    if item is None:
        raise _Reject(404, "no such heatmap (unknown id, or evicted from the bounded store)")
    async with svc.admitted(svc.render_gate):
        png = await svc.run(svc.render_pool, svc.render, item, alpha)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@api.get("/v1/model", summary="The model card")
async def model_card(svc: ServiceDep) -> dict[str, Any]:
    """Backbone, image size, bank size, threshold and method, versions, service limits."""
    svc.check_ready()
    det = svc.detector
    assert det is not None
    card = det.card()
    card["threshold"] = svc.threshold
    card["display_range"] = list(svc.display_range())
    card["model_file"] = svc.model_path.name if svc.model_path is not None else None
    card["patchcore_version"] = package_version()
    card["limits"] = asdict(svc.limits)
    card["token_required"] = svc.token is not None
    return card


@public.get("/healthz", summary="Liveness")
async def healthz(svc: ServiceDep) -> dict[str, Any]:
    """200 while the process answers, whatever the model is doing."""
    return {"status": "ok", "uptime_s": round(time.time() - svc.started, 1)}


@public.get("/readyz", summary="Readiness", responses={503: {"description": "not ready"}})
async def readyz(svc: ServiceDep) -> JSONResponse:
    """200 once the model is loaded and warmed up, 503 before (or if loading failed)."""
    body = {
        "ready": svc.ready,
        "in_flight": svc.gate.in_flight,
        "capacity": svc.gate.capacity,
        "inspected": svc.inspected,
    }
    if svc.ready:
        return JSONResponse(body)
    body["reason"] = svc.load_error or "loading"
    return JSONResponse(body, 503, headers={"Retry-After": str(svc.limits.retry_after_s)})


@public.get("/docs", include_in_schema=False)
async def docs_page(request: Request) -> Response:
    """The API reference as one self-contained page (no CDN: it works offline)."""
    import html

    spec = request.app.openapi()
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            codes = ", ".join(
                f"{c} {html.escape(str(r.get('description', '')))}"
                for c, r in op.get("responses", {}).items()
            )
            rows.append(
                f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                f"<td><b>{html.escape(op.get('summary', ''))}</b><br>"
                f"{html.escape(op.get('description', ''))}<br><small>{codes}</small></td></tr>"
            )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>patchcore API</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}"
        "td{vertical-align:top;padding:.4rem .8rem;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>{html.escape(spec['info']['title'])} "
        f"{html.escape(spec['info']['version'])}</h1>"
        f"<p>{html.escape(spec['info'].get('description', ''))}</p>"
        "<p>The machine-readable schema: <a href='/openapi.json'>/openapi.json</a> (load it "
        "into any OpenAPI viewer). More: docs/service.md in the patchcore sources.</p>"
        f"<table>{''.join(rows)}</table></body></html>"
    )
    return Response(page, media_type="text/html")


@public.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _log_rejection(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code >= 400:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, detail)
    body = {"detail": detail}
    if getattr(exc, "verdict_error", False):
        body["verdict"] = "error"
    return JSONResponse(body, exc.status_code, headers=exc.headers)


async def _log_gone(request: Request, exc: Exception) -> Response:
    """A client that disconnected: one INFO line, no traceback, nothing scored."""
    logger.info("%s %s: %s", request.method, request.url.path, exc)
    return Response(status_code=499)


async def _log_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    detail = "invalid request: " + "; ".join(parts)
    logger.warning("%s %s -> 422: %s", request.method, request.url.path, detail)
    return JSONResponse({"detail": detail}, 422)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc: _Service = app.state.service
    svc.start()
    try:
        yield
    finally:
        svc.stop()


# ---------------------------------------------------------------------- app


def _check_display_range(display_range: tuple[float, float] | None) -> tuple[float, float] | None:
    if display_range is None:
        return None
    lo, hi = (float(v) for v in display_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"display_range must be two finite numbers lo < hi, got {display_range!r}")
    return (lo, hi)


def create_app(
    model: PatchCore | str | os.PathLike,
    *,
    token: str | None = None,
    threshold: float | None = None,
    display_range: tuple[float, float] | None = None,
    **limits: Any,
) -> FastAPI:
    """Build the inspection service around one detector.

    Args:
        model: a fitted :class:`PatchCore` (already loaded; warmed up at start-up) or the path
            of a saved model, loaded in the background at start-up (``/readyz`` says when).
        token: when set, ``/v1/*`` needs ``Authorization: Bearer <token>``. This function does
            not read the environment; :func:`serve` falls back to ``$PATCHCORE_TOKEN``.
        threshold: overrides the model's own ``threshold_``. The model must have one or the
            other, or there are no verdicts to give.
        display_range: map values drawn as the coldest / hottest overlay colour; default
            ``DISPLAY_RANGE_FACTORS x threshold`` so colours mean the same thing on every image.
        **limits: any field of :class:`ServiceLimits` (``max_request_bytes``, ``max_pixels``,
            ``max_aspect_ratio``, ``max_processed_pixels``, ``max_batch_images``, ``workers``,
            ``queue_length``, ``upload_slots``, ``body_timeout_s``, ``heatmap_store_items``,
            ``heatmap_store_bytes``, ``retry_after_s``); None keeps the default.

    Returns:
        The FastAPI app (serve it with uvicorn; its lifespan starts and stops the workers).
    """
    lim = ServiceLimits.from_kwargs(limits)
    svc = _Service(model, lim, token, threshold, _check_display_range(display_range))
    app = FastAPI(
        title="patchcore inspection service",
        version=package_version(),
        description="PatchCore anomaly detection for images from the line. Scores: higher = "
        "more anomalous; verdict `fail` when score >= threshold. The page is at `/`.",
        lifespan=_lifespan,
        docs_url=None,  # Swagger UI loads from a CDN: blank offline; /docs is served instead
        redoc_url=None,
    )
    app.state.service = svc
    app.add_exception_handler(HTTPException, _log_rejection)
    app.add_exception_handler(RequestValidationError, _log_invalid)
    app.add_exception_handler(_GoneError, _log_gone)
    app.include_router(api)
    app.include_router(public)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token stored in a file (surrounding whitespace stripped).

    Raises:
        ValueError: the file is empty.
        OSError: it cannot be read.
    """
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path}: token file is empty")
    return token


def serve(
    model_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    threshold: float | None = None,
    display_range: tuple[float, float] | None = None,
    log_level: str = "info",
    **limits: Any,
) -> None:
    """Load the model (errors surface here, before the port opens) and run the service.

    Args:
        model_path: the saved model; the only file the service ever reads.
        host: bind address; the default keeps the service on this machine.
        port: TCP port.
        token: bearer token for ``/v1/*``; None falls back to ``$PATCHCORE_TOKEN``; empty = off.
            (Prefer the variable or :func:`read_token_file` to a literal on a command line,
            which other users can read in ``ps``.)
        threshold: overrides the model's threshold.
        display_range: see :func:`create_app`.
        log_level: uvicorn's log level.
        **limits: see :class:`ServiceLimits`.
    """
    import uvicorn

    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    lim = ServiceLimits.from_kwargs(limits)  # fail on a bad limit before loading anything
    det = PatchCore.load(model_path)
    app = create_app(
        det, token=token, threshold=threshold, display_range=display_range, **asdict(lim)
    )
    app.state.service.model_path = Path(model_path)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO))
    logger.info(
        "serving %s on http://%s:%d/ (token %s)",
        model_path,
        host,
        port,
        "required" if token else "off",
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
