"""``patchcore info``: a model file's card."""

from __future__ import annotations

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.lean.util import fmt

__all__ = ["info"]


@base.command()
def info(model: base.ModelArg) -> None:
    """Show a model file's card (backbone, layers, bank, threshold, stored split) and its
    threshold history."""
    with base.errors():
        det = workflow.load_model(model)
        card = workflow.model_card(det, None)
        history = workflow.threshold_history(det)
    w = max(len(k) for k in card)
    for k, v in card.items():
        typer.echo(f"{k:<{w}}  {fmt(v, 6)}")
    if history:
        typer.echo("")
        typer.echo("Threshold history (oldest first; the last one is in use)")
        for k, entry in enumerate(history, start=1):
            typer.echo(f"  {k}. {workflow.entry_text(entry)}")
            for warning in entry.get("warnings") or []:
                typer.echo(f"       warning: {warning}")
