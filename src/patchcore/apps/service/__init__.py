"""The inspection service: one FastAPI app over two backends, the torch detector
(``patchcore serve MODEL.pt``) and the torch-free runtime (``patchcore-run serve EXPORT_DIR``).

Start it with :func:`serve` and open http://127.0.0.1:8000/ (the page), or build the app with
:func:`create_app` for any ASGI server. Every answer about an image is the inspection record
of :mod:`patchcore.lean.record` (the same field names and verdict words as the CLI, the runtime
and the Parquet rows), then the service's extras. See docs/service.md.

The package (FastAPI "bigger applications"): ``main`` (create_app, serve), ``routers/`` (one
route group a module), ``schemas`` (derived from the record), ``dependencies`` (limits, token,
the shared :class:`~patchcore.apps.service.dependencies.Service`), ``backends`` (the protocol
and the runtime backend; ``torch_backend`` is imported only when built, so this package loads
without torch), ``uploads`` / ``decoding`` (bodies and pixels under the limits), ``scoring``,
``heatmaps``, ``server`` (uvicorn with a header timeout, the token file, the open-bind
warning).
"""

from __future__ import annotations

from typing import Any

from patchcore.apps.service.backends import Backend, RuntimeBackend, open_backend
from patchcore.apps.service.decoding import decode_image
from patchcore.apps.service.dependencies import ServiceLimits
from patchcore.apps.service.errors import InputError
from patchcore.apps.service.main import create_app, serve
from patchcore.apps.service.routers.page import STATIC_DIR
from patchcore.apps.service.server import TOKEN_ENV, read_token_file

__all__ = [
    "STATIC_DIR",
    "TOKEN_ENV",
    "Backend",
    "InputError",
    "RuntimeBackend",
    "ServiceLimits",
    "TorchBackend",
    "create_app",
    "decode_image",
    "open_backend",
    "read_token_file",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name == "TorchBackend":  # imports torch: only when asked for
        from patchcore.apps.service.torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
