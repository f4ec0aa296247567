"""The app: :func:`create_app` (any ASGI server) and :func:`serve` (uvicorn, hardened).

One service over two backends: ``create_app(backend)`` with a
:class:`~patchcore.apps.service.backends.Backend` (or a ``PatchCore``, a ``.pt`` model file,
an :class:`~patchcore.lean.runtime.ExportedModel` or an export folder, opened by
:func:`~patchcore.apps.service.backends.open_backend`). The routes, limits, timeouts, token,
readiness and errors are the same whatever the backend.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from patchcore.apps.service.backends import Backend, open_backend
from patchcore.apps.service.dependencies import Service, ServiceLimits, require_token
from patchcore.apps.service.errors import install_handlers, logger
from patchcore.apps.service.routers import docs, explain, heatmaps, inspect, page, status
from patchcore.apps.service.server import resolve_token, server_config, warn_if_open

__all__ = ["API_VERSION", "create_app", "serve"]

#: The version of the HTTP API (the schema's ``info.version``; the library's own version is
#: only in ``/v1/model``, behind the token).
API_VERSION = "1"


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc: Service = app.state.service
    svc.start()
    try:
        yield
    finally:
        svc.stop()


def _check_display_range(display_range: Sequence[float] | None) -> tuple[float, float] | None:
    if display_range is None:
        return None
    lo, hi = (float(v) for v in display_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"display_range must be two finite numbers lo < hi, got {display_range!r}")
    return (lo, hi)


def create_app(
    model: Any,
    *,
    token: str | None = None,
    threshold: float | None = None,
    display_range: Sequence[float] | None = None,
    routers: Sequence[APIRouter] = (),
    **limits: Any,
) -> FastAPI:
    """Build the inspection service around one backend.

    Args:
        model: a :class:`Backend`, or what :func:`open_backend` opens: a fitted ``PatchCore``
            or ``.pt`` file (torch), an ``ExportedModel`` or export folder (torch-free). A
            path is loaded in the background at start-up (``/readyz`` says when).
        token: when set, ``/v1/*`` needs ``Authorization: Bearer <token>``. This function
            reads no file or environment; :func:`serve` does.
        threshold: overrides the model's threshold (not with a ready-made backend).
        display_range: map values drawn as the coldest / hottest overlay colour; default
            :func:`patchcore.lean.record.display_range` of the model's stored range.
        routers: more route groups, mounted behind the token (e.g. a review page); they reach
            the shared state through ``dependencies.ServiceDep``.
        **limits: any field of :class:`ServiceLimits`; None keeps the default.

    Returns:
        The FastAPI app (serve it with :func:`serve`, or any ASGI server without the header
        timeout; its lifespan starts and stops the workers).
    """
    lim = ServiceLimits.from_kwargs(limits)
    backend = open_backend(model, threshold=threshold)
    svc = Service(backend, lim, token, _check_display_range(display_range))
    app = FastAPI(
        title="patchcore inspection service",
        version=API_VERSION,
        description="PatchCore anomaly detection for images from the line. Each answer is "
        "the inspection record: `verdict` `anomalous` when score >= threshold, `normal` "
        "below it, `error` when no verdict can be given; scores: higher = more anomalous. "
        "The page is at `/`. With a token, `/v1/*` needs `Authorization: Bearer <token>` "
        "(the Authorize button).",
        lifespan=_lifespan,
        docs_url=None,  # served by routers.docs from the package's files, not a CDN
        redoc_url=None,
    )
    app.state.service = svc
    install_handlers(app)
    behind_token = [Depends(require_token)]
    for group in (inspect.router, explain.router, heatmaps.router, status.api, *routers):
        app.include_router(group, dependencies=behind_token)
    for group in (status.public, docs.router, page.router):
        app.include_router(group)
    page.mount_static(app)
    return app


def serve(
    model: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    token_file: str | os.PathLike | None = None,
    threshold: float | None = None,
    display_range: Sequence[float] | None = None,
    log_level: str = "info",
    review: str | os.PathLike | None = None,
    **limits: Any,
) -> None:
    """Load the model (errors surface here, before the port opens) and run the service.

    Args:
        model: as :func:`create_app`: a backend, a ``.pt`` model file, an export folder.
        host: bind address; the default keeps the service on this machine (a WARNING is
            logged when it is bound beyond loopback without a token).
        port: TCP port.
        token: bearer token for ``/v1/*``; None falls back to ``$PATCHCORE_TOKEN``.
        token_file: read the token from this file instead (kept out of ``ps``).
        threshold: overrides the model's threshold.
        display_range: see :func:`create_app`.
        log_level: the log level.
        review: a labelled data folder: also serve ``patchcore review MODEL DATA`` at
            ``/review/`` (a ``.pt`` model; local use, so not with a token).
        **limits: see :class:`ServiceLimits` (``header_timeout_s`` is applied here).
    """
    import uvicorn

    token = resolve_token(token, token_file)
    lim = ServiceLimits.from_kwargs(limits)  # fail on a bad limit before loading anything
    if review is not None and token:  # the review page writes the model file: local use
        raise ValueError("the review page (review=DATA) is for local use: serve it without a token")
    backend: Backend = open_backend(model, threshold=threshold)
    backend.load()
    routers: list[APIRouter] = []
    if review is not None:
        from patchcore.apps.review import service_router  # torch: only when asked for

        routers.append(service_router(model, review))
    app = create_app(
        backend, token=token, display_range=display_range, routers=routers, **asdict(lim)
    )
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO))
    logger.info(
        "serving %s (%s) on http://%s:%d/ (token %s)",
        backend.path or "a model in memory",
        backend.kind,
        host,
        port,
        "required" if token else "off",
    )
    warn_if_open(host, token)
    uvicorn.Server(server_config(app, host, port, log_level)).run()
