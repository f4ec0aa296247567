"""The review's HTTP routes: :func:`review_router` (an ``APIRouter`` the service can mount
under ``/review``) and :func:`create_app` (a stand-alone app with the router at ``/``).

The page uses relative addresses only (``api/state``, ``static/review.js``), so it works at
any mount point. Everything it needs is served from the package (no CDN, no network).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from patchcore.apps.review import changes, pictures, thresholds, view
from patchcore.apps.review.export import export_report
from patchcore.apps.review.session import Item, ReviewSession
from patchcore.core.images import ImageReadError
from patchcore.lean.record import NonFiniteScoreError

__all__ = ["create_app", "review_router"]

JS = "text/javascript"
STATIC = {"review.js": JS, "metrics.js": JS, "viewer.js": JS, "panels.js": JS, "regions.js": JS,
          "review.css": "text/css", "index.html": "text/html"}  # fmt: skip
NO_STORE = {"Cache-Control": "no-store"}


class Choose(BaseModel):
    method: str = Field(description="max_f1 | youden | nearest_zero_one")
    max_fpr: float | None = None
    max_fnr: float | None = None


class Save(BaseModel):
    value: float
    method: str = thresholds.MANUAL
    max_fpr: float | None = None
    max_fnr: float | None = None


class Mark(BaseModel):
    ids: list[int]
    threshold: float


class Compare(BaseModel):
    model: str
    threshold: float


class Export(BaseModel):
    threshold: float
    method: str = thresholds.MANUAL


#: Assets the review page shares with the inspection page, read from the service's static/.
SHARED = {"regions.js"}


def _asset(name: str) -> bytes:
    package = "patchcore.apps.service" if name in SHARED else "patchcore.apps.review"
    return resources.files(package).joinpath("static", name).read_bytes()


def _item(session: ReviewSession, index: int) -> Item:
    if not 0 <= index < len(session.items):
        raise HTTPException(404, f"no image #{index}")
    return session.items[index]


def _png(data: bytes | None, what: str, kind: str = "image/png") -> Response:
    if data is None:
        raise HTTPException(404, f"no {what}")
    return Response(data, media_type=kind, headers={"Cache-Control": "private, max-age=300"})


def _busy(started: bool, session: ReviewSession) -> dict[str, Any]:
    if not started:
        raise HTTPException(409, f"{session.job.what} is running; wait for it")
    return {"started": True, "job": session.job.as_dict()}


def _page_routes(router: APIRouter) -> None:
    @router.get("/", include_in_schema=False)
    def page(request: Request) -> Response:
        if not request.url.path.endswith("/"):  # relative asset paths need the slash
            return RedirectResponse(request.url.path + "/")
        return HTMLResponse(_asset("index.html"), headers=NO_STORE)

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no asset {name}")
        return Response(_asset(name), media_type=STATIC[name], headers=NO_STORE)


def _picture_routes(router: APIRouter, session: ReviewSession) -> None:
    @router.get("/api/thumb/{index}")
    def thumb(index: int) -> Response:
        return _png(pictures.thumb(session, _item(session, index)), "thumbnail", "image/jpeg")

    @router.get("/api/image/{index}")
    def image(index: int) -> Response:
        try:
            data, kind = pictures.original(_item(session, index))
        except ImageReadError as exc:
            raise HTTPException(404, str(exc)) from None
        return _png(data, "image", kind)

    @router.get("/api/heat/{index}")
    def heat(index: int) -> Response:
        return _png(pictures.heat_layer(session, _item(session, index)), "heatmap")

    @router.get("/api/mask/{index}")
    def mask(index: int) -> Response:
        try:
            return _png(pictures.mask_layer(_item(session, index)), "ground-truth mask")
        except ImageReadError as exc:
            raise HTTPException(404, str(exc)) from None

    @router.get("/api/explain/{index}")
    def explain(index: int) -> dict[str, Any]:
        if session.job.running and session.job.what != "scoring":
            raise HTTPException(409, f"{session.job.what} is running; try again after it")
        found = pictures.explanation(session, _item(session, index))
        if found is None:
            raise HTTPException(404, "no explanation: the image cannot be read")
        return found

    @router.get("/api/explain/{index}/picture")
    def explain_picture(index: int) -> Response:
        path = pictures.explanation_png(session, _item(session, index))
        if path is None:
            raise HTTPException(404, "no explanation picture")
        return FileResponse(path, media_type="image/png")


@contextmanager
def _refused(*errors: type[Exception], status: int = 400) -> Iterator[None]:
    """Turn ``errors`` (the user's input refused) into an HTTP ``status`` with their message."""
    try:
        yield
    except errors as exc:
        raise HTTPException(status, str(exc)) from None


def _action_routes(router: APIRouter, session: ReviewSession) -> None:
    bad_input = (ValueError, NonFiniteScoreError)

    @router.post("/api/threshold/choose")
    def choose(body: Choose) -> dict[str, Any]:
        with _refused(ValueError):
            return view.choose_threshold(session, body.method, body.max_fpr, body.max_fnr)

    @router.post("/api/threshold/save")
    def save(body: Save) -> dict[str, Any]:
        with _refused(*bad_input), _refused(RuntimeError, status=409):
            entry = thresholds.save_threshold(
                session, body.value, body.method, max_fpr=body.max_fpr, max_fnr=body.max_fnr
            )
        return {"saved": entry, "model": view.model_info(session)}

    @router.post("/api/mark-normal")
    def mark(body: Mark) -> dict[str, Any]:
        with _refused(*bad_input):
            started = changes.start_mark_normal(session, body.ids, body.threshold)
        return _busy(started, session)

    @router.post("/api/compare")
    def compare(body: Compare) -> dict[str, Any]:
        with _refused(OSError, NonFiniteScoreError):
            started = changes.start_compare(session, body.model, body.threshold)
        return _busy(started, session)

    @router.post("/api/export")
    def export(body: Export) -> dict[str, Any]:
        with _refused(*bad_input):
            path = export_report(session, body.threshold, body.method)
        return {"path": str(path), "url": f"api/reports/{path.parent.name}/report.html"}

    @router.get("/api/reports/{stamp}/{rest:path}")
    def report_file(stamp: str, rest: str) -> Response:
        base = (session.cache.reports_dir() / stamp).resolve()
        target = (base / rest).resolve()
        if base.parent != session.cache.reports_dir().resolve() or base not in target.parents:
            raise HTTPException(404, "no such report file")
        if not target.is_file():
            raise HTTPException(404, "no such report file")
        return FileResponse(target)


def review_router(session: ReviewSession, prefix: str = "") -> APIRouter:
    """The review's routes for ``session``, under ``prefix`` (e.g. ``"/review"``: the page at
    ``/review/``); starts scoring what the cache lacks. Mount it with ``app.include_router``
    (or pass it to the service's ``create_app(..., routers=[...])``)."""
    router = APIRouter(prefix=prefix)
    _page_routes(router)

    @router.get("/api/state")
    def state() -> JSONResponse:
        return JSONResponse(view.state(session), headers=NO_STORE)

    @router.get("/api/status")
    def status() -> dict[str, Any]:
        return {"job": session.job.as_dict(), "missing": session.missing()}

    @router.get("/api/item/{index}")
    def item(index: int, threshold: float) -> dict[str, Any]:
        _item(session, index)
        with _refused(NonFiniteScoreError):
            return view.detail(session, index, threshold)

    _picture_routes(router, session)
    _action_routes(router, session)
    if session.missing():
        session.score_missing()
    return router


def create_app(
    model: str | os.PathLike | ReviewSession,
    data: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    device: str | None = None,
) -> FastAPI:
    """A stand-alone review app: the page at ``/``, its API under ``/api/``.

    Args:
        model: the model file (or a ready :class:`ReviewSession`, then ``data`` is unused).
        data: the labelled data folder.
        cache_dir, progress, device: see :class:`ReviewSession`.
    """
    if isinstance(model, ReviewSession):
        session = model
    else:
        if data is None:
            raise ValueError("create_app needs the data folder to review the model on")
        session = ReviewSession(
            Path(model), Path(data), cache_dir=cache_dir, progress=progress, device=device
        )
    app = FastAPI(title="patchcore review", docs_url=None, redoc_url=None)
    app.state.review = session
    app.include_router(review_router(session))
    return app
