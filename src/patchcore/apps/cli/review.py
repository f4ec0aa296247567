"""``patchcore review``: the interactive review page (:mod:`patchcore.apps.review`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchcore.apps.cli import base

__all__ = ["review"]


@base.command()
def review(
    model: base.ModelArg,
    data: Annotated[
        Path,
        typer.Argument(
            metavar="DATA",
            help="Labelled images: DATA/test/<label>/ or DATA/<label>/ (good = normal), masks "
            "in DATA/ground_truth/<label>/.",
            show_default=False,
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to bind (the page is for local use).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8765,
    browser: Annotated[bool, typer.Option(help="Open the page in the default browser.")] = True,
    cache: Annotated[
        Path | None, base.optional("Cache folder (default: MODEL.review beside the model).")
    ] = None,
    device: base.DeviceOpt = "auto",
) -> None:
    """Review MODEL on the labelled images of DATA in the browser: move the threshold and see
    the metrics follow, see every error, fix false alarms, compare models (docs/review.md).

    Scores once (progress here and on the page) and caches beside the model; Save threshold
    and Mark as normal rewrite MODEL."""
    from patchcore.apps import review as page  # fastapi and uvicorn load for this command only

    with base.errors():
        page.run(
            model, data, host=host, port=port, open_browser=browser, cache_dir=cache,
            device=base.model_device(device),
        )  # fmt: skip
