"""Export folders are replaced atomically and only when they hold an export (issue #25).

A small fixed-size model (image_size=64, 3 casting images) is exported once; a second export into
the same folder is interrupted with SIGINT (Ctrl-C) while it works, at two points, through the
real ``patchcore export`` command in a subprocess: the old export must still load, with the same
digest and the same scores, and no half-written folder may remain.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import data_set

from patchcore.core.detector import PatchCore
from patchcore.core.export import MANIFEST, ExportError, export
from patchcore.lean.runtime import ExportedModel

pytestmark = pytest.mark.slow
SRC = Path(__file__).resolve().parents[1] / "src"
CLI = "import sys; from patchcore.apps.cli import app; sys.argv[0] = 'patchcore'; app()"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[PatchCore, Path, list[Path]]:
    root = data_set("casting")
    train = sorted((root / "train" / "good").iterdir())[:3]
    test = sorted((root / "test" / "good").iterdir())[:2]
    det = PatchCore(image_size=64, search_precision="float32", progress=False).fit(train)
    det.set_threshold(float(np.median(det.score_samples(test))))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    det.save(path)
    return det, path, test


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    det, path, _ = model
    out = tmp_path_factory.mktemp("exports") / "export"
    export(det, out, source=path)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _work_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.export-*"))


@pytest.mark.parametrize("stage", ["folder made", "graph written"])
def test_ctrl_c_during_export_leaves_the_old_export(model, exported, stage):
    det, path, test = model
    before = _snapshot(exported)
    scores = ExportedModel(exported).score_samples(test)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "export", str(path), "--out", str(exported)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            work = _work_dirs(exported)
            if work and (stage == "folder made" or (work[0] / "model.onnx").exists()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the export finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, err
    assert _snapshot(exported) == before  # every byte of the old export, manifest included
    np.testing.assert_array_equal(ExportedModel(exported).score_samples(test), scores)
    assert _work_dirs(exported) == []


def test_a_finished_export_replaces_the_old_one(model, exported):
    det, path, test = model
    old = json.loads((exported / MANIFEST).read_text())
    other = PatchCore.load(path)  # the same model with another threshold: another export
    other.set_threshold(2.0 * det.threshold_)
    result = export(other, exported, source=path)
    new = json.loads((exported / MANIFEST).read_text())
    assert new["digest"] != old["digest"]
    assert result.files == (exported / "model.onnx",) and result.manifest == exported / MANIFEST
    runtime = ExportedModel(exported)
    assert runtime.threshold == pytest.approx(2.0 * det.threshold_)
    assert runtime.score_samples(test) == pytest.approx(det.score_samples(test))
    assert _work_dirs(exported) == []
    export(det, exported, source=path)  # back to the fixture's export for the tests after
    assert ExportedModel(exported).threshold == pytest.approx(det.threshold_)


def test_a_folder_that_is_not_an_export_is_kept_unless_forced(model, tmp_path):
    det, _, test = model
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not a patchcore export"):
        export(det, notes)
    assert (notes / "todo.txt").read_text() == "keep me"
    file = tmp_path / "file.txt"
    file.write_text("keep me too")
    with pytest.raises(ExportError, match="exists and is not a patchcore export"):
        export(det, file)
    assert file.read_text() == "keep me too" and _work_dirs(file) == []
    export(det, notes, force=True)  # writes into it, keeping its other files
    assert {f.name for f in notes.iterdir()} == {MANIFEST, "model.onnx", "todo.txt"}
    assert (notes / "todo.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    export(det, empty)  # an empty folder is fine
    assert ExportedModel(empty).threshold == pytest.approx(det.threshold_)


def test_a_non_finite_threshold_is_never_exported(model, tmp_path):
    det, _, _ = model
    other = PatchCore(**det.get_params())
    other._set_fitted(det.state_, det.extractor_)
    state = other.state_
    saved = state.threshold, state.normalization
    try:
        state.threshold, state.normalization = math.nan, None
        with pytest.raises(ExportError, match="threshold is nan"):
            export(other, tmp_path / "x")
    finally:
        state.threshold, state.normalization = saved
    assert not (tmp_path / "x").exists() and _work_dirs(tmp_path / "x") == []


def test_the_manifest_carries_what_the_record_needs(model, exported):
    det, _, _ = model
    info = json.loads((exported / MANIFEST).read_text())
    assert info["threshold"] == det.threshold_
    assert info["region_threshold"] == det.region_cut()
    assert info["normalization"]["threshold"] == det.threshold_
    assert [e["name"] for e in info["files"]] == ["model.onnx"]
