"""``patchcore calibrate`` and ``patchcore calibrate-regions``: choose and store thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.core.metrics import THRESHOLD_METHODS
from patchcore.lean.regions import REGION_METHODS

__all__ = ["Method", "calibrate", "calibrate_regions"]

Method = base.choices("Method", THRESHOLD_METHODS)  # one definition, in metrics.py
RegionMethod = base.choices("RegionMethod", REGION_METHODS)  # defined in regions.py


def _rate(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {value:g}")
    return value


def _echo_skipped(skipped: list[tuple[str, str]]) -> None:
    """The first ten unreadable images of a calibration, on stderr (fit's come as the
    detector's warning)."""
    if skipped:
        typer.echo(f"  skipped {len(skipped)} unreadable image(s):", err=True)
        for path, problem in skipped[:10]:
            typer.echo(f"    {path}: {problem}", err=True)


def _echo_calibration_tail(s: Any) -> None:
    """The lines both ``calibrate`` modes end with: display range, time, skipped images,
    warnings (stderr) and the model written."""
    typer.echo(
        f"  heatmap display range: [{s.display_range[0]:.4g}, {s.display_range[1]:.4g}] "
        f"(min, 0.7 x max over the calibration maps)"
    )
    typer.echo(f"  time: {s.seconds:.1f} s ({s.ms_per_image:.1f} ms per image)")
    before = "none" if s.replaced is None else workflow.entry_text(s.replaced)
    typer.echo(f"  replaced threshold: {before}")
    _echo_skipped(s.skipped)
    replaced = workflow.replaced_warning(s.replaced, s.entry)
    base.echo_warnings([*s.warnings, *([replaced] if replaced else [])])
    typer.echo(f"Model updated: {s.model_path}")


@base.command()
def calibrate(
    model: base.ModelArg,
    data: base.DataArg,
    method: Annotated[
        Method | None,
        base.optional("Threshold choice (MATLAB anomalyThreshold's methods) [default: max_f1]."),
    ] = None,
    max_fpr: Annotated[
        float | None,
        base.optional(
            "Only thresholds with a calibration false positive rate at most this; with "
            "--normal-only, the false-alarm rate to guarantee.",
            callback=_rate,
        ),
    ] = None,
    normal_only: Annotated[
        bool,
        typer.Option(
            "--normal-only",
            help="Choose the threshold from DATA's normal images that were not fitted on "
            "(train/good, or a folder of normal images), for the false-alarm rate --max-fpr "
            "(split conformal: expected rate <= it on normals like these). No defective "
            "images needed; labelled test images stay held out for `evaluate` "
            "(--calibration-fraction and --seed do not apply).",
        ),
    ] = False,
    calibration_fraction: Annotated[
        float,
        base.fraction_option(
            "--calibration-fraction",
            "Share of each label's test images used to calibrate; the rest is held out "
            "for `evaluate`.",
            allow_one=False,
        ),
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seeds the calibration / test split.")] = 0,
    strict: base.StrictOpt = False,
    device: base.DeviceOpt = "auto",
    quiet: base.QuietOpt = False,
) -> None:
    """Choose the threshold on half of DATA's test images; store it and the split in MODEL.

    With --normal-only --max-fpr RATE: from DATA's held-out normal images alone.
    """

    if normal_only:
        with base.errors():
            if max_fpr is None or method is not None:
                raise workflow.WorkflowError(
                    "--normal-only needs --max-fpr RATE (e.g. 0.01) and takes no --method"
                )
        _calibrate_normal(model, data, max_fpr, device, quiet, strict)
        return
    s = base.with_bar(
        "calibrate",
        quiet,
        workflow.calibrate_model,
        model,
        data,
        method=(method or Method.max_f1).value,
        max_fpr=max_fpr,
        calibration_fraction=calibration_fraction,
        seed=seed,
        device=base.model_device(device),
        strict=strict,
    )
    cm = s.calibration_metrics
    bound = f", FPR <= {s.max_fpr:g}" if s.max_fpr is not None else ""
    typer.echo(f"Threshold {s.threshold:.6g} ({s.method}{bound}) chosen on {s.data}")
    typer.echo(
        f"  calibration images: {s.calibration_images} ({s.calibration_normal} normal, "
        f"{s.calibration_anomalous} anomalous): F1 {cm.f1_score:.4f}, recall "
        f"{cm.recall:.4f}, FPR {cm.false_positive_rate:.4f}"
    )
    typer.echo(
        f"  held out for evaluate: {s.test_images} ({s.test_normal} normal, "
        f"{s.test_anomalous} anomalous)"
    )
    if s.training_left_out:
        typer.echo(f"  left out: {s.training_left_out} images the model was fitted on")
    _echo_calibration_tail(s)
    typer.echo(f"Next: patchcore evaluate {s.model_path} {data} --report report")


def _calibrate_normal(
    model: Path, data: str, max_fpr: float, device: str, quiet: bool, strict: bool
) -> None:
    """``calibrate --normal-only``: run and print :func:`workflow.calibrate_normal_model`."""

    s = base.with_bar(
        "calibrate",
        quiet,
        workflow.calibrate_normal_model,
        model,
        data,
        max_fpr=max_fpr,
        device=base.model_device(device),
        strict=strict,
    )
    lo, hi = s.fpr_bounds
    typer.echo(
        f"Threshold {s.threshold:.6g} (conformal, false-alarm rate <= {s.max_fpr:g}) chosen "
        f"on {s.normal_images} held-out normal images of {s.data}"
    )
    typer.echo(
        f"  just above score {s.rank} of {s.normal_images} (ascending); a rate of {s.max_fpr:g} "
        f"needs >= {s.images_needed} normal images ({s.fitting_images_left_out} fitting "
        "images left out)"
    )
    typer.echo(
        f"  expected false-alarm rate on new normal images like these: {lo:.4f}-{hi:.4f} "
        f"(on the calibration images: {s.calibration_fpr:.4f}); drifted images void it"
    )
    typer.echo(
        f"  held out for evaluate: {s.test_images} labelled images"
        if s.test_images
        else "  no labelled test images held out (evaluate needs DATA/test/good and defects)"
    )
    _echo_calibration_tail(s)
    if s.test_images:
        typer.echo(f"Next: patchcore evaluate {s.model_path} {data} --report report")


@base.command("calibrate-regions")
def calibrate_regions(
    model: base.ModelArg,
    data: base.DataArg,
    method: Annotated[
        RegionMethod,
        typer.Option(
            help="max_region_f1: found against false regions; max_pixel_f1: pooled pixels."
        ),
    ] = RegionMethod.max_region_f1,
    strict: base.StrictOpt = False,
    device: base.DeviceOpt = "auto",
    quiet: base.QuietOpt = False,
) -> None:
    """Choose the map threshold of defect regions on the calibration images stored by
    `calibrate` that have ground-truth masks; store it in MODEL.

    Without it, regions are cut at the image threshold.
    """

    s = base.with_bar(
        "calibrate-regions",
        quiet,
        workflow.calibrate_regions_model,
        model,
        data,
        method=method.value,
        device=base.model_device(device),
        strict=strict,
    )
    image = f"{s.image_threshold:.6g}" if s.image_threshold is not None else "none"
    typer.echo(
        f"Region threshold {s.region_threshold:.6g} ({s.method}; image threshold {image}) "
        f"chosen on {s.images} calibration images ({s.normal} normal, {s.with_masks} with "
        f"masks; {s.left_out} defective without a mask left out) in {s.seconds:.1f} s"
    )
    base.echo_warnings(s.warnings)
    typer.echo(f"Model updated: {s.model_path}")
