"""Receiving request bodies: size refused before reading, multipart parsed in memory as it streams.

One rule for every upload route: a multipart body's *file parts* (parts whose
``Content-Disposition`` has a ``filename``; field name ``file`` / ``files`` by convention, any
name accepted) are the images, text fields are ignored; a raw body (``Content-Type: image/*``,
``application/octet-stream`` or none) is one image. Nothing is spooled to disk: the body is
capped at ``max_request_bytes`` (refused from ``Content-Length`` before a byte is read, and
while streaming), so the parts are kept in memory.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from patchcore.apps.service.errors import GoneError, Reject

__all__ = [
    "MAX_TEXT_FIELDS",
    "RAW_CONTENT_TYPES",
    "check_declared_length",
    "content_type",
    "read_body",
    "read_uploads",
    "wrong_type",
]

RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
#: Text fields tolerated (and ignored) in a multipart body.
MAX_TEXT_FIELDS = 16


def content_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def wrong_type(ctype: str, batch: bool) -> Reject:
    """The 415 for a body of another type, saying what to send instead."""
    if batch:
        return Reject(
            415,
            f"unsupported Content-Type {ctype!r}; send multipart/form-data with one or more "
            "file parts (curl -F files=@a.png -F files=@b.png)",
        )
    return Reject(
        415,
        f"unsupported Content-Type {ctype!r}; send multipart/form-data with a 'file' part "
        "(curl -F file=@x.png) or the raw image with Content-Type image/* or "
        "application/octet-stream",
    )


def check_declared_length(request: Request, limit: int) -> None:
    """413 from ``Content-Length`` alone, before a byte of the body is read."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        n = int(declared)
    except ValueError:
        raise Reject(400, f"bad Content-Length header {declared!r}") from None
    if n > limit:
        raise Reject(
            413, f"request of {n:,} bytes is over the limit of {limit:,} (max_request_bytes)"
        )


async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive: 413 from ``Content-Length`` before the first is
    read, or as soon as they pass ``limit``; a disconnect is a :class:`GoneError`."""
    check_declared_length(request, limit)
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise Reject(
                    413, f"request is over the limit of {limit:,} bytes (max_request_bytes)"
                )
            yield chunk
    except ClientDisconnect:
        raise GoneError(f"client went away after {total:,} bytes of the body") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused (413) from ``Content-Length`` or as soon as it passes ``limit``."""
    return b"".join([chunk async for chunk in _capped(request, limit)])


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: bytes = b""
    value: bytes = b""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Collector:
    """python-multipart callbacks that keep the file parts in memory, in order."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[tuple[str, bytes]] = []
        self.fields = 0
        self.part = _Part()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.begin,
            "on_part_data": self.data,
            "on_part_end": self.end,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
        }

    def begin(self) -> None:
        self.part = _Part()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.value += data[start:end]

    def header_end(self) -> None:
        self.part.headers[self.part.name.lower()] = self.part.value
        self.part.name, self.part.value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise Reject(400, "malformed multipart body: a part has no Content-Disposition name")
        if b"filename" not in options:
            self.fields += 1
            if self.fields > MAX_TEXT_FIELDS:
                raise Reject(400, f"more than {MAX_TEXT_FIELDS} text fields in the body")
            return
        if len(self.files) >= self.max_files:
            raise Reject(
                413 if self.max_files > 1 else 400,
                f"more than {self.max_files} image(s) in one request"
                + (" (max_batch_images)" if self.max_files > 1 else "; use /v1/inspect/batch"),
            )
        raw = options[b"filename"] or options[b"name"]
        self.part.filename = os.path.basename(raw.decode("utf-8", "replace"))[:200] or "upload"

    def data(self, data: bytes, start: int, end: int) -> None:
        if self.part.filename is not None:
            self.part.data += data[start:end]

    def end(self) -> None:
        if self.part.filename is not None:
            self.files.append((self.part.filename, bytes(self.part.data)))
        self.part = _Part()


async def read_uploads(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """The (file name, bytes) of each file part of a multipart body, in order, parsed as the
    body streams in (nothing spooled to disk), the body capped at ``limit`` bytes.

    Raises:
        Reject: 400 (malformed, no boundary, too many fields), 413 (too large or more than
            ``max_files`` file parts; 400 when ``max_files`` is 1).
        GoneError: the client disconnected.
    """
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise Reject(400, "malformed multipart body: no boundary in its Content-Type")
    collector = _Collector(max_files)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in _capped(request, limit):
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise Reject(400, f"malformed multipart body ({type(exc).__name__})") from None
    return collector.files
