"""``patchcore update``: add normal images to a model file without refitting."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base

__all__ = ["update"]


@base.command()
def update(
    model: base.ModelArg,
    inputs: Annotated[
        list[Path],
        base.paths_argument(
            "NEW_GOOD...",
            "Normal image files and folders to add (a new batch, a new variant, false alarms "
            "marked as good).",
        ),
    ],
    out: Annotated[
        Path | None,
        base.optional(
            "Write the updated model here (default: MODEL, in place).",
            "--out",
            "-o",
            dir_okay=False,
        ),  # fmt: skip
    ] = None,
    recursive: base.RecursiveOpt = False,
    device: base.DeviceOpt = "auto",
    force: base.ForceOpt = False,
    quiet: base.QuietOpt = False,
) -> None:
    """Add normal images to MODEL without refitting: the coreset continues from its bank.

    The bank gains the model's coreset ratio of the new patches (re-selected to the bank cap
    when over it); the update is recorded in the model file. A calibrated threshold is kept
    with a warning: calibrate again.

    Updates of one model file run one at a time: a second `patchcore update` waits for the
    first and adds its images to the first one's result.
    """
    with base.errors():
        s = workflow.update_model(
            model, [str(p) for p in inputs], out=out, recursive=recursive,
            device=base.model_device(device), progress=not quiet, force=force,
        )  # fmt: skip
    typer.echo(f"Added {s.images} image(s) ({s.patches:,} patches) in {s.seconds:.1f} s")
    typer.echo(
        f"  memory bank: {s.bank_size:,} rows ({s.rows_added:,} added, {s.rows_dropped:,} "
        f"dropped at the cap); update {s.updates} of this model"
    )
    if s.skipped:
        typer.echo(f"  skipped {len(s.skipped)} unreadable image(s):", err=True)
        for name in s.skipped[:10]:
            typer.echo(f"    {name}", err=True)
    if s.threshold is not None:
        typer.echo(f"  threshold {s.threshold:.6g} kept ({s.threshold_method})")
    typer.echo(f"Model written to {s.model_path}")
