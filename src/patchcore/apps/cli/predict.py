"""``patchcore predict``: one inspection record per image, streamed as table, JSON or CSV rows
(:class:`patchcore.lean.writers.RecordWriter`, the same rows as ``patchcore-run``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.apps.cli.options import literal_value
from patchcore.lean.record import ANOMALOUS, ERROR, NORMAL, Inspection
from patchcore.lean.regions import DEFAULT_MIN_AREA
from patchcore.lean.writers import RecordWriter

__all__ = ["Tally", "predict"]

#: workflow's layouts, read from its source (its module loads torch; the command, only once run)
HeatmapLayout = base.choices(
    "HeatmapLayout", literal_value("patchcore.apps.workflow.predict", "HEATMAP_LAYOUTS")
)


class Tally:
    """Counts of the verdicts written so far, and the line that sums them up."""

    def __init__(self) -> None:
        self.counts: dict[str | None, int] = {ANOMALOUS: 0, NORMAL: 0, ERROR: 0, None: 0}
        self.regions = 0

    def add(self, rec: Inspection) -> None:
        self.counts[rec.verdict] += 1
        self.regions += len(rec.regions or ())

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        c = self.counts
        return (
            f"{self.total} image(s): {c[ANOMALOUS]} {ANOMALOUS}, {c[NORMAL]} {NORMAL}, "
            f"{c[ERROR]} {ERROR}"
        )


@base.command()
def predict(
    model: base.ModelArg,
    inputs: base.InputsArg,
    heatmaps: Annotated[
        Path | None,
        base.folder_option(
            "--heatmaps",
            "Folder for one heatmap PNG per image (<name>_heatmap.png): the image, its "
            "anomaly-map overlay with the defect regions boxed, and the colour bar.",
        ),
    ] = None,
    heatmap_layout: Annotated[
        HeatmapLayout,  # type: ignore[valid-type]
        typer.Option(
            "--heatmap-layout",
            help="panels: image | overlay | colour bar under a line with the verdict; "
            "overlay: the overlay alone at the image's size (the earlier pictures).",
        ),
    ] = HeatmapLayout.panels,  # type: ignore[attr-defined]
    fmt: base.FormatOpt = base.Format.table,  # type: ignore[attr-defined]
    recursive: base.RecursiveOpt = False,
    threshold: Annotated[
        float | None,
        base.optional(
            "Verdict threshold (a score at or above it is anomalous) instead of the model's "
            "own; needed for a model not calibrated yet."
        ),
    ] = None,
    regions: Annotated[
        Path | None,
        base.optional(
            "Also write the records' defect regions (box x0,y0,x1,y1 in pixels, area, peak, "
            "mean) to this .json or .csv file.",
            dir_okay=False,
        ),
    ] = None,
    region_threshold: Annotated[
        float | None,
        base.optional(
            "Anomaly-map value regions are cut at, instead of the model's calibrated region "
            "threshold (or, without one, its image threshold)."
        ),
    ] = None,
    min_area: Annotated[
        int, typer.Option("--min-area", help="Smallest region kept, in pixels.", min=1)
    ] = DEFAULT_MIN_AREA,
    fail_fast: base.FailFastOpt = False,
    force: base.ForceOpt = False,
    device: base.DeviceOpt = "auto",
    quiet: base.QuietOpt = False,
) -> None:
    """Inspect images: one row per image with its verdict (anomalous, normal or error), score,
    normalised score, map maximum and defect regions.

    The normalised score is the score mapped onto [0, 1] with the threshold at 0.5 (a
    mapping, not a probability). Rows stream as images are scored, with a progress bar on
    stderr. A file that cannot be read or scored is a row with the verdict "error" and its
    reason, and the run goes on (--fail-fast stops there); the exit code is 1 only when no
    file at all could be scored.
    """
    with base.errors():
        det = workflow.load_model(model, device=base.model_device(device))
        if threshold is not None:
            det.set_threshold(threshold, method="manual (--threshold)")
        workflow.require_threshold(det, model)
        files = workflow.expand_inputs(
            [str(p) for p in inputs], recursive=recursive, missing_ok=True
        )
        out = contextlib.nullcontext(None)
        if regions is not None:
            out = workflow.regions_file(regions, min_area=min_area, force=force)
        tally = Tally()
        with out as add_regions:
            stream = workflow.inspect_files(
                det, files, heatmaps=heatmaps, region_threshold=region_threshold,
                min_area=min_area, force=force, layout=heatmap_layout.value,
            )  # fmt: skip
            bar = base.Bar("predict", quiet or len(files) < 2)
            bar.total(len(files))
            try:
                _write_rows(stream, fmt.value, bar, heatmaps is not None, tally, add_regions,
                            fail_fast)  # fmt: skip
            finally:
                bar.close()
    typer.echo(
        tally.line()
        + (f"; heatmaps in {heatmaps}" if heatmaps is not None else "")
        + (f"; {tally.regions} region(s) in {regions}" if regions is not None else ""),
        err=True,
    )
    if tally.counts[ERROR] == tally.total:
        raise typer.Exit(1)


def _write_rows(
    stream: Any,
    fmt: str,
    bar: base.Bar,
    heatmaps: bool,
    tally: Tally,
    add_regions: Callable[[Inspection], None] | None,
    fail_fast: bool,
) -> None:
    """Write each record of ``stream`` as it comes (and its regions); --fail-fast raises a
    WorkflowError (exit 2) after printing the first error row."""
    writer = RecordWriter(fmt, bar.emit, extra=("heatmap",) if heatmaps else ())
    writer.header()
    for rec, heat in stream:
        writer.write(rec, heatmap=heat)
        bar.update(1)
        tally.add(rec)
        if add_regions is not None:
            add_regions(rec)
        if fail_fast and rec.verdict == ERROR:
            raise workflow.WorkflowError(
                f"{rec.image}: {rec.error} (--fail-fast: stopped at the first error)"
            )
