"""Running the app: uvicorn with a header timeout, the token from a file or the environment,
and a warning when the service is bound beyond this machine without a token.

uvicorn bounds the time between requests on a kept-alive connection, but not the time a client
takes to send a request's headers: a client sending one header byte a second held a connection
for ever. :func:`guarded_h11` closes a connection whose headers have not all arrived within
``header_timeout_s`` (of the connection or of the previous answer), after a 408. Body time is
bounded by the app itself (``body_timeout_s``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from patchcore.apps.service.errors import logger

__all__ = [
    "TOKEN_ENV",
    "guarded_h11",
    "read_token_file",
    "resolve_token",
    "server_config",
    "warn_if_open",
]

TOKEN_ENV = "PATCHCORE_TOKEN"


class _GuardedH11(H11Protocol):
    """h11 protocol that answers 408 and closes when a request's headers are too slow."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if not waiting or self.transport.is_closing():
            return  # the headers came: the request is the app's now
        logger.warning(
            "%s: request headers not received within %g s (header_timeout_s); closed",
            f"{self.client[0]}:{self.client[1]}" if self.client else "client",
            self.header_timeout_s,
        )
        body = b"request headers not received in time (header_timeout_s)\n"
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """The h11 protocol class with ``header_timeout_s`` (for ``uvicorn.Config(http=...)``)."""
    return type("GuardedH11", (_GuardedH11,), {"header_timeout_s": float(header_timeout_s)})


def server_config(app: Any, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration the service runs under: the app's ``header_timeout_s``, one
    process, h11, no websockets."""
    limits = app.state.service.limits
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=guarded_h11(limits.header_timeout_s),
        ws="none",
    )


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


def resolve_token(token: str | None, token_file: str | os.PathLike | None) -> str | None:
    """The token to require: ``token_file``'s content, else ``token``, else
    ``$PATCHCORE_TOKEN``; None (open) when none is set or the value is empty.

    Raises:
        ValueError: both ``token`` and ``token_file`` given, or an empty file.
    """
    if token_file is not None:
        if token:
            raise ValueError("give a token or a token file, not both")
        return read_token_file(token_file)
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    return token or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, token: str | None) -> bool:
    """Log a WARNING (and return True) when binding beyond loopback without a token."""
    if token or is_loopback(host):
        return False
    logger.warning(
        "serving on %s without a token: anyone who can reach this address can use the API; "
        "set one with --token-file or $%s",
        host,
        TOKEN_ENV,
    )
    return True
