"""The CLI as a package: options derived from the estimator, one record per image on every
row, help that reads at 80 columns, and quiet exits (a closed pipe, Ctrl-C).

A few real magnetic-tile images at 64 px keep each fit to about a second.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import data_set, link_first
from conftest import run_cli as run
from PIL import Image

import patchcore
from patchcore.core.detector import PatchCore
from patchcore.lean.record import FIELD_NAMES, THRESHOLD_RANGE, VERDICTS

SIZE = "64"
SRC = Path(patchcore.__file__).resolve().parents[1]
CLI = Path(patchcore.__file__).resolve().parent / "apps" / "cli"


def cli_process(*args: object, **kw) -> subprocess.Popen:
    """``patchcore ARGS`` as a real process (this checkout's sources)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    main = "from patchcore.apps.cli import app; app(prog_name='patchcore')"
    cmd = [sys.executable, "-c", main, *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """4 train, 3 normal + 3 crack test images (links), and a folder of 2 new normals."""
    src = data_set("magnetic_tile")
    root = tmp_path_factory.mktemp("data") / "tiles"
    good = sorted((src / "train" / "good").iterdir())
    link_first(src / "train" / "good", root / "train" / "good", 4)
    for f in good[4:6]:
        (root / "new").mkdir(parents=True, exist_ok=True)
        (root / "new" / f.name).symlink_to(f)
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


def copy_of(model: Path, folder: Path) -> Path:
    path = folder / "m.pt"
    path.write_bytes(model.read_bytes())
    return path


# ------------------------------------------------------------------------------ layout


def _fit_command():
    import typer

    from patchcore.apps.cli import app

    return typer.main.get_command(app).commands["fit"]


def test_every_estimator_parameter_is_a_fit_option_with_its_signature_default() -> None:
    params = {p.name: p for p in _fit_command().params}
    sig = inspect.signature(PatchCore.__init__).parameters
    wanted = [n for n in sig if n not in ("self", "progress")]
    assert [n for n in wanted if n not in params] == []
    for name in wanted:
        default = params[name].default
        assert getattr(default, "value", default) == sig[name].default, name  # a choice: .value
    assert params["layers"].opts == ["--layer"] and params["top_k"].opts == ["--top-k"]


def test_fit_hands_the_estimator_its_own_defaults(tiles: Path, tmp_path, monkeypatch) -> None:
    from patchcore.apps import workflow

    seen = {}

    def fake(data, out, **kw):
        seen.update(kw)
        raise workflow.WorkflowError("stop here")

    monkeypatch.setattr(workflow, "fit_model", fake)
    r = run("fit", tiles, "--out", tmp_path / "m.pt")
    assert r.exit_code == 2 and "stop here" in r.stderr
    defaults = PatchCore().get_params()
    for k in ("progress", "seed"):
        defaults.pop(k)
    assert {k: seen[k] for k in defaults} == defaults
    r = run("fit", tiles, "--out", tmp_path / "m.pt", "--max-bank-size", "0", "--weights", "none")
    assert seen["max_bank_size"] is None and seen["weights"] is None


def test_options_are_derived_from_the_estimator_not_copied() -> None:
    from patchcore.apps.cli.options import estimator_options

    class Toy:
        """A toy.

        Args:
            size: how big it is, in ``units``. The second sentence is left out.
            cap: the cap (``None``: no cap).
            mode: how it runs.
        """

        def __init__(self, *, size: int | None = None, cap: int | None = 7, mode: str = "a"):
            pass

    opts = estimator_options(Toy)
    assert [o.default for o in opts.values()] == [None, 7, "a"]
    info = {k: o.annotation.__metadata__[0] for k, o in opts.items()}
    assert info["size"].help == "How big it is, in units."
    assert info["cap"].help == "The cap (0: no cap)." and opts["cap"].value(0) is None


def test_no_cli_module_over_600_lines_and_no_function_over_100() -> None:
    files = sorted(CLI.glob("*.py"))
    assert len(files) >= 10
    for f in files:
        text = f.read_text()
        assert len(text.splitlines()) <= 600, f.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 100, f"{f.name}: {node.name}"


def test_weights_takes_a_local_file_for_any_backbone(tiles: Path, tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(3)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    out = tmp_path / "r18.pt"
    r = run("fit", tiles / "train" / "good", "--out", out, "--backbone", "resnet18",
            "--weights", weights, "--image-size", SIZE, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    det = PatchCore.load(out)
    saved = torch.load(weights, weights_only=True)
    state = det.extractor_.state_dict()
    (key,) = [k for k in state if k.endswith("layer1.0.conv1.weight")]
    assert torch.equal(state[key], saved["layer1.0.conv1.weight"])
    r = run("fit", tiles, "--out", tmp_path / "x.pt", "--backbone", "resnet18",
            "--weights", tmp_path / "missing.pth")  # fmt: skip
    assert r.exit_code == 2 and "missing.pth: weights file for resnet18 not found" in r.stderr


# ------------------------------------------------------------------------------ messages


def _mid_sentence_breaks(text: str, width: int) -> list[str]:
    """Lines broken although the next word would have fitted (a paragraph's hard line break).

    Continuation lines are those indented at least as deep as the line before (an option's
    help column, a paragraph); a new option or command row starts with ``-`` or sits at a
    shallower or equal indent inside a list section."""
    bad = []
    lines = text.splitlines()
    section = ""
    for a, b in zip(lines, lines[1:], strict=False):
        if a and not a.startswith(" "):
            section = a  # a heading ("Options:", "Usage: ...") is no paragraph
            continue
        if not a.strip() or not b.strip() or b.lstrip().startswith("-"):
            continue
        ia, ib = len(a) - len(a.lstrip()), len(b) - len(b.lstrip())
        listing = section.rstrip(":") in ("Options", "Commands", "Arguments")
        if listing and ib > ia and "  " not in a.strip():
            continue  # a long name: its help starts on the next line
        if ib < ia or (listing and ib <= ia) or (not listing and ib != ia):
            continue
        if len(a.rstrip()) + 1 + len(b.split()[0]) <= width:
            bad.append(f"{a.strip()!r} / {b.strip()!r}")
    return bad


def test_help_is_not_wrapped_mid_sentence_at_80_columns() -> None:
    import typer

    from patchcore.apps.cli import app

    names = ["", *typer.main.get_command(app).commands]
    for name in names:
        r = run(*([name] if name else []), "--help", env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert r.exit_code == 0, name
        assert max(len(line) for line in r.stdout.splitlines()) <= 80, name
        assert _mid_sentence_breaks(r.stdout, 78) == [], name


def test_fit_summary_counts_add_up_with_unreadable_images(tiles: Path, tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    for f in sorted((tiles / "train" / "good").iterdir()):
        (folder / f.name).symlink_to(f.resolve())
    (folder / "broken.png").write_bytes(b"not a png")
    r = run("fit", folder, "--out", tmp_path / "m.pt", "--image-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stdout.splitlines() if "training images:" in x)
    assert "4 of 5 (1 unreadable skipped;" in line and "all of them" not in line
    r = run("fit", folder, "--out", tmp_path / "h.pt", "--image-size", SIZE, "-q",
            "--train-fraction", "0.99", "--seed", "0")  # fmt: skip
    line = next(x for x in r.stdout.splitlines() if "training images:" in x)
    used, of = map(int, re.search(r"training images: (\d+) of (\d+)", line).groups())
    drawn = int(re.search(r"\((\d+) drawn by --train-fraction 0.99", line).group(1))
    skipped = int(re.search(r"(\d+) unreadable skipped", line).group(1))
    assert used + skipped == drawn <= of == 5


def test_demo_calls_bank_rows_rows(monkeypatch) -> None:
    import patchcore.apps.cli.demo as demo_cli
    from patchcore.apps import workflow

    fit = SimpleNamespace(training_images=100, bank_size=1176, train_patches=117600,
                          card={"backbone": "efficientnet-lite0"})  # fmt: skip
    cal = SimpleNamespace(calibration_images=10, calibration_normal=5, calibration_anomalous=5,
                          threshold=1.0, method="max_f1", test_images=10)  # fmt: skip
    ev = SimpleNamespace(ms_per_image=1.0, metrics_path="m.json", report_path="r.html")
    result = SimpleNamespace(fit=fit, calibration=cal, evaluation=ev, model_path="m.pt",
                             timings={"fit": 1.0, "calibrate": 1.0, "evaluate": 1.0,
                                      "total": 3.0})  # fmt: skip
    monkeypatch.setattr(workflow, "run_demo", lambda *a, **k: result)
    monkeypatch.setattr(demo_cli, "print_evaluation", lambda ev: None, raising=False)
    r = run("demo", "--out", "unused", "-q")
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("fit:"))
    assert "1,176 patches" not in line
    assert "memory bank of 1,176 rows (of 117,600 training patches)" in line


# ------------------------------------------------------------------------------ the record


def test_predict_rows_are_the_inspection_records(model: Path, tiles: Path, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted((tiles / "test" / "crack").iterdir())[:2]:
        (folder / f.name).symlink_to(f.resolve())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    heat = tmp_path / "heat"
    r = run("predict", model, folder, "-f", "json", "-q", "--heatmaps", heat)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert all(list(row) == [*FIELD_NAMES, "heatmap"] for row in rows)
    assert {row["verdict"] for row in rows} <= set(VERDICTS)
    det = PatchCore.load(model)
    files = sorted(str(f) for f in folder.iterdir())
    want = det.inspect(files)
    for row, rec in zip(rows, want, strict=True):
        assert row["image"] == rec.image and row["verdict"] == rec.verdict
        assert row["score"] == rec.score and row["normalized_score"] == rec.normalized_score
        assert row["map_max_x"] == rec.map_max_x and row["error"] == rec.error
        regions = None if rec.regions is None else [x.as_dict() for x in rec.regions]
        assert row["regions"] == regions
    assert rows[0]["verdict"] == "error" and rows[0]["heatmap"] is None
    assert "1 error" in r.stderr and "unreadable" not in r.stderr


def test_fail_fast_stops_at_the_first_error(model: Path, tiles: Path, tmp_path) -> None:
    cracks = sorted((tiles / "test" / "crack").iterdir())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    r = run("predict", model, cracks[0], bad, cracks[1], "-f", "json", "-q")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3  # the default goes on
    r = run("predict", model, cracks[0], bad, cracks[1], "-f", "json", "-q", "--fail-fast")
    assert r.exit_code == 2 and "--fail-fast: stopped at the first error" in r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["verdict"] for x in rows][-1] == "error" and len(rows) == 2
    r = run("explain", model, bad, cracks[0], "-f", "json", "--fail-fast")
    assert r.exit_code == 2 and len(r.stdout.splitlines()) == 1


def test_explain_rows_are_records_with_the_nearest_patch(model: Path, tiles: Path) -> None:
    from patchcore.apps.workflow import EXPLAIN_FIELDS

    crack = sorted((tiles / "test" / "crack").iterdir())[0]
    r = run("explain", model, crack, "-f", "json")
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert list(row) == [*FIELD_NAMES, *EXPLAIN_FIELDS]
    det = PatchCore.load(model)
    (rec,) = det.inspect([str(crack)])
    assert row["verdict"] == rec.verdict and row["score"] == pytest.approx(rec.score, rel=1e-5)
    assert row["train_image"] in det.train_names_ and len(row["box"]) == 4


def test_heatmap_colours_follow_the_record_rule(model: Path, tiles: Path, tmp_path, monkeypatch):
    """The colour range is record.display_range: the model's stored range, else the threshold's."""
    from patchcore.apps import plots
    from patchcore.lean.record import display_range

    seen = []
    real = plots.anomaly_map_overlay
    monkeypatch.setattr(
        plots, "anomaly_map_overlay", lambda i, a, r, *x: seen.append(r) or real(i, a, r, *x)
    )
    crack = sorted((tiles / "test" / "crack").iterdir())[0]
    m = copy_of(model, tmp_path)
    det = PatchCore.load(m)
    assert det.display_range_ is not None
    r = run("predict", m, crack, "--heatmaps", tmp_path / "h1", "-q")
    assert r.exit_code == 0, r.output
    assert seen == [pytest.approx(display_range(det.display_range_, det.threshold_))]

    det.state_.display_range = None  # a model calibrated before ranges were stored
    det.metadata_ = {k: v for k, v in det.metadata_.items() if k != "display_range"}
    det.save(m)
    seen.clear()
    r = run("predict", m, crack, "--heatmaps", tmp_path / "h2", "-q")
    assert r.exit_code == 0, r.output
    t = det.threshold_
    assert seen == [pytest.approx((THRESHOLD_RANGE[0] * t, THRESHOLD_RANGE[1] * t))]


# ------------------------------------------------------------------------------ quiet exits


@pytest.fixture(scope="module")
def many(tiles: Path, tmp_path_factory) -> Path:
    """200 links to 4 test images: a run long enough to be cut short."""
    folder = tmp_path_factory.mktemp("many")
    files = sorted((tiles / "test" / "good").iterdir()) + sorted(
        (tiles / "test" / "crack").iterdir()
    )
    for i in range(200):
        (folder / f"img{i:03d}.jpg").symlink_to(files[i % len(files)].resolve())
    return folder


def test_a_closed_pipe_ends_quietly(model: Path, many: Path) -> None:
    p = cli_process("predict", model, many, "-f", "json", "-q")
    first = p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert json.loads(first)["image"].endswith("img000.jpg")
    assert err == ""


def test_ctrl_c_exits_130_and_leaves_no_half_written_file(
    model: Path, many: Path, tmp_path: Path, monkeypatch
) -> None:
    from patchcore.apps import plots

    regions = tmp_path / "regions.json"
    r = run("predict", model, sorted(many.iterdir())[0], "--regions", regions, "-q")
    assert r.exit_code == 0, r.output
    before = regions.read_bytes()
    heat = tmp_path / "heat"
    real = plots.save_png
    calls = []

    def interrupted(array, path):  # Ctrl-C in the middle of writing the third picture
        calls.append(path)
        if len(calls) < 3:
            return real(array, path)
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "save_png", interrupted)
    r = run("predict", model, many, "-q", "--regions", regions, "--heatmaps", heat)
    assert r.exit_code == 130 and "Traceback" not in r.output and "Aborted" not in r.output
    assert regions.read_bytes() == before  # the old regions file, whole
    assert len(list(heat.iterdir())) == 2  # the two complete pictures, nothing else
    for png in heat.iterdir():
        with Image.open(png) as im:
            im.load()
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
