"""``patchcore evaluate``: metrics of the held-out images and the HTML report (and the metric
tables the demo prints too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.core.metrics import MATLAB_METRICS
from patchcore.lean.util import fmt

__all__ = ["METRIC_COLUMNS", "evaluate", "print_evaluation"]

METRIC_COLUMNS = MATLAB_METRICS  # the reference's metrics table, one definition in metrics.py


def _metrics_table(m: dict[str, Any]) -> str:
    """The reference's one-row DataSetMetrics table, as aligned plain text."""
    widths = [max(len(c), 6) for c in METRIC_COLUMNS]
    head = "  ".join(c.rjust(w) for c, w in zip(METRIC_COLUMNS, widths, strict=True))
    row = "  ".join(fmt(m.get(c)).rjust(w) for c, w in zip(METRIC_COLUMNS, widths, strict=True))
    return f"{head}\n{row}"


def _confusion(cm: list[list[int]]) -> str:
    (tn, fp), (fn, tp) = cm
    w = max(9, *(len(str(v)) for v in (tn, fp, fn, tp)))
    return (
        "Confusion matrix (rows: true class, columns: predicted class)\n"
        f"{'':>12}{'normal':>{w}}  {'anomalous':>{w}}\n"
        f"{'normal':>12}{tn:>{w}}  {fp:>{w}}\n"
        f"{'anomalous':>12}{fn:>{w}}  {tp:>{w}}"
    )


def print_evaluation(ev: Any) -> None:
    """The metrics of a :class:`~patchcore.apps.workflow.Evaluation` as tables on stdout."""
    m = ev.measured
    typer.echo(
        f"Held-out test images: {m.num_samples} ({m.num_normal} normal, {m.num_anomalous} "
        f"anomalous); threshold {m.threshold:.6g} ({m.threshold_method})"
    )
    if ev.split:
        typer.echo(f"  scored: {ev.split}")
    typer.echo("")
    typer.echo(_metrics_table(m.as_dict()))
    typer.echo("")
    typer.echo(_confusion(m.confusion_matrix))
    recall = m.defect_type_recall or {}
    counts = m.defect_type_counts or {}
    types = [t for t in recall if t != "good"]
    if types:
        typer.echo("")
        typer.echo("Recall per defect type")
        rows = [(t, recall[t], counts.get(t, "?")) for t in types]
        if "good" in recall:
            rows.append(("normal (specificity)", recall["good"], counts.get("good", "?")))
        w = max(len(r[0]) for r in rows)
        for name, value, n in rows:
            typer.echo(f"  {name:<{w}}  {value:.4f}  ({n} images)")
    typer.echo("")
    typer.echo(f"Image AUROC: {fmt(m.auroc)}")
    if m.pixel_auroc is not None:
        typer.echo(
            f"Pixel AUROC: {fmt(m.pixel_auroc)}   AUPRO (FPR <= 0.3): {fmt(m.aupro)}"
            f"   ({m.pixel_metric_images} images with masks)"
        )
    typer.echo(f"Scoring time: {ev.ms_per_image:.1f} ms per image")
    if ev.skipped:
        typer.echo(f"{len(ev.skipped)} unreadable image(s) left out:", err=True)
        for path, problem in ev.skipped[:10]:
            typer.echo(f"  {path}: {problem}", err=True)


@base.command()
def evaluate(
    model: base.ModelArg,
    data: base.DataArg,
    report: Annotated[
        Path | None,
        base.optional(
            "Folder for report.html, its PNGs and metrics.json.",
            "--report",
            "-r",
            file_okay=False,
        ),  # fmt: skip
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print metrics.json to stdout instead of tables.")
    ] = False,
    strict: base.StrictOpt = False,
    device: base.DeviceOpt = "auto",
    force: base.ForceOpt = False,
    quiet: base.QuietOpt = False,
) -> None:
    """Score the held-out test images stored by `calibrate` (never the calibration ones)."""
    ev = base.with_bar(
        "evaluate", quiet, workflow.evaluate_model, model, data, report_dir=report,
        device=base.model_device(device), force=force, strict=strict,
    )  # fmt: skip
    base.echo_warnings(ev.warnings)
    if as_json:
        typer.echo(json.dumps(ev.metrics, indent=2))
        return
    print_evaluation(ev)
    if ev.report_path:
        typer.echo(f"Metrics: {ev.metrics_path}")
        typer.echo(f"Report:  {ev.report_path}")
