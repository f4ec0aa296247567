"""``patchcore calibrate --normal-only``: a threshold from held-out normal images alone.

A small magnetic_tile set (symbolic links, nothing copied): 30 normal training images of which
the model is fitted on a fifth, so 24 remain for calibration, plus a few labelled test images.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import data_set, link, link_first
from conftest import run_cli as run

from patchcore.core.detector import PatchCore
from patchcore.lean.normalization import fit_normalization

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    src = data_set("magnetic_tile")
    root = tmp_path_factory.mktemp("data") / "tiles"
    link_first(src / "train" / "good", root / "train" / "good", 30)
    link_first(src / "test" / "good", root / "test" / "good", 3)
    link_first(src / "test" / "crack", root / "test" / "crack", 3)
    return root


@pytest.fixture(scope="module")
def model(tiles: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "model.pt"
    r = run("fit", tiles, "--out", out, "--image-size", "64", "--train-fraction", "0.2", "-q")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def calibrated(model: Path, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("cal") / "model.pt"
    path.write_bytes(model.read_bytes())
    r = run("calibrate", path, _data(model), "--normal-only", "--max-fpr", "0.05", "-q")
    assert r.exit_code == 0, r.output
    return path, r.stdout


def _data(model: Path) -> str:
    return PatchCore.load(model).metadata_["fit_data"]


def test_normal_only_uses_the_unfitted_normals_and_records_the_guarantee(calibrated, tiles):
    path, out = calibrated
    det = PatchCore.load(path)
    md, c = det.metadata_, det.calibration_
    train = set(md["train_names"])
    assert len(train) == 6 and not train & set(md["calibration_names"])
    assert len(md["calibration_names"]) == 24 and all(
        n.startswith("train/good/") for n in md["calibration_names"]
    )
    assert sorted(md["test_names"]) == sorted(
        f"test/{d}/{p.name}" for d in ("good", "crack") for p in (tiles / "test" / d).iterdir()
    )
    assert det.threshold_method_ == "conformal" and md["calibration_method"] == "conformal"
    assert (c["n"], c["rank"], c["max_fpr"]) == (24, math.ceil(25 * 0.95), 0.05)
    # the threshold is just above the 24th smallest (= largest) of the 24 normal scores
    scores = det.score([tiles / n for n in md["calibration_names"]]).scores
    assert det.threshold_ == np.nextafter(scores.max(), np.inf)
    assert det.normalization_ == fit_normalization(scores, det.threshold_)
    assert "conformal, false-alarm rate <= 0.05" in out and "24 held-out normal images" in out
    assert "needs >= 19 normal images (6 fitting images left out)" in out
    assert "held out for evaluate: 6 labelled images" in out


def test_too_few_normals_name_the_number_the_rate_needs(model: Path, tmp_path: Path):
    r = run("calibrate", model, _data(model), "--normal-only", "--max-fpr", "0.01", "-q")
    assert r.exit_code != 0
    assert "needs at least 99 normal images not used for fitting" in r.stderr
    assert "it has 24 (6 more were fitted on)" in r.stderr and "Traceback" not in r.output
    r = run("calibrate", model, _data(model), "--normal-only", "-q")
    assert r.exit_code != 0 and "--normal-only needs --max-fpr" in r.stderr


def test_a_copy_of_a_fitting_image_in_another_folder_is_left_out(model: Path, tmp_path: Path):
    det = PatchCore.load(model)
    root = Path(det.metadata_["fit_data"])
    fitted_on = root / det.metadata_["train_names"][0]
    other = tmp_path / "more_normals"
    used = set(det.metadata_["train_names"])
    rest = [
        p for p in sorted((root / "train" / "good").iterdir()) if f"train/good/{p.name}" not in used
    ]
    for p in rest[:19]:
        link(p.resolve(), other / p.name)
    (other / "renamed.png").write_bytes(fitted_on.read_bytes())  # same bytes, another name
    path = tmp_path / "m.pt"
    path.write_bytes(model.read_bytes())
    r = run("calibrate", path, other, "--normal-only", "--max-fpr", "0.05", "-q")
    assert r.exit_code == 0, r.output
    assert "19 held-out normal images" in r.stdout and "(1 fitting images left out)" in r.stdout
    assert "renamed.png" not in PatchCore.load(path).metadata_["calibration_names"]
    assert "no labelled test images held out" in r.stdout


def test_predict_info_and_evaluate_show_the_normalised_score(calibrated, tiles, tmp_path):
    path, _ = calibrated
    r = run("predict", path, tiles / "test", "-R", "--format", "csv", "-q")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 6
    for row in rows:
        z = float(row["normalized_score"])
        assert 0.0 <= z <= 1.0 and (z >= 0.5) == (row["verdict"] == "anomalous")
    r = run("predict", path, tiles / "test" / "crack", "-q")
    assert r.exit_code == 0 and "normalized" in r.stdout.splitlines()[0]
    r = run("info", path)
    assert r.exit_code == 0, r.output
    assert "normalised score" in r.stdout and "threshold 0.5" not in r.stdout
    assert "-> 0.5" in r.stdout and "not a probability" in r.stdout
    assert "conformal, false-alarm rate <= 0.05" in r.stdout and "rank 24 of 24" in r.stdout
    r = run("evaluate", path, _data(path), "--json", "--report", tmp_path / "rep", "-q")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["threshold_method"] == "conformal"
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Threshold from 24 normal images alone (split conformal" in html
    assert "measured here on 3 held-out normal test images" in html
    assert "Normalised score" in html and "not a probability" in html
