"""``python -m patchcore.apps.cli``: the ``patchcore`` command."""

from patchcore.apps.cli import app

app(prog_name="patchcore")
