"""The ``patchcore`` command line: fit, calibrate, evaluate, predict, batch, update, explain,
demo (and serve).

The commands parse their arguments, call one function of :mod:`patchcore.apps.workflow` and print
what it returns; no algorithm lives here.

Exit codes: 0 success; 1 runtime failure; 2 bad usage or bad input (missing folder, no images,
model file from another version, threshold not calibrated yet). Expected errors print one line
on stderr; set ``PATCHCORE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from patchcore.core.metrics import MATLAB_METRICS, THRESHOLD_METHODS
from patchcore.core.presets import PRESETS, with_preset
from patchcore.lean.regions import DEFAULT_MIN_AREA, REGION_METHODS
from patchcore.lean.util import check_fraction, fmt, one_line

app = typer.Typer(
    name="patchcore",
    help=(
        "PatchCore anomaly detection for industrial inspection images: fit on normal images, "
        "calibrate a threshold, evaluate with an HTML report, predict with heatmaps.\n\n"
        "Start with `patchcore demo` (solar cells, runs offline)."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

METRIC_COLUMNS = MATLAB_METRICS  # the reference's metrics table, one definition in metrics.py


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose members are ``values`` (typer shows them as the option's choices)."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


Method = _choices("Method", THRESHOLD_METHODS)  # one definition, in metrics.py
RegionMethod = _choices("RegionMethod", REGION_METHODS)  # defined in regions.py
Sampling = _choices("Sampling", ("greedy", "greedy_exact", "random"))
BackboneDtype = _choices("BackboneDtype", ("float32", "bfloat16", "float16"))
Format = _choices("Format", ("table", "json", "csv"))
CellType = _choices("CellType", ("mono", "poly", "all"))
Preset = _choices("Preset", (*PRESETS, "auto"))  # presets.py; auto: core/autoselect.py


# ------------------------------------------------------------------------------ plumbing


def _debug() -> bool:
    return os.environ.get("PATCHCORE_DEBUG", "").strip() not in ("", "0", "false", "no")


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show library warnings (e.g. the detector's skipped images) as one stderr line each."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        typer.echo(f"patchcore: warning: {one_line(message)}", err=True)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


@contextmanager
def _errors() -> Iterator[None]:
    """Turn expected failures into one stderr line and an exit code (2 input, 1 runtime)."""
    from patchcore.apps.workflow import WorkflowError
    from patchcore.core.detector import ModelFileError, NotFittedError
    from patchcore.core.images import ImageReadError

    bad_input = (
        WorkflowError,
        ModelFileError,
        NotFittedError,
        ImageReadError,
        FileNotFoundError,
        NotADirectoryError,
        ValueError,
    )
    try:
        with _warnings_as_lines():
            yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except bad_input as exc:
        if _debug():
            raise
        typer.echo(f"patchcore: error: {one_line(exc)}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if _debug():
            raise
        typer.echo(
            f"patchcore: failed: {type(exc).__name__}: {one_line(exc)} "
            "(set PATCHCORE_DEBUG=1 for the traceback)",
            err=True,
        )
        raise typer.Exit(1) from None


class _Bar:
    """A tqdm progress bar on stderr whose total is set once known (disabled when quiet)."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc = desc
        self.quiet = quiet
        self.bar: Any = None

    def total(self, n: int) -> None:
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=n, desc=self.desc, unit="img", disable=self.quiet, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fraction(name: str, *, allow_one: bool = True) -> Callable[[float | None], float | None]:
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        try:
            return check_fraction(name, value, allow_one=allow_one)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


def _fraction_option(name: str, help: str, *, allow_one: bool = True) -> Any:
    """A ``typer.Option`` for a share in (0, 1] (or (0, 1)), checked on parsing."""
    return typer.Option(name, help=help, callback=_fraction(name, allow_one=allow_one))


def _with_bar(desc: str, quiet: bool, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a workflow step that reports ``total`` then ``progress``, with a bar on stderr."""
    bar = _Bar(desc, quiet)
    with _errors():
        try:
            return step(*args, progress=bar.update, total=bar.total, **kwargs)
        finally:
            bar.close()


def _device(device: str) -> str | None:
    """``--device`` for loading a model: ``auto`` = where it was saved for (None)."""
    return None if device == "auto" else device


def _rate(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {value:g}")
    return value


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


def _print_evaluation(ev: Any) -> None:
    """The metrics of a :class:`~patchcore.apps.workflow.Evaluation` as tables on stdout."""
    m = ev.measured
    typer.echo(
        f"Held-out test images: {m.num_samples} ({m.num_normal} normal, {m.num_anomalous} "
        f"anomalous); threshold {m.threshold:.6g} ({m.threshold_method})"
    )
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
    _echo_skipped(s.skipped)
    for w in s.warnings:
        typer.secho(f"warning: {w}", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"Model updated: {s.model_path}")


# ------------------------------------------------------------------------------ commands


DataArg = Annotated[
    str,
    typer.Argument(
        metavar="DATA",
        help=(
            "Data set folder (DATA/train/good, DATA/test/<label>, DATA/ground_truth/<label>) "
            "or elpv[:mono|poly|all] for the ELPV solar cells."
        ),
        show_default=False,
    ),
]
ModelArg = Annotated[
    Path, typer.Argument(metavar="MODEL", help="Model file written by `patchcore fit`.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DeviceOpt = Annotated[
    str, typer.Option(help="Where to compute: auto (GPU if available), cpu, cuda.")
]


@app.command()
def fit(
    ctx: typer.Context,
    data: DataArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Model file to write.", dir_okay=False)
    ] = Path("model.pt"),
    backbone: Annotated[
        str,
        typer.Option(
            help="Feature extractor: efficientnet-lite0/1/2 (offline), resnet18, resnet50, "
            "wide_resnet50_2."
        ),
    ] = "efficientnet-lite0",
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer",
            help="Tapped layer, repeat for several (default: the backbone's pair).",
            show_default=False,
        ),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            help="Resize images by this factor (the reference uses 0.4). Default: native size.",
            show_default=False,
            min=0.01,
            max=4.0,
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", help="Resize images to N x N instead of --scale.", min=32),
    ] = None,
    train_fraction: Annotated[
        float,
        _fraction_option(
            "--train-fraction", "Seeded share of the training images used (default: all)."
        ),
    ] = 1.0,
    coreset_ratio: Annotated[
        float,
        _fraction_option("--coreset-ratio", "Share of training patches kept in the memory bank."),
    ] = 0.01,
    max_bank_size: Annotated[
        int,
        typer.Option(help="Cap on the memory bank's rows (0: no cap).", min=0),
    ] = 16384,
    sampling: Annotated[
        Sampling,
        typer.Option(
            help="Memory bank subsampling: greedy (linear-time k-center coreset), greedy_exact "
            "(exact, time grows with patches x bank), random."
        ),
    ] = Sampling.greedy,
    seed: Annotated[int, typer.Option(help="Seeds the training subset and the coreset.")] = 0,
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            help="Image score: the mean of the K largest patch distances; 1 = the paper's "
            "largest distance with its eq. 7 reweighting.",
            min=1,
        ),
    ] = 10,
    backbone_dtype: Annotated[
        BackboneDtype,
        typer.Option(
            help="Backbone precision; bfloat16 is faster on CPUs with AMX, features differ a "
            "few percent (opt-in, see benchmarks/RESULTS.md)."
        ),
    ] = BackboneDtype.float32,
    preset: Annotated[
        Preset | None,
        typer.Option(
            help="Named configuration (fast, balanced, accurate; see the README's presets table); "
            "options given explicitly override it. auto: fit each candidate configuration, keep "
            "the best on the labelled calibration half (DATA/test), calibrate there.",
            show_default=False,
        ),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            "--budget",
            help="With --preset auto: minutes for trying candidates (default: no limit).",
            min=0.1,
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Extract features and build the bank on Ray workers (pip install "
            "'patchcore\\[ray]'); one worker gives the single-process bank.",
        ),
    ] = False,
    workers: Annotated[int, typer.Option(help="Ray workers with --ray.", min=1)] = 2,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join with --ray (auto, ray://host:10001); default: a local "
            "Ray with --workers CPUs.",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Fit a detector on the normal images DATA/train/good (or a folder of images)."""
    from patchcore.apps import workflow

    if scale is not None and image_size is not None:
        raise typer.BadParameter("give --scale or --image-size, not both", param_hint="--scale")
    params = {
        "backbone": backbone,
        "layers": layer or None,
        "image_size": image_size,
        "scale": scale,
        "coreset_ratio": coreset_ratio,
        "max_bank_size": max_bank_size or None,
        "sampling": sampling.value,
        "top_k": top_k,
        "backbone_dtype": backbone_dtype.value,
    }
    if preset is not None:
        option = {"layers": "layer"}  # parameter -> the option's name where they differ
        # by name: typer's context may come from its own copy of click (another enum class)
        sources = {
            k: getattr(ctx.get_parameter_source(option.get(k, k)), "name", "") for k in params
        }
        given = {k for k, v in sources.items() if v not in ("DEFAULT", "DEFAULT_MAP")}
        if preset.value == "auto":
            if ray:
                raise typer.BadParameter("--preset auto fits here, not on Ray", param_hint="--ray")
            settings = {k: params[k] for k in given}
            _fit_auto(data, out, budget, train_fraction, seed, device, quiet, settings)
            return
        params.update(with_preset(preset.value, {k: params[k] for k in given}))
    if budget is not None:
        raise typer.BadParameter("--budget goes with --preset auto", param_hint="--budget")
    with _errors():
        s = workflow.fit_model(
            data,
            out,
            train_fraction=train_fraction,
            seed=seed,
            ray={"workers": workers, "address": address} if ray else None,
            device=device,
            progress=not quiet,
            **params,
        )
    size = s.card.get("image_size")
    if size:
        shape = f"resized to {size} x {size}"
    elif s.card.get("scale"):
        shape = f"scaled by {s.card['scale']:g}"
    else:
        shape = "at native resolution"
    typer.echo(f"Fitted {s.card['backbone']} ({', '.join(s.card['layers'])}) on {s.data}")
    if train_fraction >= 1:
        why = "all of them; --train-fraction F fits on a seeded share"
    else:
        why = f"--train-fraction {train_fraction:g}, seed {seed}"
    if s.skipped:
        why += f"; {len(s.skipped)} unreadable skipped"
    typer.echo(f"  training images: {s.training_images} of {s.available_images} ({why}), {shape}")
    typer.echo(
        f"  memory bank:     {s.bank_size:,} of {s.train_patches:,} patches x {s.feature_dim} "
        f"features (coreset ratio {params['coreset_ratio']:g}, {params['sampling']})"
    )
    typer.echo(
        f"  time:            {s.seconds:.1f} s (features {s.feature_seconds:.1f} s, "
        f"coreset {s.coreset_seconds:.1f} s)"
    )
    if ray:
        r = s.distributed
        radius = r.get("coverage_radius")
        typer.echo(
            f"  on Ray:          {r.get('workers')} worker(s), coverage radius "
            + (f"{radius:.4g}" if radius is not None else "not measured")
        )
    typer.echo(f"Model written to {s.model_path}")
    labelled = data.lower().startswith("elpv") or (Path(data) / "test").is_dir()
    typer.echo(f"Next: patchcore calibrate {s.model_path} {data if labelled else 'DATA'}")


def _fit_auto(
    data: str,
    out: Path,
    budget: float | None,
    train_fraction: float,
    seed: int,
    device: str,
    quiet: bool,
    settings: dict[str, Any],
) -> None:
    """``fit --preset auto``: run :func:`workflow.fit_auto_model` and print every candidate."""
    from patchcore.apps import workflow

    def report(line: str) -> None:
        if not quiet:
            typer.echo(line, err=True)

    with _errors():
        a = workflow.fit_auto_model(
            data,
            out,
            budget_minutes=budget,
            train_fraction=train_fraction,
            seed=seed,
            report=report,
            device=device,
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
    typer.echo(f"Next: patchcore evaluate {s.model_path} {data}")


@app.command()
def calibrate(
    model: ModelArg,
    data: DataArg,
    method: Annotated[
        Method | None,
        typer.Option(
            help="Threshold choice (MATLAB anomalyThreshold's methods) [default: max_f1].",
            show_default=False,
        ),
    ] = None,
    max_fpr: Annotated[
        float | None,
        typer.Option(
            "--max-fpr",
            help="Only thresholds with a calibration false positive rate at most this; with "
            "--normal-only, the false-alarm rate to guarantee.",
            callback=_rate,
            show_default=False,
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
        _fraction_option(
            "--calibration-fraction",
            "Share of each label's test images used to calibrate; the rest is held out "
            "for `evaluate`.",
            allow_one=False,
        ),
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seeds the calibration / test split.")] = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Choose the threshold on half of DATA's test images; store it and the split in MODEL.

    With --normal-only --max-fpr RATE: from DATA's held-out normal images alone.
    """
    from patchcore.apps import workflow

    if normal_only:
        with _errors():
            if max_fpr is None or method is not None:
                raise workflow.WorkflowError(
                    "--normal-only needs --max-fpr RATE (e.g. 0.01) and takes no --method"
                )
        _calibrate_normal(model, data, max_fpr, device, quiet)
        return
    s = _with_bar(
        "calibrate",
        quiet,
        workflow.calibrate_model,
        model,
        data,
        method=(method or Method.max_f1).value,
        max_fpr=max_fpr,
        calibration_fraction=calibration_fraction,
        seed=seed,
        device=_device(device),
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
    _echo_calibration_tail(s)
    typer.echo(f"Next: patchcore evaluate {s.model_path} {data} --report report")


def _calibrate_normal(model: Path, data: str, max_fpr: float, device: str, quiet: bool) -> None:
    """``calibrate --normal-only``: run and print :func:`workflow.calibrate_normal_model`."""
    from patchcore.apps import workflow

    s = _with_bar(
        "calibrate",
        quiet,
        workflow.calibrate_normal_model,
        model,
        data,
        max_fpr=max_fpr,
        device=_device(device),
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


@app.command("calibrate-regions")
def calibrate_regions(
    model: ModelArg,
    data: DataArg,
    method: Annotated[
        RegionMethod,
        typer.Option(
            help="max_region_f1: found against false regions; max_pixel_f1: pooled pixels."
        ),
    ] = RegionMethod.max_region_f1,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Choose the map threshold of defect regions on the calibration images stored by
    `calibrate` that have ground-truth masks; store it in MODEL.

    Without it, regions are cut at the image threshold.
    """
    from patchcore.apps import workflow

    s = _with_bar(
        "calibrate-regions",
        quiet,
        workflow.calibrate_regions_model,
        model,
        data,
        method=method.value,
        device=_device(device),
    )
    image = f"{s.image_threshold:.6g}" if s.image_threshold is not None else "none"
    typer.echo(
        f"Region threshold {s.region_threshold:.6g} ({s.method}; image threshold {image}) "
        f"chosen on {s.images} calibration images ({s.normal} normal, {s.with_masks} with "
        f"masks; {s.left_out} defective without a mask left out) in {s.seconds:.1f} s"
    )
    typer.echo(f"Model updated: {s.model_path}")


@app.command()
def evaluate(
    model: ModelArg,
    data: DataArg,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            "-r",
            help="Folder for report.html, its PNGs and metrics.json.",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print metrics.json to stdout instead of tables.")
    ] = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Score the held-out test images stored by `calibrate` (never the calibration ones)."""
    from patchcore.apps import workflow

    ev = _with_bar(
        "evaluate", quiet, workflow.evaluate_model, model, data, report_dir=report,
        device=_device(device),
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(ev.metrics, indent=2))
        return
    _print_evaluation(ev)
    if ev.report_path:
        typer.echo(f"Metrics: {ev.metrics_path}")
        typer.echo(f"Report:  {ev.report_path}")


@app.command()
def predict(
    model: ModelArg,
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="IMAGE_OR_FOLDER...",
            help="Image files and folders of images.",
            show_default=False,
        ),
    ],
    heatmaps: Annotated[
        Path | None,
        typer.Option(
            "--heatmaps",
            help="Folder for one heatmap overlay PNG per image (<name>_heatmap.png).",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        Format,
        typer.Option(
            "--format", "-f", help="table (aligned text), json (one object per line), csv."
        ),
    ] = Format.table,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-R", help="Also look in sub-folders.")
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Verdict threshold (score >= it = anomalous) instead of the model's own; "
            "needed for a model not calibrated yet.",
            show_default=False,
        ),
    ] = None,
    regions: Annotated[
        Path | None,
        typer.Option(
            "--regions",
            help="Write the defect regions (connected regions of each native-size anomaly map "
            "above the region threshold: box x0,y0,x1,y1 in pixels, area, peak, mean) to this "
            ".json or .csv file; JSON rows on stdout list them too, table/CSV rows count them.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    region_threshold: Annotated[
        float | None,
        typer.Option(
            "--region-threshold",
            help="Anomaly-map value regions are cut at, instead of the model's calibrated "
            "region threshold (or, without one, its image threshold).",
            show_default=False,
        ),
    ] = None,
    min_area: Annotated[
        int, typer.Option("--min-area", help="Smallest region kept, in pixels.", min=1)
    ] = DEFAULT_MIN_AREA,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Score images: verdict, score and (with --heatmaps) an overlay per image.

    "normalized" is the score mapped onto [0, 1] with the threshold at 0.5, linear between the
    lowest / highest calibration score and the threshold (a mapping, not a probability).

    Folders stream in chunks with a progress bar on stderr. Unreadable or missing files get the
    verdict "error" with the reason and do not stop the run; the exit code is 1 only when no
    file at all could be read.
    """
    from patchcore.apps import workflow

    with _errors():
        if regions is not None and regions.suffix.lower() not in (".json", ".csv"):
            raise workflow.WorkflowError(
                f"--regions {regions}: name a .json or .csv file (the suffix picks the format)"
            )
        det = workflow.load_model(model, device=_device(device))
        if threshold is not None:
            det.set_threshold(threshold, method="manual (--threshold)")
        workflow.require_threshold(det, model)
        files = workflow.expand_inputs(
            [str(p) for p in inputs], recursive=recursive, missing_ok=True
        )
    bar = _Bar("predict", quiet or len(files) < 2)
    bar.total(len(files))
    n_err = n_anom = n_regions = 0
    writer = _Writer(fmt, heatmaps is not None, regions is not None)
    rows: list[Any] = []
    with _errors():
        try:
            for p in workflow.predict_images(
                det,
                files,
                heatmaps=heatmaps,
                regions=regions is not None,
                region_threshold=region_threshold,
                min_area=min_area,
            ):
                writer.row(p, bar)
                bar.update(1)
                n_err += p.error is not None
                n_anom += bool(p.anomalous)
                n_regions += len(p.regions or ())
                if regions is not None:
                    rows.append(p)
        finally:
            bar.close()
        if regions is not None:
            workflow.write_regions(rows, regions, min_area=min_area)
    n = len(files)
    typer.echo(
        f"{n} image(s): {n_anom} anomalous, {n - n_anom - n_err} normal, {n_err} unreadable"
        + (f"; heatmaps in {heatmaps}" if heatmaps is not None else "")
        + (f"; {n_regions} region(s) in {regions}" if regions is not None else ""),
        err=True,
    )
    if n_err == n:
        raise typer.Exit(1)


class _Writer:
    """Streams predictions as table rows, JSON lines or CSV to stdout."""

    def __init__(self, fmt: Format, heatmaps: bool, regions: bool = False) -> None:
        self.fmt = fmt
        self.heatmaps = heatmaps
        self.regions = regions
        self.started = False

    def _emit(self, line: str, bar: _Bar) -> None:
        if bar.bar is not None and not bar.quiet:
            bar.bar.write(line, file=sys.stdout)
        else:
            typer.echo(line)

    def row(self, p: Any, bar: _Bar) -> None:
        if self.fmt is Format.json:
            self._emit(json.dumps(p.as_dict()), bar)
            return
        if self.fmt is Format.csv:
            fields = ["path", "verdict", "score", "normalized", "threshold", "heatmap", "error"]
            if self.regions:
                fields += ["regions", "region_threshold"]
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="")
            if not self.started:
                w.writerow(fields)
                self._emit(buf.getvalue(), bar)
                buf.seek(0)
                buf.truncate()
                self.started = True
            d = p.as_dict()
            if self.regions:
                d["regions"] = None if p.regions is None else len(p.regions)
            w.writerow(["" if d[k] is None else d[k] for k in fields])
            self._emit(buf.getvalue(), bar)
            return
        if not self.started:
            self._emit(f"{'verdict':<10} {'score':>10} {'normalized':>10}  path", bar)
            self.started = True
        score = f"{p.score:.4f}" if p.score is not None else "-"
        norm = f"{p.normalized:.3f}" if p.normalized is not None else "-"
        tail = f"  -> {p.heatmap}" if p.heatmap else ""
        if self.regions and p.regions is not None:
            tail = f"  [{len(p.regions)} region(s)]" + tail
        if p.error:
            tail = f"  ({p.error})"
        self._emit(f"{p.verdict:<10} {score:>10} {norm:>10}  {p.path}{tail}", bar)


@app.command()
def batch(
    model: ModelArg,
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE...",
            help="Folders, globs ('/data/**/*.png'), .txt or .parquet lists of paths (a "
            "'path' column), image paths; local or any URI pyarrow opens (s3://, gs://...).",
            show_default=False,
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
        typer.Option(
            help="Ray cluster to join (auto, ray://host:10001); default: a local Ray with "
            "--workers CPUs.",
            show_default=False,
        ),
    ] = None,
    heatmaps: Annotated[
        Path | None,
        typer.Option(
            "--heatmaps",
            help="Folder for an overlay PNG per image (shared by the nodes on a cluster).",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Verdict threshold instead of the model's (without either: no verdict).",
            show_default=False,
        ),
    ] = None,
    block_size: Annotated[
        int, typer.Option(help="Images per block (one Ray task, one Parquet file).", min=1)
    ] = 256,
    threads: Annotated[
        int, typer.Option("--threads-per-worker", help="Torch threads per actor.", min=1)
    ] = 1,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-R", help="Also look in sub-folders.")
    ] = False,
    device: Annotated[str, typer.Option(help="Where the actors compute: cpu, cuda.")] = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Score stored images on Ray into Parquet: path, score, verdict, map maximum, error.

    Unreadable images are rows with their error; a re-run with the same --out resumes (after a
    crash or Ctrl-C) and writes every image once. Needs the ray extra: pip install
    "patchcore\\[ray]".
    """
    import logging

    from patchcore.scale import distributed

    logging.getLogger("ray").setLevel(logging.WARNING)
    bar = _Bar("batch", quiet)
    with _errors():
        try:
            s = distributed.batch_score(
                model,
                sources,
                out,
                workers=workers,
                address=address,
                threshold=threshold,
                heatmaps=heatmaps,
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


@app.command()
def update(
    model: ModelArg,
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="NEW_GOOD...",
            help="Normal image files and folders to add (a new batch, a new variant, false "
            "alarms marked as good).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the updated model here (default: MODEL, in place).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-R", help="Also look in sub-folders.")
    ] = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Add normal images to MODEL without refitting: the coreset continues from its bank.

    The bank gains the model's coreset ratio of the new patches (re-selected to the bank cap
    when over it); the update is recorded in the model file. A calibrated threshold is kept
    with a warning: calibrate again.
    """
    from patchcore.apps import workflow

    with _errors():
        s = workflow.update_model(
            model, [str(p) for p in inputs], out=out, recursive=recursive,
            device=_device(device), progress=not quiet,
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


@app.command()
def explain(
    model: ModelArg,
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="IMAGE_OR_FOLDER...", help="Image files and folders.", show_default=False
        ),
    ],
    crops: Annotated[
        Path | None,
        typer.Option(
            "--crops",
            help="Folder for one PNG per image: its worst patch (red) beside the nearest "
            "normal training patch (green).",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        Format, typer.Option("--format", "-f", help="table, json (one object per line), csv.")
    ] = Format.table,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-R", help="Also look in sub-folders.")
    ] = False,
    device: DeviceOpt = "auto",
) -> None:
    """For each image: its worst patch, the nearest normal training patch (which training
    image, where, in its pixels) and how far it is."""
    from patchcore.apps import workflow

    with _errors():
        det = workflow.load_model(model, device=_device(device))
        files = workflow.expand_inputs(
            [str(p) for p in inputs], recursive=recursive, missing_ok=True
        )
        rows = workflow.explain_images(det, files, crops=crops)
    fields = ["name", "score", "distance", "box", "train_name", "train_box", "crop", "error"]
    if fmt is Format.table:
        typer.echo(f"{'score':>10} {'distance':>10}  image [box] <- nearest training patch")
    elif fmt is Format.csv:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(fields)
        typer.echo(buf.getvalue())
    for r in rows:
        e, d = r.explanation, r.as_dict()
        if fmt is Format.json:
            typer.echo(json.dumps(d))
        elif fmt is Format.csv:
            buf = io.StringIO()
            cells = [" ".join(map(str, d[k])) if isinstance(d[k], list) else d[k] for k in fields]
            csv.writer(buf, lineterminator="").writerow(["" if c is None else c for c in cells])
            typer.echo(buf.getvalue())
        elif e.error is not None:
            typer.echo(f"{'-':>10} {'-':>10}  {e.name}  ({e.error})")
        else:
            where = e.note or f"{e.train_name} {list(e.train_box or e.train_patch or [])}"
            typer.echo(
                f"{e.score:>10.4f} {e.distance:>10.4f}  {e.name} {list(e.box or [])} <- {where}"
                + (f"  -> {r.crop}" if r.crop else "")
            )
    if rows and all(r.explanation.error is not None for r in rows):
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for the model, metrics and report.", file_okay=False
        ),
    ] = Path("patchcore-demo"),
    cell_type: Annotated[CellType, typer.Option(help="ELPV cells to use.")] = CellType.mono,
    train_fraction: Annotated[
        float,
        _fraction_option(
            "--train-fraction",
            "Seeded share of the normal cells fitted on (the rest are test images).",
            allow_one=False,
        ),
    ] = 0.5,
    image_size: Annotated[
        int, typer.Option("--image-size", help="Resize cells (300 x 300) to N x N.", min=32)
    ] = 160,
    coreset_ratio: Annotated[
        float,
        _fraction_option(
            "--coreset-ratio",
            "Share of training patches kept in the memory bank (1% keeps it fast).",
        ),
    ] = 0.01,
    method: Annotated[Method, typer.Option(help="Threshold choice.")] = Method.max_f1,
    seed: Annotated[int, typer.Option(help="Seeds every random choice.")] = 0,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Use at most N normal and N defective cells (quick trial).",
            min=4,
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """The whole workflow on the ELPV solar cells (offline): fit, calibrate, evaluate, report.

    Normal cells have defect probability 0, anomalous ones 1.0 (uncertain cells are left out).
    Half the normal cells are fitted on; the rest and all defective cells are split per label
    into a calibration half (threshold) and a held-out half (metrics and report).
    """
    from patchcore.apps import workflow

    bar = _Bar("", quiet)

    def stage(name: str, n: int) -> None:
        bar.close()
        if not quiet:
            typer.echo(f"[{name}] {n} images", err=True)
        if name != "fit":
            bar.desc = name
            bar.total(n)

    with _errors():
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
            )
        finally:
            bar.close()
    f, c, t = r.fit, r.calibration, r.timings
    typer.echo(
        f"PatchCore demo on ELPV {cell_type.value} cells "
        f"({f.card['backbone']}, {image_size} x {image_size}, coreset ratio {coreset_ratio:g})"
    )
    typer.echo(
        f"  fit:       {f.training_images} normal cells -> {f.bank_size:,} patches "
        f"in {t['fit']:.1f} s"
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
    _print_evaluation(r.evaluation)
    typer.echo(f"Model:   {r.model_path}")
    typer.echo(f"Metrics: {r.evaluation.metrics_path}")
    typer.echo(f"Report:  {Path(r.evaluation.report_path or '').resolve()}")


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token required on /v1/* (default: $PATCHCORE_TOKEN; unset = open). "
            "Visible to other users in ps: prefer $PATCHCORE_TOKEN or --token-file.",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="Read the bearer token from this file (kept out of ps and shell history).",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Threads that decode and score (requests scored at once).", min=1)
    ] = 1,
    queue_length: Annotated[
        int, typer.Option(help="Requests allowed to wait for a worker before 503.", min=0)
    ] = 8,
    threshold: Annotated[
        float | None,
        typer.Option(help="Override the model's calibrated threshold.", show_default=False),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve MODEL over HTTP: an inspection page at / and a JSON API under /v1/."""
    from patchcore.apps.service import read_token_file
    from patchcore.apps.service import serve as run_service

    with _errors():
        if token_file is not None:
            if token is not None:
                raise ValueError("give --token or --token-file, not both")
            token = read_token_file(token_file)
        run_service(
            model,
            host,
            port,
            token=token,
            threshold=threshold,
            log_level=log_level,
            workers=workers,
            queue_length=queue_length,
        )


@app.command()
def info(model: ModelArg) -> None:
    """Show a model file's card: backbone, layers, bank, threshold, stored split."""
    from patchcore.apps import workflow

    with _errors():
        det = workflow.load_model(model)
        card = workflow.model_card(det, None)
    w = max(len(k) for k in card)
    for k, v in card.items():
        typer.echo(f"{k:<{w}}  {fmt(v, 6)}")


ExportFormat = _choices("ExportFormat", ("onnx", "openvino"))


@app.command("export")
def export_model(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the export into.")],
    format: Annotated[
        ExportFormat, typer.Option("--format", help="onnx, or openvino (also keeps the .onnx).")
    ] = ExportFormat.onnx,  # type: ignore[attr-defined]
    dynamic: Annotated[
        bool | None,
        typer.Option(
            "--dynamic/--fixed",
            help="Graph for any image size, or the model's fixed image_size only "
            "(default: fixed when the model has an image_size).",
            show_default=False,
        ),
    ] = None,
    block_rows: Annotated[
        int, typer.Option(help="Memory-bank rows per distance block in the graph.", min=1)
    ] = 4096,
) -> None:
    """Export MODEL's scoring graph for the torch-free runtime (`patchcore-run`)."""
    from patchcore.apps import workflow
    from patchcore.core.export import ExportError, export

    with _errors():
        det = workflow.load_model(model, device="cpu")
        try:
            r = export(
                det, out, format=format.value, dynamic=dynamic, block_rows=block_rows, source=model
            )
        except ExportError as exc:
            raise ValueError(str(exc)) from None
    typer.echo(
        f"Exported {model} to {out} in {r.seconds:.1f} s ({', '.join(f.name for f in r.files)})"
    )
    typer.echo(
        f"Parity with the torch path (float32 search) on the probe images: scores "
        f"{r.parity['score_rel']:.2g} relative, maps {r.parity['map_rel']:.2g} of their maximum"
    )
    typer.echo(f"Run it with: patchcore-run {out} IMAGES...")


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
