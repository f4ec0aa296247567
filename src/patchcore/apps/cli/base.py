"""The ``patchcore`` Typer app and what its commands share: the :func:`command` decorator
(quiet exits on Ctrl-C and closed pipes), error handling, progress bars, option types.

Exit codes: 0 success; 1 runtime failure; 2 bad usage or bad input (missing folder, no images,
model file from another version, threshold not calibrated yet, an output that would replace a
file of another kind); 130 interrupted (Ctrl-C); 141 the reader of stdout went away (``|
head``), as a shell reports a tool ended by SIGPIPE. Expected errors print one line on stderr;
set ``PATCHCORE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from tqdm.auto import tqdm

from patchcore.lean.pixels import ImageReadError
from patchcore.lean.util import check_fraction, one_line
from patchcore.lean.writers import FORMATS

__all__ = [
    "DataArg",
    "DeviceOpt",
    "FailFastOpt",
    "ForceOpt",
    "Format",
    "FormatOpt",
    "InputsArg",
    "ModelArg",
    "QuietOpt",
    "RecursiveOpt",
    "StrictOpt",
    "Bar",
    "app",
    "choices",
    "command",
    "echo_warnings",
    "model_device",
    "errors",
    "folder_option",
    "fraction_option",
    "optional",
    "paths_argument",
    "with_bar",
]

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE

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
    # click's own help layout: paragraphs re-wrapped to the terminal, never cut mid-sentence
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose members are ``values`` (typer shows them as the option's choices)."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


Format = choices("Format", FORMATS)  # one definition, in lean/writers.py


def _debug() -> bool:
    return os.environ.get("PATCHCORE_DEBUG", "").strip() not in ("", "0", "false", "no")


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the exit's flush cannot fail."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@contextlib.contextmanager
def _quiet_exits() -> Iterator[None]:
    """Ctrl-C: exit 130; a closed stdout (``| head``): exit 141; no traceback, no message.
    Whatever was being written is abandoned by its own ``finally`` (no half-written file)."""
    try:
        yield
    except KeyboardInterrupt:
        if _debug():
            raise
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(EXIT_CLOSED_PIPE) from None


def command(name: str | None = None) -> Callable[[F], F]:
    """Register a function as a ``patchcore`` command, run under :func:`_quiet_exits`. Its
    docstring is the help, and the docstring's first paragraph, whole, the line in
    ``patchcore --help``'s list. The function itself is returned unchanged."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with _quiet_exits():
                return fn(*args, **kwargs)

        first = (inspect.getdoc(fn) or "").split("\n\n")[0]
        app.command(name, short_help=" ".join(first.split()))(run)
        return fn

    return register


@contextlib.contextmanager
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


_BAD_INPUT = (ImageReadError, FileNotFoundError, NotADirectoryError, ValueError)
#: Bad input raised by the estimator and the workflow, by module and class name: the CLI loads
#: them with the command that needs them (an exception can only come from a loaded module), so
#: ``patchcore --help`` imports no torch. (WorkflowError and ModelFileError are ValueErrors.)
_BAD_INPUT_LOADED = (
    ("patchcore.apps.workflow.data", "WorkflowError"),
    ("patchcore.core.backbones", "BackboneWeightsError"),
    ("patchcore.core.persistence", "ModelFileError"),
    ("patchcore.core.state", "NotFittedError"),
)


def _bad_input() -> tuple[type[BaseException], ...]:
    """The exception classes that mean bad input (exit 2), of the modules loaded so far."""
    loaded = tuple(
        getattr(sys.modules[module], name)
        for module, name in _BAD_INPUT_LOADED
        if module in sys.modules
    )
    return (*_BAD_INPUT, *loaded)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn expected failures into one stderr line and an exit code (2 input, 1 runtime)."""
    try:
        with _warnings_as_lines():
            yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if _debug():
            raise
        if not isinstance(exc, _bad_input()):
            typer.echo(
                f"patchcore: failed: {type(exc).__name__}: {one_line(exc)} "
                "(set PATCHCORE_DEBUG=1 for the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None
        typer.echo(f"patchcore: error: {one_line(exc)}", err=True)
        raise typer.Exit(2) from None


class Bar:
    """A tqdm progress bar on stderr whose total is set once known (disabled when quiet)."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc = desc
        self.quiet = quiet
        self.bar: Any = None

    def total(self, n: int) -> None:
        self.close()
        self.bar = tqdm(total=n, desc=self.desc, unit="img", disable=self.quiet, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def emit(self, line: str) -> None:
        """Print a line on stdout (above the bar while it is shown)."""
        if self.bar is not None and not self.quiet:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            typer.echo(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def with_bar(desc: str, quiet: bool, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a workflow step that reports ``total`` then ``progress``, with a bar on stderr."""
    bar = Bar(desc, quiet)
    with errors():
        try:
            return step(*args, progress=bar.update, total=bar.total, **kwargs)
        finally:
            bar.close()


def _fraction(name: str, *, allow_one: bool = True) -> Callable[[float | None], float | None]:
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        try:
            return check_fraction(name, value, allow_one=allow_one)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


def fraction_option(name: str, help: str, *, allow_one: bool = True) -> Any:
    """A ``typer.Option`` for a share in (0, 1] (or (0, 1)), checked on parsing."""
    return typer.Option(name, help=help, callback=_fraction(name, allow_one=allow_one))


def optional(help: str, *flags: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` whose default (None: not given) is not shown."""
    return typer.Option(*flags, help=help, show_default=False, **kwargs)


def folder_option(flag: str, help: str) -> Any:
    """An option naming a folder to write into (none by default)."""
    return optional(help, flag, file_okay=False)


def paths_argument(metavar: str, help: str) -> Any:
    """The argument of a command's inputs (one or more)."""
    return typer.Argument(metavar=metavar, help=help, show_default=False)


def model_device(value: str) -> str | None:
    """``--device`` for loading a model: ``auto`` = where it was saved for (None)."""
    return None if value == "auto" else value


DataArg = Annotated[
    str,
    typer.Argument(
        metavar="DATA",
        help=(
            "Data set folder (DATA/train/good, DATA/test/<label>, DATA/ground_truth/<label>) "
            "or elpv[:mono|poly|all] for the ELPV solar cells, or visa:ROOT:OBJECT for one "
            "object of the VisA data set as downloaded (e.g. visa:VisA:pcb4)."
        ),
        show_default=False,
    ),
]
ModelArg = Annotated[
    Path, typer.Argument(metavar="MODEL", help="Model file written by `patchcore fit`.")
]
InputsArg = Annotated[
    list[Path], paths_argument("IMAGE_OR_FOLDER...", "Image files and folders of images.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DeviceOpt = Annotated[
    str, typer.Option(help="Where to compute: auto (GPU if available), cpu, cuda.")
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-R", help="Also look in sub-folders.")]
FormatOpt = Annotated[
    Format,  # type: ignore[valid-type]
    typer.Option("--format", "-f", help="table (aligned text), json (one object per line), csv."),
]
FailFastOpt = Annotated[
    bool,
    typer.Option(
        "--fail-fast",
        help="Stop at the first image that cannot be read or scored (its error row is "
        "printed, exit code 2) instead of reporting it and going on.",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an existing output that patchcore did not write (a folder: write into "
        "it, keeping its other files).",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Stop with an error when DATA holds images the model was fitted on (found by "
        "content: copies, links, other folders), instead of leaving them out with a warning.",
    ),
]


def echo_warnings(warnings: list[str]) -> None:
    """Each warning as one ``patchcore: warning:`` line on stderr (as the library's)."""
    for w in warnings:
        typer.secho(f"patchcore: warning: {one_line(w)}", err=True, fg=typer.colors.YELLOW)
