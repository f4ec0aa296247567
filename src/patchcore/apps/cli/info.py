"""``patchcore info``: a model file's card."""

from __future__ import annotations

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.lean.util import fmt

__all__ = ["info"]


@base.command()
def info(model: base.ModelArg) -> None:
    """Show a model file's card: backbone, layers, bank, threshold, stored split."""
    with base.errors():
        det = workflow.load_model(model)
        card = workflow.model_card(det, None)
    w = max(len(k) for k in card)
    for k, v in card.items():
        typer.echo(f"{k:<{w}}  {fmt(v, 6)}")
