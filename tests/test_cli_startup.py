"""The command line starts without torch: ``import patchcore.apps.cli`` and every command's
help load neither torch nor the estimator; the options still come from PatchCore's signature,
and the torch-free names the help lists are those of the registries that check them."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

SRC = Path(__file__).resolve().parents[1] / "src"

PROBE = r"""
import json, sys
HEAVY = ("torch", "torchvision", "patchcore.core.detector")
import patchcore.apps.cli as cli
after_import = sorted(m for m in HEAVY if m in sys.modules)
from typer.testing import CliRunner
runner = CliRunner()
helps = {}
for args in (["--help"], ["fit", "--help"], ["demo", "--help"], ["predict", "--help"],
             ["export", "--help"], ["info", "--help"]):
    r = runner.invoke(cli.app, args)
    helps[" ".join(args)] = [r.exit_code, r.output]
after_help = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps({"after_import": after_import, "after_help": after_help, "helps": helps}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_torch(probe: dict) -> None:
    assert probe["after_import"] == []


def test_every_help_loads_no_torch_and_fit_lists_the_estimator_options(probe: dict) -> None:
    assert probe["after_help"] == []
    for args, (code, _) in probe["helps"].items():
        assert code == 0, args
    fit_help = " ".join(probe["helps"]["fit --help"][1].split())  # unwrapped
    from patchcore.core.params import PatchCoreParams

    for name in inspect.signature(PatchCoreParams.__init__).parameters:
        if name not in ("self", "progress", "layers"):
            assert "--" + name.replace("_", "-") in fit_help, name
    assert "--layer" in fit_help and "efficientnet-lite0 (offline)" in fit_help
    assert "mono" in probe["helps"]["demo --help"][1]


def test_patchcore_takes_its_signature_from_the_torch_free_params() -> None:
    from patchcore.core.detector import PatchCore
    from patchcore.core.params import PatchCoreParams

    assert PatchCore.__init__ is PatchCoreParams.__init__
    assert PatchCore(top_k=3, seed=2).get_params()["top_k"] == 3
    assert repr(PatchCore(seed=2)) == "PatchCore(seed=2)"


def test_torch_free_names_are_the_registries_keys() -> None:
    from patchcore.core import backbones, embedding, params, search, validation

    assert tuple(backbones.BACKBONES) == params.BACKBONE_NAMES
    assert tuple(backbones.BACKBONE_DTYPES) == params.BACKBONE_DTYPE_NAMES
    assert tuple(embedding.FEATURE_DTYPES) == params.FEATURE_DTYPE_NAMES
    assert search.PRECISIONS is params.PRECISIONS
    assert validation.SAMPLINGS is params.SAMPLINGS
    assert set(params.OFFLINE_BACKBONES) <= set(backbones.BACKBONES)


def test_literal_defaults_equal_the_imported_signature() -> None:
    from patchcore.apps.cli.options import literal_defaults
    from patchcore.apps.workflow.demo import run_demo

    expected = {
        k: p.default
        for k, p in inspect.signature(run_demo).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert literal_defaults("patchcore.apps.workflow.demo", "run_demo") == expected
    with pytest.raises(StopIteration):
        literal_defaults("patchcore.apps.workflow.demo", "no_such_function")


def test_lazy_workflow_names_resolve() -> None:
    from patchcore.apps import workflow

    for name in workflow.__all__:
        assert getattr(workflow, name) is not None, name
    assert set(workflow.__all__) <= set(dir(workflow))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = workflow.nope


@pytest.mark.parametrize(
    ("exc", "code"),
    [("NotFittedError", 2), ("BackboneWeightsError", 2), ("WorkflowError", 2), ("other", 1)],
)
def test_errors_map_loaded_exception_classes_to_exit_codes(exc: str, code: int) -> None:
    from patchcore.apps.cli import base
    from patchcore.apps.workflow import WorkflowError
    from patchcore.core.backbones import BackboneWeightsError
    from patchcore.core.state import NotFittedError

    classes = {
        "NotFittedError": NotFittedError,
        "BackboneWeightsError": BackboneWeightsError,
        "WorkflowError": WorkflowError,
        "other": RuntimeError,
    }
    with pytest.raises(typer.Exit) as info, base.errors():
        raise classes[exc]("boom")
    assert info.value.exit_code == code


def test_literal_value_equals_the_imported_constant() -> None:
    from patchcore.apps.cli.options import literal_value
    from patchcore.apps.workflow.predict import HEATMAP_LAYOUTS

    assert literal_value("patchcore.apps.workflow.predict", "HEATMAP_LAYOUTS") == HEATMAP_LAYOUTS
    with pytest.raises(LookupError, match="no literal NOPE"):
        literal_value("patchcore.apps.workflow.predict", "NOPE")
