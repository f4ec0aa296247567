"""``patchcore serve``: the HTTP service (:mod:`patchcore.apps.service`) over a model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchcore.apps.cli import base

__all__ = ["serve"]


@base.command()
def serve(
    model: base.ModelArg,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    token: Annotated[
        str | None,
        base.optional(
            "Bearer token required on /v1/* (default: $PATCHCORE_TOKEN; unset = open). Visible "
            "to other users in ps: prefer $PATCHCORE_TOKEN or --token-file."
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        base.optional(
            "Read the bearer token from this file (kept out of ps and shell history).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Threads that decode and score (requests scored at once).", min=1)
    ] = 1,
    queue_length: Annotated[
        int, typer.Option(help="Requests allowed to wait for a worker before 503.", min=0)
    ] = 8,
    threshold: Annotated[
        float | None,
        typer.Option(help="Override the model's calibrated threshold.", show_default=False),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    review: Annotated[
        Path | None,
        base.optional("Also serve `patchcore review MODEL DATA` at /review/ (no token)."),
    ] = None,
) -> None:
    """Serve MODEL over HTTP: an inspection page at / and a JSON API under /v1/."""
    from patchcore.apps import service  # fastapi and uvicorn load for this command only

    with base.errors():  # the service resolves the token (one rule for both entry points)
        service.serve(
            model, host, port, token=token, token_file=token_file, threshold=threshold,
            log_level=log_level, workers=workers, queue_length=queue_length, review=review,
        )  # fmt: skip
