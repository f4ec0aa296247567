"""The work behind the upload routes: decode under the limits, score with the backend, and
present each result as the record's fields plus the service's extras.

:func:`score_uploads` and :func:`explain_upload` run in the worker threads; :func:`scored`
hands them to the pool once a worker is free (and not at all when the client has gone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import HTTPException, Request

from patchcore.apps.service.backends import ExplainUnavailableError, status_of
from patchcore.apps.service.decoding import decode_image
from patchcore.apps.service.dependencies import Service
from patchcore.apps.service.errors import GoneError, InputError, logger
from patchcore.apps.service.heatmaps import Stored
from patchcore.lean import record
from patchcore.lean.util import one_line

__all__ = ["Scored", "answer", "explain_upload", "png_headers", "score_uploads", "scored"]


@dataclass
class Scored:
    """One upload's record (with its map), the HTTP status it alone has, and its timing."""

    record: record.Inspection
    status: int
    image: np.ndarray | None
    decode_ms: float
    inference_ms: float
    queue_ms: float

    def stored(self, display_range: tuple[float, float] | None) -> Stored:
        assert self.image is not None and self.record.anomaly_map is not None
        return Stored(self.image, self.record.anomaly_map, display_range)


def _problem(name: str, detail: str) -> str:
    """A refusal's reason without the leading name (the record names the image)."""
    return detail.removeprefix(f"{name}: ")


def decode_upload(svc: Service, name: str, data: bytes) -> np.ndarray:
    """One upload decoded under the service's limits (raises :class:`InputError`)."""
    lim = svc.limits
    return decode_image(
        data,
        lim.max_pixels,
        name,
        max_aspect_ratio=lim.max_aspect_ratio,
        processed=svc.backend.processed_size,
        max_processed_pixels=lim.max_processed_pixels,
    )


def score_uploads(svc: Service, blobs: list[tuple[str, bytes]], admitted: float) -> list[Scored]:
    """Decode and score uploads in one backend call; each refused one is an error record with
    its status (400 / 413), a non-finite score an error record with status 500."""
    queue_ms = (time.perf_counter() - admitted) * 1000.0
    threshold = svc.threshold
    decoded: list[np.ndarray | InputError] = []
    decode_ms: list[float] = []
    for name, data in blobs:
        t = time.perf_counter()
        try:
            decoded.append(decode_upload(svc, name, data))
        except InputError as exc:
            decoded.append(exc)
        decode_ms.append((time.perf_counter() - t) * 1000.0)
    good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
    t = time.perf_counter()
    records = svc.backend.inspect([(blobs[i][0], decoded[i]) for i in good]) if good else []
    per_image = (time.perf_counter() - t) * 1000.0 / max(1, len(good))
    by_index = dict(zip(good, records, strict=True))
    out = []
    for i, ((name, _), d) in enumerate(zip(blobs, decoded, strict=True)):
        if isinstance(d, InputError):
            rec = record.error_record(name, i, _problem(name, d.detail), threshold=threshold)
            out.append(Scored(rec, d.status, None, decode_ms[i], 0.0, queue_ms))
            continue
        rec = replace(by_index[i], index=i)
        status = status_of(rec)
        if status != 200:
            logger.error("%s: no verdict: %s", name, rec.error)
            rec = replace(rec, width=int(d.shape[1]), height=int(d.shape[0]))
        out.append(Scored(rec, status, d, decode_ms[i], per_image, queue_ms))
    return out


async def scored(
    svc: Service, request: Request, blobs: list[tuple[str, bytes]], t0: float
) -> list[Scored]:
    """:func:`score_uploads` in the worker pool once a worker is free, unless the client has
    gone by then (:class:`GoneError`: nothing scored); an unexpected failure is a logged 500."""
    async with svc.free_workers:
        if await request.is_disconnected():
            raise GoneError("client went away while queued; not scored")
        try:
            return await svc.run(svc.pool, score_uploads, svc, blobs, t0)
        except HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001
            logger.exception("scoring failed")
            raise HTTPException(
                500, f"internal error while scoring: {one_line(exc, 200)}"
            ) from None


def timing(s: Scored, total_ms: float) -> dict[str, float]:
    return {
        "queue_ms": round(s.queue_ms, 2),
        "decode_ms": round(s.decode_ms, 2),
        "inference_ms": round(s.inference_ms, 2),
        "total_ms": round(total_ms, 2),
    }


def answer(svc: Service, s: Scored, total_ms: float, heatmap_url: str | None) -> dict[str, Any]:
    """The JSON for one image: the record's fields, then ``timing``, ``backend``,
    ``heatmap_url``."""
    return {
        **record.as_dict(s.record),
        "timing": timing(s, total_ms),
        "backend": svc.backend.kind,
        "heatmap_url": heatmap_url,
    }


def png_headers(rec: record.Inspection, total_ms: float) -> dict[str, str]:
    """The record's scalar fields as ``X-Patchcore-<Field-Name>`` headers (for answers that
    are an overlay PNG), and the request's total milliseconds."""
    out = {}
    for name, value in record.as_dict(rec).items():
        if value is None or name == "regions":
            continue
        text = quote(value, safe=" ./#:()-_") if isinstance(value, str) else repr(value)
        out["X-Patchcore-" + "-".join(w.capitalize() for w in name.split("_"))] = text
    out["X-Patchcore-Regions-Count"] = str(len(rec.regions or ()))
    out["X-Patchcore-Total-Ms"] = f"{total_ms:.2f}"
    return out


def explain_upload(svc: Service, name: str, data: bytes, admitted: float) -> dict[str, Any]:
    """Decode one upload and explain its score: the record's fields (no map), then the
    explanation and the extras. A refusal raises :class:`InputError` carrying the record."""
    t0 = time.perf_counter()
    try:
        image = decode_upload(svc, name, data)
    except InputError as exc:
        problem = _problem(name, exc.detail)
        exc.record = record.error_record(name, 0, problem, threshold=svc.threshold)
        raise
    t1 = time.perf_counter()
    try:
        rec, why = svc.backend.explain(name, image)
    except ExplainUnavailableError as exc:
        raise InputError(501, str(exc)) from None
    status = status_of(rec)
    if status != 200:
        raise InputError(status, f"{name}: {rec.error}", record=rec)
    t2 = time.perf_counter()
    return {
        **record.as_dict(rec),
        **why,
        "timing": {
            "queue_ms": round((t0 - admitted) * 1000.0, 2),
            "decode_ms": round((t1 - t0) * 1000.0, 2),
            "inference_ms": round((t2 - t1) * 1000.0, 2),
            "total_ms": round((t2 - admitted) * 1000.0, 2),
        },
        "backend": svc.backend.kind,
    }
