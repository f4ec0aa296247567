"""``patchcore fit --preset auto`` end to end on a few real images (candidates made small)."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import pytest
from conftest import data_set, link_first
from conftest import run_cli as run

from patchcore.core import autoselect
from patchcore.core.autoselect import AutoCandidate
from patchcore.core.detector import PatchCore

pytestmark = pytest.mark.slow

SMALL = (
    AutoCandidate("small lite0", MappingProxyType({"image_size": 96}), 1.0, "test"),
    AutoCandidate(
        "small lite1",
        MappingProxyType({"image_size": 96, "backbone": "efficientnet-lite1"}),
        1.2,
        "test",
    ),
    AutoCandidate("huge", MappingProxyType({"image_size": 96}), 1e6, "never fits the budget"),
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """casting subset: 6 train, 8 normal + 8 defective test images."""
    src = data_set("casting")
    root = tmp_path_factory.mktemp("data") / "casting"
    link_first(src / "train" / "good", root / "train" / "good", 6)
    link_first(src / "test" / "good", root / "test" / "good", 8)
    link_first(src / "test" / "defective", root / "test" / "defective", 8)
    return root


@pytest.fixture(scope="module")
def auto_model(tiny: Path, tmp_path_factory):
    model = tmp_path_factory.mktemp("model") / "auto.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autoselect, "CANDIDATES", SMALL)
        r = run("fit", tiny, "--preset", "auto", "--budget", "30", "--out", model, "-q")
    assert r.exit_code == 0, r.output
    return model, r.stdout


def test_auto_lists_every_candidate_and_keeps_the_best_on_the_calibration_half(auto_model):
    model, out = auto_model
    det = PatchCore.load(model)
    record = det.metadata_["auto_preset"]
    rows = {c["name"]: c for c in record["candidates"]}
    assert list(rows) == ["small lite0", "small lite1", "huge"]
    assert rows["huge"]["status"].startswith("skipped") and "huge" in out
    fitted = {n: c["calibration_auroc"] for n, c in rows.items() if n != "huge"}
    assert record["chosen"] == max(fitted, key=lambda n: (fitted[n], n == "small lite0"))
    assert det.backbone == rows[record["chosen"]]["params"].get("backbone", "efficientnet-lite0")
    for name, area in fitted.items():
        assert f"{area:.4f}" in out and name in out
    assert "Next: patchcore evaluate" in out


def test_auto_chooses_and_calibrates_on_one_half_and_evaluate_scores_the_other(
    auto_model, tiny: Path, tmp_path: Path
):
    model, _ = auto_model
    md = PatchCore.load(model).metadata_
    calib, test = set(md["calibration_names"]), set(md["test_names"])
    assert len(calib) == 8 and len(test) == 8 and not calib & test
    assert md["auto_preset"]["calibration_images"] == len(calib)
    report = tmp_path / "report"
    r = run("evaluate", model, tiny, "--report", report, "-q")
    assert r.exit_code == 0, r.output
    payload = json.loads((report / "metrics.json").read_text())
    assert sorted(payload["scored_names"]) == sorted(test)
    # the report's model card shows the choice
    html = next(report.glob("*.html")).read_text()
    assert "auto preset" in html and md["auto_preset"]["chosen"] in html


def test_auto_refuses_what_it_chooses_itself_and_budget_needs_auto(tiny: Path, tmp_path: Path):
    r = run(
        "fit", tiny, "--preset", "auto", "--backbone", "efficientnet-lite1", "-o", tmp_path / "m.pt"
    )
    assert r.exit_code == 2 and "chooses backbone itself" in r.output
    r = run("fit", tiny, "--budget", "5", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--budget goes with --preset auto" in r.output
