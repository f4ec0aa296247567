"""The leakage guard (#21, finding 1): images a model was fitted on never calibrate or evaluate
it. A folder whose ``good/`` holds the model's own training images (under other names) used to
calibrate to F1 1.0 and FPR 0.0 without a word; now they are left out with a warning that
gives the count and the first names, ``--strict`` makes it an error, and the same holds for
``evaluate``, ``calibrate-regions`` and images added later by ``update``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import data_set, link, link_first
from conftest import run_cli as run

from patchcore.core.detector import PatchCore

SIZE = "96"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """magnetic_tile subset with masks: 8 train, 6 normal + 6 defective test images."""
    src = data_set("magnetic_tile")
    root = tmp_path_factory.mktemp("data") / "tiles"
    link_first(src / "train" / "good", root / "train" / "good", 8)
    link_first(src / "test" / "good", root / "test" / "good", 6)
    for f in link_first(src / "test" / "crack", root / "test" / "crack", 6):
        mask = src / "ground_truth" / "crack" / f"{f.stem}_mask.png"
        link(mask, root / "ground_truth" / "crack" / mask.name)
    return root


@pytest.fixture(scope="module")
def model(tiles: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.pt"
    r = run("fit", tiles, "--out", path, "--image-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    return path


@pytest.fixture(scope="module")
def leaky(tiles: Path, tmp_path_factory) -> Path:
    """A flat folder: good/ = the 8 training images under new names + 2 normal test images,
    crack/ = the 6 defective images (with masks)."""
    root = tmp_path_factory.mktemp("leaky") / "flat"
    for f in sorted((tiles / "train" / "good").iterdir()):
        link(f.resolve(), root / "good" / f"copy_{f.name}")
    for f in sorted((tiles / "test" / "good").iterdir())[:2]:
        link(f.resolve(), root / "good" / f.name)
    for f in sorted((tiles / "test" / "crack").iterdir()):
        link(f.resolve(), root / "crack" / f.name)
        mask = tiles / "ground_truth" / "crack" / f"{f.stem}_mask.png"
        link(mask.resolve(), root / "ground_truth" / "crack" / mask.name)
    return root


def _copy(model: Path, to: Path) -> Path:
    to.write_bytes(model.read_bytes())
    return to


def test_calibrate_leaves_out_training_images_with_a_warning(
    model: Path, leaky: Path, tmp_path: Path
) -> None:
    m = _copy(model, tmp_path / "m.pt")
    r = run("calibrate", m, leaky, "-q")
    assert r.exit_code == 0, r.output
    warning = next(ln for ln in r.stderr.splitlines() if "fitted on" in ln)
    assert warning.startswith("patchcore: warning: 8 of the 16 labelled images")
    assert "good/copy_" in warning and "left out" in warning
    assert "left out: 8 images the model was fitted on" in r.stdout
    det = PatchCore.load(m)
    used = set(det.metadata_["calibration_names"]) | set(det.metadata_["test_names"])
    assert used and not any("copy_" in n for n in used)


def test_strict_makes_leakage_an_error(model: Path, leaky: Path, tmp_path: Path) -> None:
    m = _copy(model, tmp_path / "m.pt")
    before = m.read_bytes()
    r = run("calibrate", m, leaky, "--strict", "-q")
    assert r.exit_code == 2
    assert "8 of the 16 labelled images" in r.stderr and "--strict" in r.stderr
    assert m.read_bytes() == before  # nothing written
    r = run("calibrate", m, leaky, "--normal-only", "--max-fpr", "0.5", "--strict", "-q")
    assert r.exit_code == 2 and "--strict" in r.stderr


def test_the_fit_data_itself_is_left_out_quietly(model: Path, tiles: Path, tmp_path: Path):
    """Calibrating on the data the model was fitted on is the normal case: its training split
    is not in the labelled images, and nothing is said."""
    m = _copy(model, tmp_path / "m.pt")
    r = run("calibrate", m, tiles, "-q")
    assert r.exit_code == 0, r.output
    assert "fitted on" not in r.stderr and "left out:" not in r.stdout


def test_evaluate_and_calibrate_regions_leave_out_training_images(
    model: Path, leaky: Path, tiles: Path, tmp_path: Path
) -> None:
    """A model calibrated on clean data, then updated with two of its held-out test images:
    evaluate and calibrate-regions leave them out and say so (the report too)."""
    m = _copy(model, tmp_path / "m.pt")
    r = run("calibrate", m, tiles, "--seed", "1", "-q")
    assert r.exit_code == 0, r.output
    det = PatchCore.load(m)
    held = [n for n in det.metadata_["test_names"] if n.startswith("test/good/")][:1]
    held += [n for n in det.metadata_["calibration_names"] if n.startswith("test/good/")][:1]
    copies = []
    for n in held:  # the same images under other names, elsewhere
        copies.append(tmp_path / "new" / f"added_{Path(n).name}")
        link((tiles / n).resolve(), copies[-1])
    r = run("update", m, *copies, "-q")
    assert r.exit_code == 0, r.output
    r = run("evaluate", m, tiles, "--report", tmp_path / "rep", "-q", "--json")
    assert r.exit_code == 0, r.output
    assert f"1 of the {len(det.metadata_['test_names'])} held-out test images" in r.stderr
    assert held[0] in r.stderr
    scored = json.loads(r.stdout)["scored_names"]
    assert held[0] not in scored and len(scored) == len(det.metadata_["test_names"]) - 1
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert held[0] in page.split('id="warnings"')[1].split("</section>")[0]
    r = run("evaluate", m, tiles, "--strict", "-q")
    assert r.exit_code == 2 and "--strict" in r.stderr
    r = run("calibrate-regions", m, tiles, "-q")
    assert r.exit_code == 0, r.output
    assert "calibration images" in r.stderr and held[1] in r.stderr
