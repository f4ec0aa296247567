"""``GET /v1/heatmaps/{key}``: an overlay kept from a recent ``heatmap=url`` inspection."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import Response

from patchcore.apps.service.dependencies import ServiceDep
from patchcore.apps.service.errors import Reject
from patchcore.apps.service.heatmaps import overlay_png

__all__ = ["router"]

router = APIRouter()


@router.get(
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
    """The overlay PNG of a recent `heatmap=url` inspection (kept in a bounded store), in the
    service's fixed colour range."""
    item = svc.store.get(key)
    if item is None:
        raise Reject(404, "no such heatmap (unknown id, or evicted from the bounded store)")
    async with svc.admitted(svc.render_gate):
        png = await svc.run(svc.render_pool, overlay_png, item, alpha)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
