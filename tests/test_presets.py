"""Presets: named PatchCore keyword arguments (``PatchCore.from_preset``, ``fit --preset``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import SIZE, run, tiny  # noqa: F401 - the module fixture is used by name

from patchcore import PatchCore
from patchcore.core.backbones import get_spec
from patchcore.core.presets import PRESETS, preset_params
from patchcore.core.validation import validate_params


def test_accurate_is_the_default_and_the_others_differ():
    assert list(PRESETS) == ["fast", "balanced", "accurate"]
    assert PatchCore.from_preset("accurate").get_params() == PatchCore().get_params()
    assert PatchCore.from_preset("balanced").backbone == "efficientnet-lite0"  # the old default
    for name in ("fast", "balanced"):
        assert PatchCore.from_preset(name).get_params() != PatchCore().get_params(), name


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_only_fills_valid_constructor_arguments(name: str):
    params = preset_params(name)
    det = PatchCore.from_preset(name)
    validate_params(det)  # raises on a bad value
    got = det.get_params()
    assert {k: got[k] for k in params} == params
    assert PRESETS[name].summary.strip()


def test_overrides_win_and_the_preset_dict_is_not_shared():
    last = list(PRESETS)[-1]
    det = PatchCore.from_preset(last, seed=3, kernel_size=7)
    assert det.seed == 3 and det.kernel_size == 7
    p = preset_params(last)
    p["seed"] = 99
    assert preset_params(last).get("seed") != 99
    assert PatchCore.from_preset(last).seed == 0


def test_an_input_size_given_replaces_the_presets_size_choice():
    assert preset_params("fast")["scale"] == 0.5
    det = PatchCore.from_preset("fast", image_size=96)
    assert det.image_size == 96 and det.scale is None and det.top_k == 10
    validate_params(det)  # not "give image_size or scale, not both"
    assert PatchCore.from_preset("fast", scale=0.25).scale == 0.25


def test_unknown_preset_and_unknown_override_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown preset 'precise'; choose one of fast"):
        PatchCore.from_preset("precise")
    with pytest.raises(TypeError, match="colour"):
        PatchCore.from_preset("fast", colour="red")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_cli_fit_with_a_preset_saves_its_parameters(name: str, tiny: Path, tmp_path):  # noqa: F811
    model = tmp_path / "m.pt"
    r = run("fit", tiny, "--out", model, "--preset", name, "--image-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    got = PatchCore.load(model).get_params()
    want = PatchCore.from_preset(name, image_size=int(SIZE)).get_params()
    for key in ("backbone", "kernel_size", "scale", "image_size", "coreset_ratio", "top_k"):
        assert got[key] == want[key], key
    layers = want["layers"] or get_spec(want["backbone"]).default_layers
    assert list(got["layers"]) == list(layers)


@pytest.mark.slow
def test_cli_options_given_explicitly_override_the_preset(tiny: Path, tmp_path):  # noqa: F811
    model = tmp_path / "m.pt"
    args = ("--preset", list(PRESETS)[-1], "--backbone", "efficientnet-lite0")
    args += ("--layer", "stage3", "--layer", "stage4", "--image-size", SIZE, "-q")
    r = run("fit", tiny, "--out", model, *args)
    assert r.exit_code == 0, r.output
    got = PatchCore.load(model).get_params()
    assert got["backbone"] == "efficientnet-lite0"
    assert list(got["layers"]) == ["stage3", "stage4"]
    r = run("fit", tiny, "--out", model, "--preset", "nope")
    assert r.exit_code == 2 and "nope" in r.output
