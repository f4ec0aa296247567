"""End-to-end tests of the ``patchcore`` command line on a few real images.

A tiny data set is assembled (symbolic links, nothing copied into the repository) from
``../shared/data/magnetic_tile``, which has pixel masks, and every command is run through
typer's ``CliRunner`` at 96 x 96 pixels so the whole file takes seconds.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_set, link, link_first
from conftest import run_cli as run
from PIL import Image

from patchcore.apps.cli import METRIC_COLUMNS
from patchcore.core.detector import FORMAT_NAME, PatchCore

SIZE = "96"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """magnetic_tile subset: 6 train, 6 normal + 4 crack + 4 blowhole test images, masks."""
    src = data_set("magnetic_tile")
    root = tmp_path_factory.mktemp("data") / "tiles"
    link_first(src / "train" / "good", root / "train" / "good", 6)
    link_first(src / "test" / "good", root / "test" / "good", 6)
    for defect in ("crack", "blowhole"):
        for f in link_first(src / "test" / defect, root / "test" / defect, 4):
            mask = src / "ground_truth" / defect / f"{f.stem}_mask.png"
            link(mask, root / "ground_truth" / defect / mask.name)
    return root


@pytest.fixture(scope="module")
def fitted(tiny: Path, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("model") / "model.pt"
    r = run("fit", tiny, "--out", model, "--image-size", SIZE, "-q")  # all images by default
    assert r.exit_code == 0, r.output
    assert "memory bank" in r.stdout and "training images: 6 of 6 (all of them;" in r.stdout
    return model


@pytest.fixture(scope="module")
def calibrated(fitted: Path, tiny: Path, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("calibrated") / "model.pt"
    model.write_bytes(fitted.read_bytes())
    r = run("calibrate", model, tiny, "--seed", "1", "-q")
    assert r.exit_code == 0, r.output
    assert "Threshold" in r.stdout and "held out for evaluate: 7" in r.stdout
    return model


@pytest.fixture(scope="module")
def evaluated(calibrated: Path, tiny: Path, tmp_path_factory):
    report = tmp_path_factory.mktemp("report")
    r = run("evaluate", calibrated, tiny, "--report", report, "-q")
    assert r.exit_code == 0, r.output
    return r, report


# ------------------------------------------------------------------------------ fit / calibrate


def test_fit_writes_a_loadable_model_with_its_training_names(fitted: Path) -> None:
    det = PatchCore.load(fitted)
    assert det.threshold_ is None
    assert det.n_train_images_ == 6
    assert len(det.metadata_["train_names"]) == 6
    assert all(n.startswith("train/good/") for n in det.metadata_["train_names"])


def test_calibrate_stores_a_disjoint_stratified_split(calibrated: Path, tiny: Path) -> None:
    det = PatchCore.load(calibrated)
    md = det.metadata_
    calib, test = set(md["calibration_names"]), set(md["test_names"])
    assert calib.isdisjoint(test)
    everything = {p.relative_to(tiny).as_posix() for p in (tiny / "test").rglob("*.*")}
    assert calib | test == everything
    for part in (calib, test):  # every label on both sides
        assert {n.split("/")[1] for n in part} == {"good", "crack", "blowhole"}
    lo, hi = md["display_range"]
    assert lo < hi
    assert np.isfinite(det.threshold_) and det.threshold_method_ == "max_f1"
    assert md["calibration_data"] == str(tiny.resolve())


def test_calibrate_is_seeded(fitted: Path, tiny: Path, tmp_path: Path) -> None:
    names = []
    for i in range(2):
        model = tmp_path / f"m{i}.pt"
        model.write_bytes(fitted.read_bytes())
        assert run("calibrate", model, tiny, "--seed", "1", "-q").exit_code == 0
        names.append(PatchCore.load(model).metadata_["calibration_names"])
    assert names[0] == names[1]


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_prints_the_reference_metrics_table(evaluated) -> None:
    r, _ = evaluated
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["GlobalAccuracy"])
    assert lines[header].split() == list(METRIC_COLUMNS)
    values = [float(v) for v in lines[header + 1].split()]
    assert len(values) == 8 and all(0.0 <= v <= 1.0 for v in values)
    assert "Confusion matrix" in r.stdout
    assert "Recall per defect type" in r.stdout and "crack" in r.stdout
    assert "Pixel AUROC" in r.stdout  # the tiles have masks


def test_evaluate_scores_exactly_the_held_out_images(evaluated, calibrated: Path) -> None:
    _, report = evaluated
    md = PatchCore.load(calibrated).metadata_
    payload = json.loads((report / "metrics.json").read_text())
    scored = payload["scored_names"]
    assert sorted(scored) == sorted(md["test_names"])
    assert set(scored).isdisjoint(md["calibration_names"])
    m = payload["metrics"]
    assert m["NumSamples"] == 7 and sum(map(sum, m["ConfusionMatrix"])) == 7
    for key in (*METRIC_COLUMNS, "AUROC", "PixelAUROC", "AUPRO"):
        assert 0.0 <= m[key] <= 1.0, key


def test_evaluate_never_feeds_a_calibration_image_to_the_detector(
    calibrated: Path, tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    seen: list[str] = []
    for name in (
        "iter_score",
        "score",
        "score_samples",
        "score_with_maps",
        "classify",
        "anomaly_maps",
    ):
        original = getattr(PatchCore, name)

        def spy(self, images, *a, _original=original, **kw):
            seen.extend(str(i) for i in images)
            return _original(self, images, *a, **kw)

        monkeypatch.setattr(PatchCore, name, spy)
    r = run("evaluate", calibrated, tiny, "--report", tmp_path / "r", "-q")
    assert r.exit_code == 0, r.output
    md = PatchCore.load(calibrated).metadata_
    root = tiny.resolve()
    seen_names = {Path(p).relative_to(root).as_posix() for p in seen}
    assert seen_names and seen_names <= set(md["test_names"])
    assert seen_names.isdisjoint(md["calibration_names"])


def test_evaluate_scores_each_held_out_image_once(
    calibrated: Path, tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    calls: list[list[str]] = []
    original = PatchCore.iter_score

    def spy(self, images, *a, **kw):
        calls.append([str(i) for i in images])
        return original(self, images, *a, **kw)

    monkeypatch.setattr(PatchCore, "iter_score", spy)
    r = run("evaluate", calibrated, tiny, "--report", tmp_path / "r", "-q")
    assert r.exit_code == 0, r.output
    assert any((tmp_path / "r" / "gallery").iterdir())  # tiles from the same pass
    test_names = PatchCore.load(calibrated).metadata_["test_names"]
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == len(test_names)


def test_report_has_its_sections_and_decodable_pngs(evaluated) -> None:
    _, report = evaluated
    html = (report / "report.html").read_text(encoding="utf-8")
    for section in (
        "Image-level metrics",
        "Confusion matrix",
        "Score distribution",
        "ROC curve",
        "Recall per defect type",
        "Pixel-level localisation",
        "True positives",
        "True negatives",
        "False positives",
        "False negatives",
        "Model card",
    ):
        assert section in html, section
    for metric in METRIC_COLUMNS:
        assert metric in html
    for field in ("backbone", "tapped layers", "memory bank", "threshold method", "fit time"):
        assert field in html, field
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) >= 5  # 4 figures + at least one gallery tile
    assert not any(s.startswith(("http:", "https:", "/")) for s in sources)
    for src in sources:
        with Image.open(report / src) as im:
            im.load()
            assert im.width > 50 and im.height > 50


def test_evaluate_json_output(calibrated: Path, tiny: Path) -> None:
    r = run("evaluate", calibrated, tiny, "--json", "-q")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert set(METRIC_COLUMNS) <= set(payload["metrics"])


# ------------------------------------------------------------------------------ predict


@pytest.fixture()
def folder_with_corrupt_file(tiny: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for f in sorted((tiny / "test" / "crack").iterdir())[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    good = sorted((tiny / "test" / "good").iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a real png")
    truncated = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    return folder


def test_predict_reports_corrupt_files_and_goes_on(
    calibrated: Path, folder_with_corrupt_file: Path, tmp_path: Path
) -> None:
    heat = tmp_path / "heat"
    r = run(
        "predict", calibrated, folder_with_corrupt_file, "--format", "json", "--heatmaps", heat,
        "--heatmap-layout", "overlay",  # the overlay alone, at the image's size
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 5
    by_name = {Path(row["image"]).name: row for row in rows}
    for bad in ("broken.png", "truncated.jpg"):
        assert by_name[bad]["verdict"] == "error" and by_name[bad]["error"]
        assert by_name[bad]["score"] is None
    good = [row for row in rows if row["verdict"] != "error"]
    assert len(good) == 3
    threshold = PatchCore.load(calibrated).threshold_
    for row in good:
        assert row["verdict"] == ("anomalous" if row["score"] >= threshold else "normal")
        with Image.open(row["heatmap"]) as im:
            im.load()
            src = Image.open(row["image"])
            assert im.size == src.size and im.mode == "RGB"
    assert "2 error" in r.stderr


def test_predict_takes_a_threshold_and_reports_a_missing_path_as_a_row(
    fitted: Path, folder_with_corrupt_file: Path, tmp_path: Path
) -> None:
    r = run("predict", fitted, folder_with_corrupt_file, "-q")
    assert r.exit_code == 2 and "threshold not calibrated" in r.stderr  # uncalibrated model
    good = next(
        p
        for p in sorted(folder_with_corrupt_file.iterdir())
        if p.stem not in ("broken", "truncated")
    )
    missing = tmp_path / "gone.png"
    r = run("predict", fitted, missing, good, "--threshold", "0", "--format", "json", "-q")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [Path(row["image"]).name for row in rows] == ["gone.png", good.name]
    assert rows[0]["verdict"] == "error" and "no such file" in rows[0]["error"]
    assert rows[1]["verdict"] == "anomalous" and rows[1]["threshold"] == 0.0  # score >= 0


def test_predict_csv_and_table(calibrated: Path, folder_with_corrupt_file: Path) -> None:
    r = run("predict", calibrated, folder_with_corrupt_file, "--format", "csv", "-q")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 5 and {"image", "verdict", "score"} <= set(rows[0])
    r = run("predict", calibrated, folder_with_corrupt_file / "broken.png", "-q")
    assert r.exit_code == 1  # nothing could be read
    assert "error" in r.stdout


# ------------------------------------------------------------------------------ errors


def _one_clean_line(r) -> str:
    err = r.stderr.strip()
    assert "Traceback" not in r.output
    assert len(err.splitlines()) == 1, err
    return err


def test_fit_missing_folder(tmp_path: Path) -> None:
    r = run("fit", tmp_path / "nope", "--out", tmp_path / "m.pt")
    assert r.exit_code == 2
    assert "no such folder" in _one_clean_line(r)


def test_fit_refuses_an_unwritable_out_before_fitting(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    t = time.perf_counter()
    r = run("fit", tiny, "--out", tmp_path / "a_file" / "m.pt", "--image-size", SIZE)
    assert r.exit_code != 0 and "cannot write there" in _one_clean_line(r)
    assert "memory bank" not in r.stdout and time.perf_counter() - t < 5  # before fitting
    r = run("fit", tiny, "--out", tmp_path, "--image-size", SIZE)  # a folder: a usage error
    assert r.exit_code == 2 and "is a" in r.stderr and "directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_fit_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    r = run("fit", tmp_path / "empty", "--out", tmp_path / "m.pt")
    assert r.exit_code == 2
    assert "no training images" in _one_clean_line(r)


@pytest.mark.parametrize(
    "args",
    [
        ["--scale", "0.5", "--image-size", "96"],
        ["--train-fraction", "0"],
        ["--coreset-ratio", "1.5"],
        ["--sampling", "magic"],
        ["--backbone-dtype", "int8"],
    ],
)
def test_fit_bad_options_are_usage_errors(tiny: Path, tmp_path: Path, args: list[str]) -> None:
    r = run("fit", tiny, "--out", tmp_path / "m.pt", *args)
    assert r.exit_code == 2
    assert not (tmp_path / "m.pt").exists()


def test_fit_backbone_dtype_reaches_the_model(tiny: Path, tmp_path: Path) -> None:
    model = tmp_path / "bf16.pt"
    r = run("fit", tiny, "--out", model, "--image-size", SIZE, "--backbone-dtype", "bfloat16", "-q")
    assert r.exit_code == 0, r.output
    assert PatchCore.load(model).backbone_dtype == "bfloat16"


def test_unknown_backbone(tiny: Path, tmp_path: Path) -> None:
    r = run("fit", tiny, "--out", tmp_path / "m.pt", "--backbone", "vgg99")
    assert r.exit_code == 2
    assert "vgg99" in _one_clean_line(r)


def test_evaluate_before_calibrate(fitted: Path, tiny: Path) -> None:
    r = run("evaluate", fitted, tiny)
    assert r.exit_code == 2
    assert "threshold not calibrated yet" in _one_clean_line(r)
    r = run("predict", fitted, tiny / "test" / "good")
    assert r.exit_code == 2
    assert "threshold not calibrated yet" in _one_clean_line(r)


def test_model_file_from_another_version(tmp_path: Path, tiny: Path) -> None:
    newer = tmp_path / "newer.pt"
    torch.save({"format": FORMAT_NAME, "format_version": 999}, newer)
    r = run("calibrate", newer, tiny)
    assert r.exit_code == 2
    assert "newer patchcore" in _one_clean_line(r)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    r = run("evaluate", junk, tiny)
    assert r.exit_code == 2
    assert "junk.pt" in _one_clean_line(r)
    r = run("predict", tmp_path / "missing.pt", tiny)
    assert r.exit_code == 2
    assert "no such model file" in _one_clean_line(r)


def test_evaluate_on_other_data_refuses(calibrated: Path, tmp_path: Path, tiny: Path) -> None:
    other = tmp_path / "other"
    for f in sorted((tiny / "test" / "good").iterdir())[:2]:
        link(f.resolve(), other / "test" / "good" / f.name)
    for f in sorted((tiny / "test" / "crack").iterdir())[:2]:
        link(f.resolve(), other / "test" / "crack" / f.name)
    r = run("evaluate", calibrated, other)
    assert r.exit_code == 2
    assert "held-out test images" in _one_clean_line(r)


def test_calibrate_needs_both_labels(fitted: Path, tmp_path: Path, tiny: Path) -> None:
    only_good = tmp_path / "only_good"
    for f in sorted((tiny / "test" / "good").iterdir()):
        link(f.resolve(), only_good / "test" / "good" / f.name)
    model = tmp_path / "m.pt"
    model.write_bytes(fitted.read_bytes())
    r = run("calibrate", model, only_good)
    assert r.exit_code == 2
    assert "normal and anomalous" in _one_clean_line(r)


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    r = run("fit", tmp_path / "nope", env={"PATCHCORE_DEBUG": "1"})
    assert r.exit_code != 0 and r.exception is not None
    assert "no such folder" in str(r.exception)


def test_every_command_has_help() -> None:
    r = run("--help")
    assert r.exit_code == 0
    commands = ("fit", "calibrate", "evaluate", "predict", "demo", "serve", "info")
    for command in commands:
        assert command in r.stdout
        h = run(command, "--help")
        assert h.exit_code == 0, command
        assert "Usage" in h.stdout and len(h.stdout) > 200


# ------------------------------------------------------------------------------ demo


@pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset not installed"
)
def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = run("demo", "--out", out, "--limit", "8", "--image-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    assert "GlobalAccuracy" in r.stdout and "Report:" in r.stdout
    report = Path(r.stdout.split("Report:")[1].split()[0])
    assert report.is_file() and report.parent == out.resolve()
    md = PatchCore.load(out / "model.pt").metadata_
    payload = json.loads((out / "metrics.json").read_text())
    assert set(payload["scored_names"]) == set(md["test_names"])
    assert set(md["test_names"]).isdisjoint(md["calibration_names"])
    assert set(md["train_names"]).isdisjoint(md["calibration_names"] + md["test_names"])
    # the model written by the demo evaluates again through the CLI, on the same cells
    r2 = run("evaluate", out / "model.pt", "elpv:mono", "--json", "-q")
    assert r2.exit_code == 0, r2.output
    assert (
        json.loads(r2.stdout)["metrics"]["ConfusionMatrix"]
        == (payload["metrics"]["ConfusionMatrix"])
    )


# ------------------------------------------------------------------------------ serve


def test_serve_hands_its_options_to_the_service(monkeypatch, calibrated: Path) -> None:
    import patchcore.apps.service

    calls = []
    monkeypatch.setattr(patchcore.apps.service, "serve", lambda *a, **kw: calls.append((a, kw)))
    r = run("serve", calibrated, "--port", "8123", "--token", "s3cret", "--workers", "2")
    assert r.exit_code == 0, r.output
    ((args, kwargs),) = calls
    assert args == (calibrated, "127.0.0.1", 8123)
    assert kwargs["token"] == "s3cret" and kwargs["workers"] == 2


def test_serve_reads_the_token_from_a_file(monkeypatch, calibrated: Path, tmp_path: Path) -> None:
    import uvicorn

    configs: list = []  # the real service up to listening: the token resolved by its one rule
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: configs.append(self.config))
    monkeypatch.delenv("PATCHCORE_TOKEN", raising=False)
    (tmp_path / "token.txt").write_text("  s3cret-from-file\n")
    r = run("serve", calibrated, "--token-file", tmp_path / "token.txt")
    assert r.exit_code == 0, r.output
    assert configs[0].app.state.service.token == "s3cret-from-file"
    (tmp_path / "empty.txt").write_text("\n")
    r = run("serve", calibrated, "--token-file", tmp_path / "empty.txt")
    assert r.exit_code == 2 and "token file is empty" in _one_clean_line(r)
    r = run("serve", calibrated, "--token-file", tmp_path / "token.txt", "--token", "x")
    assert r.exit_code == 2 and "not both" in r.stderr
    assert len(configs) == 1  # neither error opened a port


def test_serve_refuses_a_missing_model_before_listening(tmp_path: Path) -> None:
    r = run("serve", tmp_path / "missing.pt", "--port", "8124")
    assert r.exit_code == 2
    assert "no such model file" in _one_clean_line(r)
    assert run("serve", tmp_path / "m.pt", "--port", "70000").exit_code == 2


def test_info_shows_the_model_card(calibrated: Path) -> None:
    r = run("info", calibrated)
    assert r.exit_code == 0, r.output
    for field in ("backbone", "tapped layers", "memory bank", "threshold method", "calibration"):
        assert field in r.stdout


def test_fit_summary_names_a_chosen_share(tiny: Path, tmp_path: Path) -> None:
    model = tmp_path / "half.pt"
    r = run("fit", tiny, "--out", model, "--image-size", SIZE, "--train-fraction", "0.5", "-q")
    assert r.exit_code == 0, r.output
    assert "training images: 3 of 6 (--train-fraction 0.5, seed 0)" in r.stdout
