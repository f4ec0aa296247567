"""``POST /v1/inspect`` (one image) and ``POST /v1/inspect/batch`` (several)."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from patchcore.apps.service.decoding import header_pixels
from patchcore.apps.service.dependencies import Service, ServiceDep, ServiceLimits
from patchcore.apps.service.errors import Reject, logger
from patchcore.apps.service.heatmaps import overlay_png
from patchcore.apps.service.schemas import BatchAnswer, InspectionAnswer
from patchcore.apps.service.scoring import Scored, answer, png_headers, scored
from patchcore.apps.service.uploads import (
    RAW_CONTENT_TYPES,
    content_type,
    read_body,
    read_uploads,
    wrong_type,
)
from patchcore.lean import record

__all__ = [
    "ONE_IMAGE_BODY",
    "UPLOAD_ERRORS",
    "check_one_image_type",
    "one_upload",
    "remember",
    "router",
]

router = APIRouter()

#: The error answers of the routes that take one uploaded image (/v1/inspect, /v1/explain).
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "empty, not an image, damaged or truncated (with its error record)"},
    401: {"description": "token required"},
    408: {"description": "body not received within body_timeout_s"},
    413: {"description": "request or image too large"},
    415: {"description": "unsupported Content-Type"},
    500: {"description": "scored non-finite: error record, never a verdict"},
    503: {"description": "busy or not ready; see Retry-After"},
}

_BINARY = {"type": "string", "format": "binary"}
ONE_IMAGE_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
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
_RAW_NAME = "image #0"


def check_one_image_type(request: Request) -> None:
    """415 unless the body is multipart, an image type, octet-stream or untyped (checked
    before an upload slot is taken or a byte is read)."""
    ctype = content_type(request)
    if ctype and ctype != "multipart/form-data" and not ctype.startswith(RAW_CONTENT_TYPES):
        raise wrong_type(ctype, batch=False)


async def one_upload(request: Request, limit: int) -> tuple[str, bytes]:
    """The one image of a request (a multipart file part, or the raw body) and its name."""
    if content_type(request) == "multipart/form-data":
        files = await read_uploads(request, limit, max_files=1)
        if not files:
            raise Reject(400, "multipart body has no file part; send it as 'file'")
        return files[0]
    return _RAW_NAME, await read_body(request, limit)


def _refuse(s: Scored) -> Reject:
    rec = s.record
    return Reject(s.status, f"{rec.image}: {rec.error}", record=record.as_dict(rec))


@router.post(
    "/v1/inspect",
    response_model=InspectionAnswer,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG overlay"},
        **UPLOAD_ERRORS,
    },
    summary="Inspect one image",
    openapi_extra=ONE_IMAGE_BODY,
)
async def inspect(
    request: Request,
    svc: ServiceDep,
    heatmap: Literal["none", "png", "url"] = Query(
        "none", description="png: answer with the overlay PNG; url: add heatmap_url"
    ),
    alpha: float = Query(0.5, ge=0.0, le=1.0, description="overlay opacity for heatmap=png"),
) -> Any:
    """Score one image: a multipart file part (`file`), or the raw bytes as the body. The
    answer is the inspection record's fields, then `timing`, `backend` and `heatmap_url`."""
    check_one_image_type(request)
    async with svc.receiving(request):
        name, data = await svc.receive(one_upload(request, svc.limits.max_request_bytes))
    async with svc.admitted(svc.gate) as t0:
        [s] = await scored(svc, request, [(name, data)], t0)
        if s.status != 200:
            raise _refuse(s)
        svc.inspected += 1
        if heatmap == "png":
            png = await svc.run(svc.pool, overlay_png, s.stored(svc.display_range()), alpha)
            total = (time.perf_counter() - t0) * 1000.0
            return Response(png, media_type="image/png", headers=png_headers(s.record, total))
        url = remember(svc, s) if heatmap == "url" else None
        return answer(svc, s, (time.perf_counter() - t0) * 1000.0, url)


def remember(svc: Service, s: Scored) -> str | None:
    """Keep an overlay for ``GET /v1/heatmaps/{id}``; its URL, or None when too big."""
    key = svc.store.put(s.stored(svc.display_range()))
    return None if key is None else f"/v1/heatmaps/{key}"


async def _batch_upload(request: Request, lim: ServiceLimits) -> list[tuple[str, bytes]]:
    files = await read_uploads(request, lim.max_request_bytes, max_files=lim.max_batch_images)
    if not files:
        raise Reject(400, "multipart body has no file parts; send them as 'files'")
    return files


def _check_batch_pixels(files: list[tuple[str, bytes]], lim: ServiceLimits) -> None:
    """413 when the images' headers declare more than ``max_batch_pixels`` in all."""
    total = sum(header_pixels(data) for _, data in files)
    if total > lim.max_batch_pixels:
        raise Reject(
            413,
            f"{len(files)} images of {total:,} pixels in all, over the limit of "
            f"{lim.max_batch_pixels:,} for one batch (max_batch_pixels); send fewer or "
            "smaller images",
        )


@router.post(
    "/v1/inspect/batch",
    response_model=BatchAnswer,
    summary="Inspect several images",
    responses={
        **{k: v for k, v in UPLOAD_ERRORS.items() if k != 500},
        400: {"description": "no file parts, or malformed multipart"},
        413: {"description": "request too large, too many images or pixels"},
        415: {"description": "not multipart/form-data"},
    },
    openapi_extra=_BATCH_BODY,
)
async def inspect_batch(
    request: Request,
    svc: ServiceDep,
    heatmap: Literal["none", "url"] = Query("none", description="url: add heatmap_url"),
) -> dict[str, Any]:
    """Score several images (multipart file parts, field `files` by convention). Each gets
    its record in order; an image that cannot be scored is an `error` record with its own
    `status`, and the others are still scored."""
    ctype = content_type(request)
    if ctype != "multipart/form-data":
        raise wrong_type(ctype, batch=True)
    lim = svc.limits
    async with svc.receiving(request):
        files = await svc.receive(_batch_upload(request, lim))
    await svc.run(svc.render_pool, _check_batch_pixels, files, lim)
    async with svc.admitted(svc.gate) as t0:
        results = await scored(svc, request, files, t0)
        return _batch_answer(svc, results, heatmap, t0)


def _batch_answer(svc: Service, results: list[Scored], heatmap: str, t0: float) -> dict[str, Any]:
    total = (time.perf_counter() - t0) * 1000.0
    items = []
    for s in results:
        if s.status != 200:
            rec = s.record
            logger.warning(
                "POST /v1/inspect/batch image %d -> %d: %s", rec.index, s.status, rec.error
            )
        url = remember(svc, s) if heatmap == "url" and s.status == 200 else None
        items.append({**answer(svc, s, total, url), "status": s.status})
    verdicts = [s.record.verdict for s in results]
    svc.inspected += sum(1 for s in results if s.status == 200)
    return {
        "count": len(items),
        "anomalous": verdicts.count(record.ANOMALOUS),
        "normal": verdicts.count(record.NORMAL),
        "errors": verdicts.count(record.ERROR),
        "results": items,
        "total_ms": round(total, 2),
    }
