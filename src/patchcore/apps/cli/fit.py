"""``patchcore fit``: its estimator options come from :class:`PatchCore`'s signature
(:mod:`patchcore.apps.cli.options`), so no default is written here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from patchcore.apps import workflow
from patchcore.apps.cli import base
from patchcore.apps.cli.auto import fit_auto
from patchcore.apps.cli.options import estimator_options, with_options
from patchcore.core.params import PatchCoreParams
from patchcore.core.presets import PRESETS, with_preset

__all__ = ["FIT_OPTIONS", "fit"]

#: fit's estimator options: every PatchCore parameter but ``progress`` (that is --quiet), from
#: the torch-free signature PatchCore inherits (so ``patchcore --help`` loads no torch).
FIT_OPTIONS = estimator_options(PatchCoreParams, skip=("progress",))
Preset = base.choices("Preset", (*PRESETS, "auto"))  # presets.py; auto: core/autoselect.py


def _given(ctx: typer.Context, names: list[str]) -> set[str]:
    """The parameters given on the command line (not defaults)."""
    # by name: typer's context may come from its own copy of click (another enum class)
    sources = {k: getattr(ctx.get_parameter_source(k), "name", "") for k in names}
    return {k for k, v in sources.items() if v not in ("DEFAULT", "DEFAULT_MAP")}


@base.command()
@with_options(FIT_OPTIONS, after="out")
def fit(
    ctx: typer.Context,
    data: base.DataArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Model file to write.", dir_okay=False)
    ] = Path("model.pt"),
    train_fraction: Annotated[
        float,
        base.fraction_option(
            "--train-fraction", "Seeded share of the training images used; 1 = all of them."
        ),
    ] = 1.0,
    preset: Annotated[
        Preset | None,  # type: ignore[valid-type]
        base.optional(
            "Named configuration (fast, balanced, accurate; see the README's presets table); "
            "options given explicitly override it. auto: fit each candidate configuration, keep "
            "the best on the labelled calibration half (DATA/test), calibrate there."
        ),
    ] = None,
    budget: Annotated[
        float | None,
        base.optional("With --preset auto: minutes for trying candidates.", "--budget", min=0.1),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Extract features and build the bank on Ray workers (pip install "
            "'patchcore[ray]'); one worker gives the single-process bank.",
        ),
    ] = False,
    workers: Annotated[int, typer.Option(help="Ray workers with --ray.", min=1)] = 2,
    address: Annotated[
        str | None,
        base.optional(
            "Ray cluster to join with --ray (auto, ray://host:10001); default: a local Ray "
            "with --workers CPUs."
        ),
    ] = None,
    force: base.ForceOpt = False,
    quiet: base.QuietOpt = False,
    **options: Any,
) -> None:
    """Fit a detector on the normal images DATA/train/good (or a folder of images)."""
    from patchcore.core.detector import PatchCore  # torch: loaded when the command runs
    from patchcore.core.validation import validate_params

    params = {k: FIT_OPTIONS[k].value(v) for k, v in options.items()}
    if preset is not None and preset.value == "auto":
        if ray:
            raise typer.BadParameter("--preset auto fits here, not on Ray", param_hint="--ray")
        settings = {k: params[k] for k in _given(ctx, list(params)) | {"seed"}}
        fit_auto(data, out, budget, train_fraction, force, quiet, settings)
        return
    if budget is not None:
        raise typer.BadParameter("--budget goes with --preset auto", param_hint="--budget")
    with base.errors():
        if preset is not None:
            given = _given(ctx, list(params))
            params.update(with_preset(preset.value, {k: params[k] for k in given}))
        validate_params(PatchCore(**params))  # a bad value fails here, before any image
        seed = params.pop("seed")
        s = workflow.fit_model(
            data,
            out,
            train_fraction=train_fraction,
            seed=seed,
            ray={"workers": workers, "address": address} if ray else None,
            progress=not quiet,
            force=force,
            **params,
        )
    _print_summary(s, data, train_fraction, seed)


def _print_summary(s: workflow.FitSummary, data: str, train_fraction: float, seed: int) -> None:
    card = s.card
    if card.get("image_size"):
        shape = f"resized to {card['image_size']} x {card['image_size']}"
    elif card.get("scale"):
        shape = f"scaled by {card['scale']:g}"
    else:
        shape = "at native resolution"
    typer.echo(f"Fitted {card['backbone']} ({', '.join(card['layers'])}) on {s.data}")
    typer.echo(f"  training images: {_training_images(s, train_fraction, seed)}, {shape}")
    typer.echo(
        f"  memory bank:     {s.bank_size:,} rows of {s.train_patches:,} training patches x "
        f"{s.feature_dim} features (coreset ratio {card['coreset_ratio']:g}, "
        f"{card['sampling']})"
    )
    typer.echo(
        f"  time:            {s.seconds:.1f} s (features {s.feature_seconds:.1f} s, "
        f"coreset {s.coreset_seconds:.1f} s)"
    )
    if s.distributed:
        radius = s.distributed.get("coverage_radius")
        typer.echo(
            f"  on Ray:          {s.distributed.get('workers')} worker(s), coverage radius "
            + (f"{radius:.4g}" if radius is not None else "not measured")
        )
    typer.echo(f"Model written to {s.model_path}")
    labelled = data.lower().startswith(("elpv", "visa:")) or (Path(data) / "test").is_dir()
    typer.echo(f"Next: patchcore calibrate {s.model_path} {data if labelled else 'DATA'}")


def _training_images(s: workflow.FitSummary, train_fraction: float, seed: int) -> str:
    """How many images the bank was built from, of how many, and why not all: the counts
    always add up (used + unreadable = drawn <= available)."""
    skipped = len(s.skipped)
    why = []
    if train_fraction < 1:
        share = f"--train-fraction {train_fraction:g}, seed {seed}"
        why.append(f"{s.training_images + skipped} drawn by {share}" if skipped else share)
    elif not skipped:
        why.append("all of them")
    if skipped:
        why.append(f"{skipped} unreadable skipped")
    if train_fraction >= 1:
        why.append("--train-fraction F fits on a seeded share")
    return f"{s.training_images} of {s.available_images} ({'; '.join(why)})"
