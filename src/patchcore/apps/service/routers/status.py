"""``GET /v1/model`` (the model card, behind the token), ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from patchcore.apps.service.dependencies import ServiceDep
from patchcore.lean.util import package_version

__all__ = ["api", "public"]

#: Behind the token.
api = APIRouter()
#: Always open: they say nothing about the model.
public = APIRouter()


@api.get("/v1/model", summary="The model card")
async def model_card(svc: ServiceDep) -> dict[str, Any]:
    """Backbone, image size, bank size, threshold and method, display range, versions, the
    backend and the service limits."""
    svc.check_ready()
    backend = svc.backend
    card = dict(backend.card())
    card.update(
        backend=backend.kind,
        threshold=svc.threshold,
        display_range=svc.display_range(),
        model_file=backend.path.name if backend.path is not None else None,
        patchcore_version=package_version(),
        limits=asdict(svc.limits),
        token_required=svc.token is not None,
    )
    return card


@public.get("/healthz", summary="Liveness")
async def healthz(svc: ServiceDep) -> dict[str, Any]:
    """200 while the process answers, whatever the model is doing."""
    return {"status": "ok", "uptime_s": round(time.time() - svc.started, 1)}


@public.get("/readyz", summary="Readiness", responses={503: {"description": "not ready"}})
async def readyz(svc: ServiceDep) -> JSONResponse:
    """200 once the model is loaded, checked finite and warmed up; 503 before (or for good
    when loading failed), with the reason."""
    body: dict[str, Any] = {
        "ready": svc.ready,
        "in_flight": svc.gate.in_flight,
        "capacity": svc.gate.capacity,
        "inspected": svc.inspected,
    }
    if svc.ready:
        return JSONResponse(body)
    body["reason"] = svc.load_error or "loading"
    return JSONResponse(body, 503, headers={"Retry-After": str(svc.limits.retry_after_s)})
