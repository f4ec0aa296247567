"""How the service refuses: typed errors and the app's handlers (one log line per refusal).

- :class:`InputError` is raised in the worker threads (decoding an upload): an HTTP status and
  a one-line reason, turned into an error record for the image.
- :class:`Reject` is an ``HTTPException`` the handlers log once at WARNING; it may carry the
  image's error record (``record``), whose fields then open the JSON body before ``detail``.
- :class:`GoneError`: the client disconnected; one INFO line, no traceback, nothing answered.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

__all__ = ["GoneError", "InputError", "Reject", "install_handlers", "logger"]

#: The service's logger: one line per refusal, disconnect or start-up event.
logger = logging.getLogger("patchcore.apps.service")


class InputError(Exception):
    """A request or image the service refuses; ``status`` is the HTTP code, the message one
    line, ``record`` the image's error record when there is one."""

    def __init__(self, status: int, detail: str, record: Any = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.record = record


class GoneError(Exception):
    """The client disconnected: nothing to answer; logged as one line."""


class Reject(HTTPException):
    """An ``HTTPException`` logged once (at WARNING) by the app's handler.

    Args:
        status: the HTTP status.
        detail: one line saying why.
        retry_after: seconds for a ``Retry-After`` header (503).
        record: the image's error record as a dict (``record.as_dict``): its fields open the
            JSON body, so a client reads ``"verdict": "error"`` and the ``error`` text, never a
            missing verdict it could take for a pass.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        retry_after: int | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.record = record


#: A refused request whose body may be bigger than this is answered with ``Connection:
#: close``, so the server does not go on reading (and discarding) the rest of it.
DRAIN_BYTES = 64 * 1024


def _closes(request: Request, status: int) -> bool:
    """Whether to close the connection after refusing ``request``: its body was too big or too
    slow (413, 408), or may be big and was not read (declared over :data:`DRAIN_BYTES`, or
    chunked)."""
    if status in (408, 413):
        return True
    if status < 400 or request.method not in ("POST", "PUT", "PATCH"):
        return False
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        return True
    declared = request.headers.get("content-length", "0")
    return not declared.isdigit() or int(declared) > DRAIN_BYTES


async def _log_rejection(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code >= 400:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, detail)
    body = {**(getattr(exc, "record", None) or {}), "detail": detail}
    headers = dict(exc.headers or {})
    if _closes(request, exc.status_code):
        headers["Connection"] = "close"
    return JSONResponse(body, exc.status_code, headers=headers)


async def _log_gone(request: Request, exc: Exception) -> Response:
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


def install_handlers(app: FastAPI) -> None:
    """Register the handlers: every refusal a one-line ``detail`` and one log line."""
    app.add_exception_handler(HTTPException, _log_rejection)
    app.add_exception_handler(RequestValidationError, _log_invalid)
    app.add_exception_handler(GoneError, _log_gone)
