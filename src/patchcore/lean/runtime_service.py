"""The HTTP service on the torch-free runtime (``patchcore-run serve EXPORT_DIR``).

A lean counterpart of :mod:`patchcore.apps.service` (which imports torch): ``POST /v1/inspect`` with
the same answer fields (score, threshold, verdict, map maximum and where it is) plus the
normalised score, ``GET /v1/model`` (the export's manifest) and ``GET /healthz``. Uploads are
decoded by :func:`patchcore.lean.decode.decode_bytes` (format allow-list and pixel budget from the
header), as in the full service. Needs fastapi and uvicorn (the ``runtime-serve`` extra).
"""

from __future__ import annotations

import hmac
import math
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request

from patchcore.lean.decode import decode_bytes
from patchcore.lean.pixels import ImageReadError, ImageTooLargeError
from patchcore.lean.runtime import ExportedModel

__all__ = ["create_app", "serve"]

MAX_REQUEST_BYTES = 64 * 2**20
MAX_PIXELS = 50_000_000


def create_app(
    export_dir: str | os.PathLike,
    *,
    backend: str | None = None,
    threads: int | None = None,
    token: str | None = None,
) -> FastAPI:
    """The app serving one export folder; ``token``: bearer token required on ``/v1/*``."""
    model = ExportedModel(export_dir, backend=backend, threads=threads, batch_size=1)
    if model.threshold is None:
        raise ValueError(
            f"{export_dir}: the export has no threshold; calibrate the model and export it again"
        )
    app = FastAPI(title="patchcore runtime", version=str(model.info.get("package_version")))

    def check_token(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "token required", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    def info(request: Request) -> dict[str, Any]:
        check_token(request)
        return {k: v for k, v in model.info.items() if not k.startswith("_")}

    @app.post("/v1/inspect")
    async def inspect(request: Request) -> dict[str, Any]:
        check_token(request)
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        name = None
        if ctype == "multipart/form-data":
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "multipart body has no file part; send it as 'file'")
            name, data = upload.filename, await upload.read()
        else:
            data = await request.body()
        if len(data) > MAX_REQUEST_BYTES:
            raise HTTPException(413, f"upload over {MAX_REQUEST_BYTES} bytes")
        try:
            pixels = decode_bytes(data, name=name or "body", max_pixels=MAX_PIXELS)
            t1 = time.perf_counter()
            r = model.score([pixels], maps="native")
        except ImageTooLargeError as exc:
            raise HTTPException(413, str(exc)) from None
        except ImageReadError as exc:
            raise HTTPException(400, str(exc)) from None
        except FloatingPointError as exc:
            raise HTTPException(500, str(exc)) from None
        t2 = time.perf_counter()
        score, amap = float(r.scores[0]), r.maps[0]  # type: ignore[index]
        assert amap is not None and math.isfinite(score)
        y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
        threshold = float(model.threshold)  # type: ignore[arg-type]
        anomalous = score >= threshold
        return {
            "filename": name,
            "width": int(pixels.shape[1]),
            "height": int(pixels.shape[0]),
            "score": score,
            "normalized_score": None if r.normalized is None else float(r.normalized[0]),
            "threshold": threshold,
            "verdict": "fail" if anomalous else "pass",
            "anomalous": bool(anomalous),
            "map_max": float(amap.max()),
            "map_max_location": {"x": int(x), "y": int(y)},
            "backend": model.backend,
            "timing": {
                "decode_ms": (t1 - t0) * 1000.0,
                "inference_ms": (t2 - t1) * 1000.0,
                "total_ms": (time.perf_counter() - t0) * 1000.0,
            },
        }

    return app


def serve(
    export_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str | None = None,
    threads: int | None = None,
    token: str | None = None,
) -> None:
    """Run :func:`create_app` under uvicorn (blocks)."""
    import uvicorn

    uvicorn.run(create_app(export_dir, backend=backend, threads=threads, token=token),
                host=host, port=port)  # fmt: skip
