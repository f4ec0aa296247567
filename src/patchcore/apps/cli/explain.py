"""``patchcore explain``: each image's record with its worst patch and the nearest normal
training patch (the record's fields, then :data:`patchcore.apps.workflow.EXPLAIN_FIELDS`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.apps.cli.predict import Tally
from patchcore.lean.record import ERROR
from patchcore.lean.writers import RecordWriter

__all__ = ["explain"]


@base.command()
def explain(
    model: base.ModelArg,
    inputs: base.InputsArg,
    fmt: base.FormatOpt = base.Format.table,  # type: ignore[attr-defined]
    crops: Annotated[
        Path | None,
        base.folder_option(
            "--crops",
            "Folder for one PNG per image: its worst patch (red) beside the nearest normal "
            "training patch (green).",
        ),
    ] = None,
    recursive: base.RecursiveOpt = False,
    fail_fast: base.FailFastOpt = False,
    force: base.ForceOpt = False,
    device: base.DeviceOpt = "auto",
) -> None:
    """For each image: its record (verdict, score), its worst patch, the nearest normal
    training patch (which training image, where, in its pixels) and how far it is.

    A file that cannot be read is a row with the verdict "error" and the run goes on
    (--fail-fast stops there); the exit code is 1 only when no file at all could be read.
    """
    with base.errors():
        det = workflow.load_model(model, device=base.model_device(device))
        files = workflow.expand_inputs(
            [str(p) for p in inputs], recursive=recursive, missing_ok=True
        )
        table = fmt is base.Format.table  # type: ignore[attr-defined]
        extra = ("nearest", "crop") if table else workflow.EXPLAIN_FIELDS
        writer = RecordWriter(fmt.value, typer.echo, extra=extra)
        writer.header()
        tally = Tally()
        for item in workflow.explain_images(det, files, crops=crops, force=force):
            values = {"nearest": item.nearest(), "crop": item.crop} if table else item.extra()
            writer.write(item.record, **values)
            tally.add(item.record)
            if fail_fast and item.record.verdict == ERROR:
                raise workflow.WorkflowError(
                    f"{item.record.image}: {item.record.error} (--fail-fast: stopped at the "
                    "first error)"
                )
    if tally.counts[ERROR] == tally.total:
        raise typer.Exit(1)
