"""``GET /docs``: the interactive API page (Swagger UI), served from the ``swagger-ui-bundle``
package's files, never from a CDN, so it works offline; ``/openapi.json`` is the schema.

The page and the schema are open (health checks and the page are too); they describe the
routes only, never the model, which ``/v1/model`` gives behind the token. Without the package
installed, ``/docs`` is a plain self-contained table of the routes. ``/redoc`` is not served.
"""

from __future__ import annotations

import html
import importlib.util
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from patchcore.apps.service.errors import Reject

__all__ = ["ASSETS", "router", "swagger_ui_dir"]

router = APIRouter(include_in_schema=False)

#: The only files of the bundle served (its index.html points at an online demo schema).
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's files from the ``swagger-ui-bundle`` package, or None."""
    if importlib.util.find_spec("swagger_ui_bundle") is None:
        return None
    import swagger_ui_bundle  # optional: the lean distribution may not have it

    return Path(swagger_ui_bundle.swagger_ui_path)


@router.get("/docs")
async def docs_page(request: Request) -> Response:
    """Swagger UI over ``/openapi.json`` ("Authorize" takes the bearer token)."""
    if swagger_ui_dir() is None:
        return _table_page(request.app.openapi())
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="patchcore inspection service: API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True},
    )


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> FileResponse:
    folder = swagger_ui_dir()
    if folder is None or name not in ASSETS:
        raise Reject(404, f"no such file {name!r}")
    return FileResponse(
        folder / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"}
    )


def _table_page(spec: dict) -> HTMLResponse:
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            codes = ", ".join(
                f"{c} {html.escape(str(r.get('description', '')))}"
                for c, r in op.get("responses", {}).items()
            )
            rows.append(
                f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                f"<td><b>{html.escape(op.get('summary', ''))}</b><br>"
                f"{html.escape(op.get('description', ''))}<br><small>{codes}</small></td></tr>"
            )
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>patchcore API</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}"
        "td{vertical-align:top;padding:.4rem .8rem;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>{html.escape(spec['info']['title'])}</h1>"
        "<p>The schema: <a href='/openapi.json'>/openapi.json</a> (install swagger-ui-bundle-v2 "
        "for the interactive page).</p>"
        f"<table>{''.join(rows)}</table></body></html>"
    )
