"""``patchcore review MODEL DATA``: an interactive review of a model on labelled images.

A local web page (plain JavaScript, no build step, no network) to move the threshold and see
the metrics, the confusion matrix, recall per defect type, the ROC curve and the four galleries
follow it; to open any image with its heatmap, regions, ground-truth outline and nearest
normal training patch; to save the threshold into the model, add false positives to the
memory bank ("Mark as normal"), compare a second model, and export the view as the HTML report.
Scores, maps, thumbnails and explanations are cached beside the model (``MODEL.review/``).

Entry points: :func:`run` (serve it and open a browser), :func:`create_app` (a FastAPI app),
:func:`review_router` (routes to mount under ``/review`` in another app), and
``python -m patchcore.apps.review MODEL DATA``. See ``docs/review.md``.
"""

from __future__ import annotations

import os
import threading
import webbrowser

from fastapi import APIRouter

from patchcore.apps.review.routes import create_app, review_router
from patchcore.apps.review.session import ReviewSession

__all__ = ["MOUNT", "ReviewSession", "create_app", "review_router", "run", "service_router"]

#: Where ``patchcore serve --review DATA`` mounts the review page.
MOUNT = "/review"


def service_router(model: str | os.PathLike, data: str | os.PathLike) -> APIRouter:
    """The review of ``model`` on ``data`` as routes under :data:`MOUNT`, for the inspection
    service (``create_app(..., routers=[service_router(model, data)])``); scoring starts in
    the background, progress on the page."""
    return review_router(ReviewSession(model, data), prefix=MOUNT)


def run(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = True,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
) -> None:
    """Score what the cache lacks (progress in the terminal and on the page), serve the page
    at ``http://host:port/`` and open it in the default browser; returns on Ctrl+C."""
    import uvicorn

    app = create_app(model, data, cache_dir=cache_dir, progress=True, device=device)
    url = f"http://{host}:{port}/"
    print(f"patchcore review: {url}  (Ctrl+C to stop)", flush=True)
    if open_browser:
        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
