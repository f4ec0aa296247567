"""The threshold history (#21, finding 2): every threshold installed is recorded in the model
(UTC time, method, value, the threshold it replaced, calibration set facts, data and split
seed, warnings), a re-calibration says what it replaced, ``patchcore info`` and the report show
the history, and a model file written before the history existed loads fine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as run
from conftest import textured
from PIL import Image

from patchcore.apps import workflow
from patchcore.apps.review.thresholds import MANUAL, record_threshold
from patchcore.core.detector import PatchCore


@pytest.fixture(scope="module")
def fitted(toy_images) -> PatchCore:
    train, _, _ = toy_images
    return PatchCore(image_size=96, coreset_ratio=0.25, progress=False, num_neighbors=3).fit(train)


@pytest.fixture
def det(fitted: PatchCore) -> PatchCore:
    return copy.deepcopy(fitted)


def test_every_threshold_installed_appends_one_entry(det: PatchCore, toy_images) -> None:
    _, good, bad = toy_images
    assert det.threshold_history_ == []
    det.calibrate(good + bad, [0] * 4 + [1] * 4, context={"data": "toy", "seed": 3})
    first = det.threshold_history_[-1]
    assert len(det.threshold_history_) == 1
    assert first["method"] == "max_f1" and first["value"] == det.threshold_
    assert (first["images"], first["normal"], first["anomalous"]) == (8, 4, 4)
    assert first["data"] == "toy" and first["seed"] == 3 and first["warnings"] == []
    assert first["time"].endswith("+00:00")  # UTC
    assert first["replaced"]["value"] is None  # the fit's own (none) threshold

    det.set_threshold(123.0, method="manual")
    second = det.threshold_history_[-1]
    assert len(det.threshold_history_) == 2 and second["value"] == 123.0
    assert second["replaced"] == {
        "value": first["value"],
        "method": "max_f1",
        "time": first["time"],
    }

    det.calibrate_normal(good * 5, max_fpr=0.25, context={"warnings": ["a warning"]})
    third = det.threshold_history_[-1]
    assert third["method"] == "conformal" and third["normal"] == 20 and third["anomalous"] == 0
    assert third["warnings"] == ["a warning"] and third["replaced"]["value"] == 123.0

    det.clear_threshold()  # no threshold: nothing to record
    assert len(det.threshold_history_) == 3


def test_history_survives_a_real_reload(det: PatchCore, toy_images, tmp_path: Path) -> None:
    _, good, bad = toy_images
    det.calibrate(good + bad, [0] * 4 + [1] * 4, context={"seed": np.int64(2)})
    det.set_threshold(7.5, method="manual")
    det.save(tmp_path / "m.pt")
    back = PatchCore.load(tmp_path / "m.pt")
    assert back.threshold_history_ == det.threshold_history_
    assert (
        back.threshold_history_[0]["seed"] == 2 and type(back.threshold_history_[0]["seed"]) is int
    )


def test_a_model_file_without_history_loads(det: PatchCore, tmp_path: Path) -> None:
    """A file written before the history existed: no ``threshold_history`` key at all."""
    det.state_.threshold, det.state_.threshold_method = 4.0, "max_f1"  # as an older writer
    det.save(tmp_path / "old.pt")
    back = PatchCore.load(tmp_path / "old.pt")
    assert back.threshold_history_ == [] and back.threshold_ == 4.0
    rebuilt = workflow.threshold_history(back)  # info and the report: one entry, no time
    assert len(rebuilt) == 1 and rebuilt[0]["value"] == 4.0 and rebuilt[0]["time"] is None
    back.set_threshold(5.0)
    assert back.threshold_history_[-1]["replaced"]["value"] == 4.0


def test_the_review_records_through_the_core(det: PatchCore, toy_images) -> None:
    """The review page's save goes through ``record_threshold``, which records through the
    core's one history (no copy of its own)."""
    _, good, bad = toy_images
    scores = det.score(good + bad).scores
    labels = np.array([0] * 4 + [1] * 4)
    names = [f"x{i}.png" for i in range(8)]
    entry = record_threshold(det, 9.0, MANUAL, data="/d", names=names, labels=labels, scores=scores)
    assert det.threshold_history_ == [entry]
    assert entry["method"] == MANUAL and entry["data"] == "/d" and entry["images"] == 8
    assert entry["source"] == "review" and entry["split"] is False
    assert "review_thresholds" not in det.metadata_


def _write(folder: Path, images: list[np.ndarray], stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{stem}{i}.png")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("toy") / "data"
    _write(root / "train" / "good", [textured(rng) for _ in range(6)], "t")
    _write(root / "test" / "good", [textured(rng) for _ in range(6)], "g")
    _write(root / "test" / "blob", [textured(rng, defect=True) for _ in range(6)], "b")
    _write(root.parent / "normals", [textured(rng) for _ in range(4)], "n")
    return root


def test_cli_calibrate_says_what_it_replaced_and_info_lists_it(toy_data: Path, tmp_path: Path):
    m = tmp_path / "m.pt"
    r = run("fit", toy_data, "--out", m, "--image-size", "96", "-q")
    assert r.exit_code == 0, r.output
    r = run("calibrate", m, toy_data, "-q")
    assert r.exit_code == 0, r.output
    assert "replaced threshold: none" in r.stdout and "replaced the threshold" not in r.stderr
    first = PatchCore.load(m).threshold_history_[-1]

    r = run("calibrate", m, toy_data, "--seed", "1", "-q")
    assert r.exit_code == 0, r.output
    assert f"replaced threshold: {first['value']:.6g} (max_f1, {first['time']}" in r.stdout
    warning = next(ln for ln in r.stderr.splitlines() if "replaced the threshold" in ln)
    assert "split seed 0" in warning and "(split seed 1)" in warning

    r = run("calibrate", m, toy_data.parent / "normals", "--normal-only", "--max-fpr", "0.5")
    assert r.exit_code == 0, r.output
    assert "replaced threshold: " in r.stdout and "split seed 1" in r.stdout

    history = PatchCore.load(m).threshold_history_
    assert [e["method"] for e in history] == ["max_f1", "max_f1", "conformal"]
    assert [e.get("seed") for e in history] == [0, 1, None]
    assert history[1]["replaced"]["value"] == history[0]["value"]
    r = run("info", m)
    assert r.exit_code == 0, r.output
    listed = r.stdout.split("Threshold history")[1].splitlines()
    assert [ln.strip()[:2] for ln in listed[1:4]] == ["1.", "2.", "3."]
    assert "conformal" in listed[3] and "split seed 1" in listed[2]


def test_evaluate_names_the_split_and_the_report_shows_the_history(
    toy_data: Path, tmp_path: Path
) -> None:
    m = tmp_path / "m.pt"
    assert run("fit", toy_data, "--out", m, "--image-size", "96", "-q").exit_code == 0
    assert run("calibrate", m, toy_data, "--seed", "4", "-q").exit_code == 0
    det = PatchCore.load(m)
    det.set_threshold(float(det.threshold_) * 1.01, method="manual")  # after the split
    det.save(m)
    r = run("evaluate", m, toy_data, "--report", tmp_path / "rep", "-q")
    assert r.exit_code == 0, r.output
    assert "scored: the held-out split of the calibration" in r.stdout
    assert "split seed 4" in r.stdout and "the threshold in use came after it" in r.stdout
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    table = page.split('id="history"')[1].split("</section>")[0]
    assert table.count("<tr") == 3 and "manual" in table and "max_f1" in table


def test_calibrate_warnings_are_recorded_and_the_report_repeats_them(tmp_path: Path) -> None:
    """Labels swapped (the "defects" are plain textures, the "good" images carry blobs): the
    calibration AUROC is near 0, calibrate warns, the warning is stored with the threshold,
    and ``info`` and the evaluation report repeat it."""
    rng = np.random.default_rng(5)
    root = tmp_path / "swapped"
    _write(root / "train" / "good", [textured(rng) for _ in range(6)], "t")
    _write(root / "test" / "good", [textured(rng, defect=True) for _ in range(6)], "g")
    _write(root / "test" / "plain", [textured(rng) for _ in range(6)], "p")
    m = tmp_path / "m.pt"
    assert run("fit", root, "--out", m, "--image-size", "96", "-q").exit_code == 0
    r = run("calibrate", m, root, "-q")
    assert r.exit_code == 0, r.output
    assert "patchcore: warning: calibration AUROC is 0.00" in r.stderr
    stored = PatchCore.load(m).threshold_history_[-1]["warnings"]
    assert any(w.startswith("calibration AUROC is 0.00") for w in stored)
    assert "warning: calibration AUROC is 0.00" in run("info", m).stdout
    r = run("evaluate", m, root, "--report", tmp_path / "rep", "-q")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "calibration AUROC is 0.00" in page.split('id="warnings"')[1].split("</section>")[0]
