"""A real uvicorn server on 127.0.0.1 and raw sockets that send slowly (test helper)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(app, port: int) -> Iterator[uvicorn.Server]:  # noqa: ANN001
    """Serve ``app`` on 127.0.0.1:``port`` in a thread for the block's duration, configured as
    :func:`patchcore.apps.service.serve` runs it (the header timeout included)."""
    from patchcore.apps.service.server import server_config

    server = uvicorn.Server(server_config(app, "127.0.0.1", port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


def request_bytes(port: int, path: str, body: bytes, ctype: str = "image/png") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


def slow_client(
    port: int, body: bytes, seconds: float, out: list, i: int, source: str = "127.0.0.1"
) -> None:
    """Send the headers, then the body one byte at a time over ``seconds``; record the status
    (0: the server closed without an answer; -1: still sending when time ran out). ``source``:
    the client's own address (any 127.x.y.z is this machine: another "client")."""
    raw = request_bytes(port, "/v1/inspect", body)
    head = raw[: len(raw) - len(body)]
    address = (source, 0)
    with socket.create_connection(("127.0.0.1", port), seconds + 10, address) as s:
        s.sendall(head)
        end = time.monotonic() + seconds
        sent = 0
        s.settimeout(0.25)
        while time.monotonic() < end and sent < len(body):
            try:
                s.sendall(body[sent : sent + 1])
                sent += 1
                out[i] = status_of(s)  # answered early (e.g. 408)?
                return
            except TimeoutError:
                continue
            except OSError:
                break
        s.settimeout(10)
        try:
            out[i] = status_of(s)
        except OSError:
            out[i] = 0


def slow_headers(port: int, seconds: float, out: list, i: int, source: str = "127.0.0.1") -> None:
    """Send a request's headers one byte a second for up to ``seconds``; record the status the
    server answers with (0: closed without one, -1: never answered)."""
    raw = request_bytes(port, "/v1/inspect", b"x" * 10)
    with socket.create_connection(("127.0.0.1", port), seconds + 10, (source, 0)) as s:
        s.settimeout(1.0)
        end = time.monotonic() + seconds
        out[i] = -1
        for byte in raw:
            if time.monotonic() > end:
                return
            try:
                s.sendall(bytes([byte]))
                data = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                out[i] = 0
                return
            out[i] = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
            return
