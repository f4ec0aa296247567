"""``patchcore batch``: score stored images on Ray into a Parquet dataset (the scoring itself
is :func:`patchcore.scale.batch_score`'s)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base

__all__ = ["batch"]


@base.command()
def batch(
    model: base.ModelArg,
    sources: Annotated[
        list[str],
        base.paths_argument(
            "SOURCE...",
            "Folders, globs ('/data/**/*.png'), .txt or .parquet lists of paths (a 'path' "
            "column), image paths; local or any URI pyarrow opens (s3://, gs://...).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: a Parquet dataset, one file per finished block; a re-run "
            "skips the images already in it.",
            file_okay=False,
        ),
    ],
    workers: Annotated[
        int, typer.Option(help="Scoring actors (each loads the model once).", min=1)
    ] = 2,
    address: Annotated[
        str | None,
        base.optional(
            "Ray cluster to join (auto, ray://host:10001); default: a local Ray with "
            "--workers CPUs."
        ),
    ] = None,
    heatmaps: Annotated[
        Path | None,
        base.folder_option(
            "--heatmaps", "Folder for an overlay PNG per image (shared by the nodes on a cluster)."
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        base.optional("Verdict threshold instead of the model's (a finite number)."),
    ] = None,
    scores_only: Annotated[
        bool,
        typer.Option(
            "--scores-only",
            help="Scores and map maxima without verdicts (a model without a threshold needs it).",
        ),
    ] = False,
    block_size: Annotated[
        int, typer.Option(help="Images per block (one Ray task, one Parquet file).", min=1)
    ] = 256,
    threads: Annotated[
        int, typer.Option("--threads-per-worker", help="Torch threads per actor.", min=1)
    ] = 1,
    recursive: base.RecursiveOpt = False,
    device: Annotated[str, typer.Option(help="Where the actors compute: cpu, cuda.")] = "cpu",
    quiet: base.QuietOpt = False,
) -> None:
    """Score stored images on Ray into Parquet: one inspection record per image.

    Unreadable images are rows with their error; a re-run with the same --out resumes (after a
    crash or Ctrl-C) and writes every image once. Needs the ray extra: pip install
    "patchcore[ray]".
    """
    with base.errors():
        # a read-only --out fails now, not after the first block is scored
        workflow.check_writable_folder(out)
        from patchcore import scale  # the ray extra: only when asked for
        from patchcore.apps import plots

        logging.getLogger("ray").setLevel(logging.WARNING)
    bar = base.Bar("batch", quiet)
    with base.errors():
        try:
            s = scale.batch_score(
                model,
                sources,
                out,
                workers=workers,
                address=address,
                threshold=threshold,
                scores_only=scores_only,
                heatmaps=heatmaps,
                overlay=plots.anomaly_map_overlay if heatmaps is not None else None,
                block_size=block_size,
                threads_per_worker=threads,
                recursive=recursive,
                device=device,
                progress=bar.update,
                total=bar.total,
            )
        finally:
            bar.close()
    typer.echo(
        f"{s.inputs} image(s): {s.already_done} already in {s.out}, {s.written} written now "
        f"({s.anomalous} anomalous, {s.errors} unreadable) in {s.seconds:.1f} s "
        f"({s.images_per_second:.1f} images/s, {s.workers} worker(s))",
        err=True,
    )
    if s.written and s.errors == s.written:
        raise typer.Exit(1)
