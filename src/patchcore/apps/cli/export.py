"""``patchcore export``: the scoring graph for the torch-free runtime (``patchcore-run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base

__all__ = ["export_model"]

ExportFormat = base.choices("ExportFormat", ("onnx", "openvino"))
ExportSearch = base.choices("ExportSearch", ("auto", "int8", "bfloat16", "float32"))


@base.command("export")
def export_model(
    model: base.ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the export into.")],
    format: Annotated[
        ExportFormat, typer.Option("--format", help="onnx, or openvino (also keeps the .onnx).")
    ] = ExportFormat.onnx,  # type: ignore[attr-defined]
    dynamic: Annotated[
        bool | None,
        base.optional(
            "Graph for any image size, or the model's fixed image_size only (default: fixed "
            "when the model has an image_size).",
            "--dynamic/--fixed",
        ),
    ] = None,
    search: Annotated[
        ExportSearch,
        typer.Option(
            help="Nearest-row search in the graph: int8 (onnx) or bfloat16 (openvino) scan with "
            "an exact float32 re-check, or float32 (exact maps); auto: by the format."
        ),
    ] = ExportSearch.auto,  # type: ignore[attr-defined]
    block_rows: Annotated[
        int, typer.Option(help="Memory-bank rows per distance block in the graph.", min=1)
    ] = 4096,
    force: base.ForceOpt = False,
) -> None:
    """Export MODEL's scoring graph for the torch-free runtime (`patchcore-run`)."""
    from patchcore.core.export import ExportError, export  # torch: loaded when the command runs

    with base.errors():
        workflow.check_writable_folder(out.parent, create=True)  # before the export's work
        det = workflow.load_model(model, device="cpu")
        try:
            r = export(
                det,
                out,
                format=format.value,
                dynamic=dynamic,
                search=search.value,
                block_rows=block_rows,
                source=model,
                force=force,
            )
        except ExportError as exc:
            raise ValueError(str(exc)) from None
    typer.echo(
        f"Exported {model} to {out} in {r.seconds:.1f} s ({', '.join(f.name for f in r.files)})"
    )
    typer.echo(
        f"Parity with the torch path (float32 search) on the probe images: scores "
        f"{r.parity['score_rel']:.2g} relative, maps {r.parity['map_rel']:.2g} of their maximum "
        f"(the graph's search: {r.search})"
    )
    typer.echo(f"Run it with: patchcore-run {out} IMAGES...")
