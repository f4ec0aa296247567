"""``patchcore demo``: the whole workflow on the ELPV solar cells (offline). Its defaults are
:func:`patchcore.apps.workflow.run_demo`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.apps.cli.calibrate import Method
from patchcore.apps.cli.evaluate import print_evaluation
from patchcore.apps.cli.options import literal_defaults

__all__ = ["demo"]

#: run_demo's defaults, read from its source (its module loads torch; the command, only once run).
_DEFAULTS = literal_defaults("patchcore.apps.workflow.demo", "run_demo")
CellType = base.choices("CellType", ("mono", "poly", "all"))


@base.command()
def demo(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for the model, metrics and report.", file_okay=False
        ),
    ] = Path(_DEFAULTS["out_dir"]),
    cell_type: Annotated[CellType, typer.Option(help="ELPV cells to use.")] = CellType(
        _DEFAULTS["cell_type"]
    ),
    train_fraction: Annotated[
        float,
        base.fraction_option(
            "--train-fraction",
            "Seeded share of the normal cells fitted on (the rest are test images).",
            allow_one=False,
        ),
    ] = _DEFAULTS["train_fraction"],
    image_size: Annotated[
        int, typer.Option("--image-size", help="Resize cells (300 x 300) to N x N.", min=32)
    ] = _DEFAULTS["image_size"],
    coreset_ratio: Annotated[
        float,
        base.fraction_option(
            "--coreset-ratio",
            "Share of training patches kept in the memory bank.",
        ),
    ] = _DEFAULTS["coreset_ratio"],
    method: Annotated[Method, typer.Option(help="Threshold choice.")] = Method(_DEFAULTS["method"]),
    seed: Annotated[int, typer.Option(help="Seeds every random choice.")] = _DEFAULTS["seed"],
    limit: Annotated[
        int | None,
        base.optional("Use at most N normal and N defective cells (quick trial).", min=4),
    ] = None,
    device: base.DeviceOpt = _DEFAULTS["device"],
    force: base.ForceOpt = False,
    quiet: base.QuietOpt = False,
) -> None:
    """The whole workflow on the ELPV solar cells (offline): fit, calibrate, evaluate, report.

    Normal cells have defect probability 0, anomalous ones 1.0 (uncertain cells are left out).
    Half the normal cells are fitted on; the rest and all defective cells are split per label
    into a calibration half (threshold) and a held-out half (metrics and report).
    """
    bar = base.Bar("", quiet)

    def stage(name: str, n: int) -> None:
        bar.close()
        if not quiet:
            typer.echo(f"[{name}] {n} images", err=True)
        if name != "fit":
            bar.desc = name
            bar.total(n)

    with base.errors():
        try:
            r = workflow.run_demo(
                out,
                cell_type=cell_type.value,
                train_fraction=train_fraction,
                image_size=image_size,
                coreset_ratio=coreset_ratio,
                method=method.value,
                seed=seed,
                limit=limit,
                device=device,
                fit_progress=not quiet,
                progress=bar.update,
                stage=stage,
                force=force,
            )
        finally:
            bar.close()
    f, c, t = r.fit, r.calibration, r.timings
    typer.echo(
        f"PatchCore demo on ELPV {cell_type.value} cells "
        f"({f.card['backbone']}, {image_size} x {image_size}, coreset ratio {coreset_ratio:g})"
    )
    typer.echo(
        f"  fit:       {f.training_images} normal cells -> memory bank of {f.bank_size:,} "
        f"rows (of {f.train_patches:,} training patches) in {t['fit']:.1f} s"
    )
    typer.echo(
        f"  calibrate: {c.calibration_images} cells ({c.calibration_normal} normal, "
        f"{c.calibration_anomalous} defective) -> threshold {c.threshold:.6g} ({c.method}) "
        f"in {t['calibrate']:.1f} s"
    )
    typer.echo(
        f"  evaluate:  {c.test_images} held-out cells in {t['evaluate']:.1f} s "
        f"({r.evaluation.ms_per_image:.1f} ms per image); total {t['total']:.1f} s"
    )
    typer.echo("")
    print_evaluation(r.evaluation)
    typer.echo(f"Model:   {r.model_path}")
    typer.echo(f"Metrics: {r.evaluation.metrics_path}")
    typer.echo(f"Report:  {Path(r.evaluation.report_path or '').resolve()}")
