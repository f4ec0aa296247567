"""``POST /v1/explain``: why one image scored what it did (the torch backend)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from patchcore.apps.service.dependencies import ServiceDep
from patchcore.apps.service.errors import InputError, Reject
from patchcore.apps.service.routers.inspect import (
    ONE_IMAGE_BODY,
    UPLOAD_ERRORS,
    check_one_image_type,
    one_upload,
)
from patchcore.apps.service.schemas import ExplanationAnswer
from patchcore.apps.service.scoring import explain_upload
from patchcore.lean import record

__all__ = ["router"]

router = APIRouter()


@router.post(
    "/v1/explain",
    response_model=ExplanationAnswer,
    responses={**UPLOAD_ERRORS, 501: {"description": "the backend cannot explain (an export)"}},
    summary="Explain one image's score",
    openapi_extra=ONE_IMAGE_BODY,
)
async def explain(request: Request, svc: ServiceDep) -> Any:
    """The image's record (no map), then its worst patch and the nearest normal training
    patch: which training image, where in its pixels, how far. The same body as
    `/v1/inspect`."""
    check_one_image_type(request)
    async with svc.receiving(request):
        name, data = await svc.receive(one_upload(request, svc.limits.max_request_bytes))
    async with svc.admitted(svc.gate) as t0, svc.free_workers:
        try:
            return await svc.run(svc.pool, explain_upload, svc, name, data, t0)
        except InputError as exc:
            rec = None if exc.record is None else record.as_dict(exc.record)
            raise Reject(exc.status, exc.detail, record=rec) from None
