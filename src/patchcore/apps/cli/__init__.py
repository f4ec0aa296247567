"""The ``patchcore`` command line: one module per command (or group), all registered on the
one Typer :data:`app` (the console entry point ``patchcore.apps.cli:app``).

- :mod:`.base`: the app, the :func:`~.base.command` decorator, error handling and exit codes,
  progress bars and the option types the commands share.
- :mod:`.options`: options derived from an estimator's signature and docstring (``fit``'s).
- one module per command: :mod:`.fit`, :mod:`.calibrate` (``calibrate``,
  ``calibrate-regions``), :mod:`.evaluate`, :mod:`.predict`, :mod:`.batch`, :mod:`.update`,
  :mod:`.explain`, :mod:`.demo`, :mod:`.serve`, :mod:`.review`, :mod:`.info`, :mod:`.export`.

The commands parse their arguments, call one function of :mod:`patchcore.apps.workflow` and
print what it returns; no algorithm lives here. To add a command: a new module whose function
is decorated with ``@command()`` (from :mod:`.base`), imported below (the import order is the
order of ``patchcore --help``).
"""

from __future__ import annotations

# isort: off
from patchcore.apps.cli import (  # noqa: F401 - each import registers its command(s)
    fit,
    calibrate,
    evaluate,
    predict,
    batch,
    update,
    explain,
    demo,
    serve,
    review,
    info,
    export,
)

# isort: on
from patchcore.apps.cli.base import app
from patchcore.apps.cli.evaluate import METRIC_COLUMNS

__all__ = ["METRIC_COLUMNS", "app", "main"]


def main() -> None:  # pragma: no cover - console entry point alias
    app()
