"""Running the service (issue #25): the token from a file or the environment for both CLIs, a
warning when bound beyond loopback without a token, and the header timeout (also on a
kept-alive connection)."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import uvicorn
from _service_models import png, toy_detector, toy_images

from patchcore.apps.service import RuntimeBackend, create_app, serve
from patchcore.apps.service.server import resolve_token, server_config, warn_if_open


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PATCHCORE_TOKEN", raising=False)
    assert resolve_token(None, None) is None
    monkeypatch.setenv("PATCHCORE_TOKEN", "from-env")
    assert resolve_token(None, None) == "from-env"
    assert resolve_token("literal", None) == "literal"
    f = tmp_path / "token.txt"
    f.write_text("  from-file\n")
    assert resolve_token(None, f) == "from-file"  # the file wins over the environment
    with pytest.raises(ValueError, match="not both"):
        resolve_token("literal", f)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="token file is empty"):
        resolve_token(None, tmp_path / "empty")
    monkeypatch.setenv("PATCHCORE_TOKEN", "")
    assert resolve_token(None, None) is None


@pytest.fixture
def captured(monkeypatch):
    """serve() up to the point where uvicorn would listen: the config it was given."""
    configs: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: configs.append(self.config))
    return configs


def test_serve_reads_the_token_file_and_applies_the_header_timeout(tmp_path, captured, monkeypatch):
    monkeypatch.delenv("PATCHCORE_TOKEN", raising=False)
    f = tmp_path / "token.txt"
    f.write_text("s3cret\n")
    serve(toy_detector(), "127.0.0.1", 8131, token_file=f, header_timeout_s=3)
    (config,) = captured
    assert config.app.state.service.token == "s3cret"
    assert config.http.header_timeout_s == 3.0 and config.port == 8131
    monkeypatch.setenv("PATCHCORE_TOKEN", "env-token")
    serve(toy_detector(), "127.0.0.1", 8131)
    assert captured[1].app.state.service.token == "env-token"


def test_binding_beyond_loopback_without_a_token_warns(captured, monkeypatch, caplog):
    monkeypatch.delenv("PATCHCORE_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING, logger="patchcore.apps.service"):
        serve(toy_detector(), "0.0.0.0", 8132)
    warned = [r.getMessage() for r in caplog.records if "without a token" in r.getMessage()]
    assert len(warned) == 1 and "0.0.0.0" in warned[0] and "--token-file" in warned[0]
    assert not warn_if_open("127.0.0.1", None) and not warn_if_open("::1", None)
    assert not warn_if_open("localhost", None) and not warn_if_open("0.0.0.0", "s3cret")
    assert warn_if_open("192.168.1.20", None) and warn_if_open("::", "")


def test_patchcore_run_serve_hands_the_token_file_to_the_one_service(tmp_path, monkeypatch):
    import patchcore.apps.service as service
    from patchcore.lean.runtime_cli import main

    calls = []
    monkeypatch.setattr(service, "serve", lambda *a, **kw: calls.append((a, kw)))
    export = tmp_path / "export"
    export.mkdir()
    f = tmp_path / "token.txt"
    f.write_text("s3cret")
    code = main(["serve", str(export), "--port", "8133", "--token-file", str(f)])
    assert code == 0
    ((args, kwargs),) = calls
    assert isinstance(args[0], RuntimeBackend) and args[0].path == export
    assert args[1:] == ("127.0.0.1", 8133) and kwargs["token_file"] == str(f)
    assert kwargs["token"] is None  # never needed on the command line


def _status(sock: socket.socket) -> int:
    """Read one whole answer (headers and a Content-Length body); its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def test_slow_headers_time_out_also_on_a_kept_alive_connection():
    from _slow_clients import free_port, running

    _, good, _ = toy_images()
    body = png(good[0])
    port = free_port()
    app = create_app(toy_detector(), header_timeout_s=1)
    assert server_config(app, "127.0.0.1", port).http.header_timeout_s == 1.0
    with running(app, port):
        end = time.monotonic() + 60
        while not app.state.service.ready:
            assert time.monotonic() < end
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                f"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert _status(s) == 200
            t0 = time.perf_counter()
            s.sendall(b"GET /hea")  # the next request's headers never end
            assert _status(s) == 408
            assert 0.5 < time.perf_counter() - t0 < 3.0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # in time: answered
            assert _status(s) == 200
