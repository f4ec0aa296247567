"""Nothing lost: the CLI's outputs are written whole or not at all, never over a file of
another kind without --force, and updates of one model never lose one another.

Real magnetic-tile images at 64 px; two tests run two real ``patchcore update`` processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import data_set, link_first
from conftest import run_cli as run

import patchcore
from patchcore.core.detector import PatchCore

SIZE = "64"
SRC = Path(patchcore.__file__).resolve().parents[1]


def cli_process(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    main = "from patchcore.apps.cli import app; app(prog_name='patchcore')"
    cmd = [sys.executable, "-c", main, *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """4 train, 3 normal + 3 crack test images; new/a and new/b: 8 more normals each."""
    src = data_set("magnetic_tile")
    root = tmp_path_factory.mktemp("data") / "tiles"
    good = sorted((src / "train" / "good").iterdir())
    link_first(src / "train" / "good", root / "train" / "good", 4)
    for i, f in enumerate(good[4:20]):
        folder = root / "new" / ("a" if i < 8 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f.name).symlink_to(f)
    link_first(src / "test" / "good", root / "test" / "good", 3)
    link_first(src / "test" / "crack", root / "test" / "crack", 3)
    return root


@pytest.fixture(scope="module")
def model(tiles: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "model.pt"
    r = run("fit", tiles, "--out", out, "--image-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    r = run("calibrate", out, tiles, "-q")
    assert r.exit_code == 0, r.output
    return out


def copy_of(model: Path, folder: Path, name: str = "m.pt") -> Path:
    path = folder / name
    path.write_bytes(model.read_bytes())
    return path


def hidden(folder: Path) -> list[str]:
    """Temporary files or folders left behind (hidden names but lock files and the marker of
    a folder patchcore wrote)."""
    return sorted(
        p.name
        for p in folder.rglob(".*")
        if not p.name.endswith(".lock") and p.name != ".patchcore"
    )


# ------------------------------------------------------------------------------ of its kind


def test_fit_out_never_replaces_a_file_of_another_kind(tiles: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    r = run("fit", tiles, "--out", notes, "--image-size", SIZE, "-q")
    assert r.exit_code == 2 and "is not a patchcore model file" in r.stderr
    assert "--force" in r.stderr and notes.read_text() == "my notes\n"
    r = run("fit", tiles, "--out", notes, "--image-size", SIZE, "-q", "--force")
    assert r.exit_code == 0, r.output
    assert PatchCore.load(notes).n_train_images_ == 4
    r = run("fit", tiles, "--out", notes, "--image-size", SIZE, "-q")  # a model: replaced
    assert r.exit_code == 0, r.output
    assert hidden(tmp_path) == []


def test_update_out_refuses_one_of_its_own_input_images(
    model: Path, tiles: Path, tmp_path: Path
) -> None:
    image = sorted((tiles / "new" / "a").iterdir())[0]
    local = tmp_path / image.name
    local.write_bytes(image.read_bytes())
    before = local.read_bytes()
    r = run("update", model, local, "--out", local, "-q")
    assert r.exit_code == 2 and "is not a patchcore model file" in r.stderr
    assert local.read_bytes() == before


def test_regions_file_replaces_only_a_regions_file(model: Path, tiles: Path, tmp_path) -> None:
    crack = sorted((tiles / "test" / "crack").iterdir())[0]
    other = tmp_path / "existing.json"
    other.write_text('{"mine": true}\n')
    r = run("predict", model, crack, "--regions", other, "-q")
    assert r.exit_code == 2 and "is not a regions file" in r.stderr
    assert other.read_text() == '{"mine": true}\n' and r.stdout == ""  # refused before scoring
    ours = tmp_path / "regions.json"
    for _ in range(2):  # a regions file we wrote is replaced
        r = run("predict", model, crack, "--regions", ours, "-q")
        assert r.exit_code == 0, r.output
    doc = json.loads(ours.read_text())
    assert doc["format"] == "patchcore-regions" and len(doc["images"]) == 1
    r = run("predict", model, crack, "--regions", other, "-q", "--force")
    assert r.exit_code == 0 and json.loads(other.read_text())["format"] == "patchcore-regions"
    table = tmp_path / "notes.csv"
    table.write_text("a,b\n1,2\n")
    r = run("predict", model, crack, "--regions", table, "-q")
    assert r.exit_code == 2 and table.read_text() == "a,b\n1,2\n"
    assert hidden(tmp_path) == []


def test_heatmaps_never_replace_a_picture_patchcore_did_not_write(
    model: Path, tiles: Path, tmp_path: Path
) -> None:
    crack = sorted((tiles / "test" / "crack").iterdir())[0]
    heat = tmp_path / "heat"
    heat.mkdir()
    theirs = heat / f"{crack.stem}_heatmap.png"
    theirs.write_bytes(crack.read_bytes())  # someone's own picture under that name
    r = run("predict", model, crack, "--heatmaps", heat, "-q")
    assert r.exit_code == 2 and "is not a picture written by patchcore" in r.stderr
    assert theirs.read_bytes() == crack.read_bytes()
    theirs.unlink()
    for _ in range(2):  # ours: replaced on the next run
        r = run("predict", model, crack, "--heatmaps", heat, "-q")
        assert r.exit_code == 0, r.output
    assert [p.name for p in heat.iterdir()] == [theirs.name]


def test_report_folder_is_swapped_whole(model: Path, tiles: Path, tmp_path, monkeypatch) -> None:
    from patchcore.apps.workflow import evaluate

    m = copy_of(model, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not lose me")
    r = run("evaluate", m, tiles, "--report", mine, "-q")
    assert r.exit_code == 2 and "patchcore did not write" in r.stderr
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    r = run("evaluate", m, tiles, "--report", mine, "-q", "--force")  # into it, keeping it
    assert r.exit_code == 0, r.output
    assert (mine / "thesis.tex").read_text() == "do not lose me"
    assert (mine / "report.html").is_file()

    report = tmp_path / "report"
    r = run("evaluate", m, tiles, "--report", report, "-q")
    assert r.exit_code == 0, r.output
    (report / "gallery" / "stale.png").write_bytes(b"from an older run")
    html = (report / "report.html").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "write_evaluation_report", interrupted)
    r = run("evaluate", m, tiles, "--report", report, "-q")
    assert r.exit_code == 130
    assert (report / "report.html").read_bytes() == html  # the old report, intact
    assert (report / "gallery" / "stale.png").exists()
    monkeypatch.undo()
    r = run("evaluate", m, tiles, "--report", report, "-q")
    assert r.exit_code == 0, r.output
    assert not (report / "gallery" / "stale.png").exists()  # a new folder, not a merge
    assert hidden(tmp_path) == [] and (report / ".patchcore").is_file()


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (a read-only mode, or /sys for root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for folder in (ro, Path("/sys")):
        try:
            (folder / ".probe").touch()
        except OSError:
            return folder
        (folder / ".probe").unlink()
    pytest.skip("no unwritable folder here")


def test_batch_out_read_only_fails_before_any_scoring(model: Path, tiles: Path, tmp_path):
    out = _unwritable(tmp_path) / "results"
    t0 = time.perf_counter()
    r = run("batch", model, tiles / "test" / "good", "--out", out, "-q")
    assert r.exit_code == 2 and "cannot write there" in r.stderr
    assert time.perf_counter() - t0 < 10 and not out.exists()
    r = run("predict", model, tiles / "test" / "good", "--heatmaps", out, "-q")
    assert r.exit_code == 2 and "cannot write there" in r.stderr and r.stdout == ""


# ------------------------------------------------------------------------------ updates


def _updated(path: Path) -> list[str]:
    return [n for u in PatchCore.load(path).updates_ for n in u["names"]]


def test_two_concurrent_updates_both_land(model: Path, tiles: Path, tmp_path: Path) -> None:
    m = copy_of(model, tmp_path)
    a, b = tiles / "new" / "a", tiles / "new" / "b"
    procs = [cli_process("update", m, folder, "-q") for folder in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode() for o in outs]
    det = PatchCore.load(m)
    assert len(det.updates_) == 2 and det.n_train_images_ == 4 + 16
    want = sorted(str(f) for f in [*a.iterdir(), *b.iterdir()])
    assert sorted(_updated(m)) == want


def test_an_update_waits_for_the_lock(model: Path, tiles: Path, tmp_path: Path) -> None:
    m = copy_of(model, tmp_path)
    with open(tmp_path / ".m.pt.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another update holds the model
        p = cli_process("update", m, tiles / "new" / "a", "-q")
        line = p.stderr.readline().decode()
        assert "another command is updating it; waiting" in line, line
        assert p.poll() is None and PatchCore.load(m).updates_ == []
        fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert len(PatchCore.load(m).updates_) == 1


def test_a_model_changed_under_an_update_is_never_overwritten(
    model: Path, tiles: Path, tmp_path: Path, monkeypatch
) -> None:
    m = copy_of(model, tmp_path)
    other = copy_of(model, tmp_path, "other.pt")
    det = PatchCore.load(other)
    det.metadata_ = {**det.metadata_, "written_by": "someone else"}
    det.save(other)
    real = PatchCore.partial_fit

    def meanwhile(self, *args, **kwargs):  # a writer that does not take the lock
        os.replace(other, m)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PatchCore, "partial_fit", meanwhile)
    r = run("update", m, tiles / "new" / "a", "-q")
    assert r.exit_code == 2 and "changed on disk while this command ran" in r.stderr
    kept = PatchCore.load(m)
    assert kept.metadata_["written_by"] == "someone else" and kept.updates_ == []
