"""The torch-free runtime on the one record (issue #20) and ``patchcore-run``'s output (issue #25).

On the tiny synthetic export of ``_runtime_export`` (score = the brightest pixel's channel mean,
threshold 0.5, no torch): records from ``ExportedModel``, the CLI's table / JSON / CSV through
``RecordWriter``, error rows for damaged files (a DDS named .png), ``--fail-fast``, map names
that collide, rows and maps streamed as they come (Ctrl-C, peak memory).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _runtime_export import damaged_dds, synthetic_export
from PIL import Image

from patchcore.lean.pixels import ImageReadError
from patchcore.lean.record import FIELD_NAMES, judge
from patchcore.lean.runtime import ExportedModel
from patchcore.lean.runtime_cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
RUN = "import sys; from patchcore.lean.runtime_cli import main; sys.exit(main())"


def _png(path: Path, value: int, size: tuple[int, int] = (48, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((*size, 3), 30, np.uint8)
    a[size[0] // 2 - 4 : size[0] // 2 + 4, 10:20] = value  # a bright patch: the "defect"
    Image.fromarray(a).save(path)
    return path


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return synthetic_export(tmp_path / "export")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Normal (dim) and anomalous (bright) images of two sizes, and a damaged file between."""
    d = tmp_path / "images"
    return [
        _png(d / "a_dim.png", 60),
        _png(d / "b_bright.png", 250),
        damaged_dds(d / "c_damaged.png"),
        _png(d / "d_bright_wide.png", 240, (48, 80)),
        _png(d / "e_dim_wide.png", 90, (48, 80)),
        d / "f_missing.png",
    ]


def test_records_follow_the_one_rule(export, images):
    model = ExportedModel(export, batch_size=2)
    records = model.inspect(images)
    assert [r.index for r in records] == list(range(len(images)))
    assert [r.image for r in records] == [str(p) for p in images]
    scores = [r.score for r in records]
    assert [r.verdict for r in records] == list(judge(scores, 0.5))  # errors where unreadable
    assert [r.verdict for r in records] == [
        "normal", "anomalous", "error", "anomalous", "normal", "error",
    ]  # fmt: skip
    assert "not an image file" in records[2].error and "no such file" in records[5].error
    for r, p in zip(records, images, strict=True):
        if r.verdict == "error":
            assert r.score is None and r.anomaly_map is None
            continue
        h, w = np.asarray(Image.open(p)).shape[:2]
        assert r.anomaly_map.shape == (h, w) and (r.width, r.height) == (w, h)
        assert r.score == pytest.approx(float(r.anomaly_map.max()), rel=1e-6)
        assert r.normalized_score == pytest.approx(r.score)  # mapping 0 .. 0.5 .. 1
        assert bool(r.regions) == (r.verdict == "anomalous") and r.region_threshold == 0.5
        assert (r.map_max_y, r.map_max_x) == np.unravel_index(r.anomaly_map.argmax(), (h, w))
    bright = records[1].regions[0]
    assert (bright.x0, bright.y0, bright.x1, bright.y1) == (10, 20, 20, 28)


def test_errors_raise_on_request_and_scores_match_records(export, images):
    model = ExportedModel(export)
    with pytest.raises(ImageReadError, match="c_damaged.png: not an image file"):
        model.inspect(images, on_error="raise")
    good = [images[i] for i in (0, 1, 3, 4)]
    assert model.score_samples(good) == pytest.approx([r.score for r in model.inspect(good)])
    assert model.anomaly_map(good[1]).shape == (48, 64)


def test_an_export_without_a_threshold_gives_no_verdict(tmp_path, images):
    out = synthetic_export(
        tmp_path / "x", threshold=None, normalization=None, region_threshold=None
    )
    (r,) = ExportedModel(out).inspect(images[1])
    assert r.verdict is None and r.regions is None and r.normalized_score is None
    assert r.score == pytest.approx(250 / 255, rel=1e-5)


def test_cli_rows_in_every_format(export, images, capsys):
    good = [str(images[i]) for i in (0, 1)]
    assert main([str(export), *good, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert tuple(rows[0]) == FIELD_NAMES
    assert [r["verdict"] for r in rows] == ["normal", "anomalous"]
    assert main([str(export), *good, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert tuple(rows[0]) == FIELD_NAMES and rows[1]["regions"][0]["x0"] == 10
    assert main([str(export), *good]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split() == ["verdict", "score", "normalized", "image"]
    assert "2 image(s): 1 anomalous, 1 normal, 0 error(s)" in out.err


def test_cli_reports_damaged_files_and_goes_on(export, images, capsys):
    assert main([str(export), *map(str, images), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["verdict"] for r in rows] == [
        "normal", "anomalous", "error", "anomalous", "normal", "error",
    ]  # fmt: skip
    assert rows[2]["image"].endswith("c_damaged.png") and "not an image file" in rows[2]["error"]
    # --fail-fast: the error row, then stop
    assert main([str(export), *map(str, images), "--json", "--fail-fast"]) == 2
    out = capsys.readouterr()
    assert [json.loads(x)["verdict"] for x in out.out.splitlines()] == [
        "normal", "anomalous", "error",
    ]  # fmt: skip
    assert "c_damaged.png" in out.err and "--fail-fast" in out.err
    # nothing readable: exit 1, still one row per input
    assert main([str(export), str(images[2]), str(images[5]), "--format", "csv"]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_maps_with_the_same_stem_get_their_own_files(export, tmp_path, capsys):
    a = _png(tmp_path / "line1" / "part.png", 200)
    b = _png(tmp_path / "line2" / "part.png", 100, (40, 40))
    c = _png(tmp_path / "line3" / "part.png", 50)
    maps = tmp_path / "maps"
    assert main([str(export), str(a), str(b), str(c), "--maps-dir", str(maps), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    names = [Path(r["map"]).name for r in rows]
    assert names == ["part.npy", "part_2.npy", "part_3.npy"]
    assert sorted(p.name for p in maps.iterdir()) == sorted(names)  # no temporary files left
    model = ExportedModel(export)
    for r, img in zip(rows, (a, b, c), strict=True):
        np.testing.assert_array_equal(np.load(r["map"]), model.anomaly_map(img))


def _folder_of(tmp_path: Path, n: int, size: int) -> Path:
    folder = tmp_path / f"many{n}"
    folder.mkdir()
    first = _png(folder / "img00000.png", 200, (size, size))
    for i in range(1, n):
        os.link(first, folder / f"img{i:05d}.png")
    return folder


def test_rows_stream_and_ctrl_c_keeps_them(export, tmp_path):
    """Ctrl-C in the middle of a long run: the rows printed so far are complete lines."""
    folder = _folder_of(tmp_path, 4000, 256)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-c", RUN, str(export), str(folder), "--json", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = [proc.stdout.readline() for _ in range(3)]
        assert proc.poll() is None, "the run ended before its first rows were read"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.stdout.read(), proc.stderr.read()  # (communicate would skip the
        proc.wait(timeout=60)  # lines the text buffer already holds)
    finally:
        proc.kill()
    rows = [json.loads(x) for x in first + rest.splitlines()]
    assert proc.returncode == 130 and "interrupted" in err
    assert 3 <= len(rows) < 4000
    assert [r["index"] for r in rows] == list(range(len(rows)))


def _peak_rss_mb(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()
    return usage.ru_maxrss / 1024


def test_maps_are_written_as_they_come_not_kept(export, tmp_path):
    """Peak memory does not grow with the number of maps (1 MB each at 512 x 512; batch 1,
    so both runs fill the pipeline's look-ahead of 4 images)."""
    peaks = []
    for n in (16, 200):
        folder = _folder_of(tmp_path, n, 512)
        maps = tmp_path / f"maps{n}"
        cmd = [sys.executable, "-c", RUN, str(export), str(folder), "--maps-dir", str(maps)]
        peaks.append(_peak_rss_mb([*cmd, "--batch-size", "1"]))
        assert len(list(maps.iterdir())) == n
    assert peaks[1] - peaks[0] < 40, peaks  # keeping them would add 184 MB
