"""``patchcore fit --preset auto``: try the auto preset's candidates, print every one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base

__all__ = ["fit_auto"]


def fit_auto(
    data: str,
    out: Path,
    budget: float | None,
    train_fraction: float,
    force: bool,
    quiet: bool,
    settings: dict[str, Any],
) -> None:
    """Run :func:`workflow.fit_auto_model` (progress lines on stderr) and print its summary.

    Args:
        settings: the PatchCore options given on the command line (``seed`` among them).
    """

    def report(line: str) -> None:
        if not quiet:
            typer.echo(line, err=True)

    with base.errors():
        a = workflow.fit_auto_model(
            data,
            out,
            budget_minutes=budget,
            train_fraction=train_fraction,
            force=force,
            report=report,
            progress=not quiet,
            **settings,
        )
    c, s = a.calibration, a.fit
    limit = "no limit" if a.budget_seconds is None else f"budget {a.budget_seconds / 60:g} min"
    typer.echo(
        f"Auto preset: chose {a.chosen} by image AUROC on {c.calibration_images} calibration "
        f"images ({c.calibration_normal} normal, {c.calibration_anomalous} anomalous) in "
        f"{a.seconds:.0f} s ({limit})"
    )
    for r in a.candidates:
        area = "—" if r.calibration_auroc is None else f"{r.calibration_auroc:.4f}"
        cost = f"fit {r.fit_seconds:.0f} s, {r.ms_per_image:.0f} ms/image" if r.fit_seconds else ""
        typer.echo(f"  {r.name:<16} calibration AUROC {area:>6}  {cost:<28} {r.status}")
    typer.echo(
        f"Fitted {s.card['backbone']} ({', '.join(s.card['layers'])}) on {s.data}: "
        f"{s.training_images} training images, bank {s.bank_size:,} of {s.train_patches:,} "
        f"patches x {s.feature_dim}"
    )
    typer.echo(
        f"  threshold {c.threshold:.6g} ({c.method}) on the calibration images; "
        f"{c.test_images} held out for evaluate (none used to choose)"
    )
    typer.echo(f"Model written to {s.model_path}")
    typer.echo(f"Next: patchcore evaluate {s.model_path} {data} --report DIR")
