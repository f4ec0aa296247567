"""docs/matlab-example.md runs: every ``patchcore`` command and every Python block of the page,
read from the page itself, on a small folder laid out as VisA as downloaded (built from DeepPCB
boards by links: ``VisA/pcb4/Data/Images/{Normal,Anomaly}``, ``Data/Masks/Anomaly``,
``VisA/split_csv/1cls.csv``) with ResNet-18 random weights saved under the torchvision file
name the page uses (no ImageNet weights are reachable here, so no accuracy is checked).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import data_set, link
from conftest import run_cli as run

PAGE = Path(__file__).resolve().parents[1] / "docs" / "matlab-example.md"
WEIGHTS = "resnet18-f37072fd.pth"

pytestmark = pytest.mark.slow


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a Markdown page, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M)]


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [ln.strip() for ln in joined.splitlines()]
    return [shlex.split(ln) for ln in lines if ln and not ln.startswith("#")]


def make_visa(root: Path, n_train: int = 10, n_test: int = 6) -> None:
    """A VisA-layout folder ``root/pcb4`` of DeepPCB boards (links) with its split csv."""
    src = data_set("deeppcb")
    images = root / "pcb4" / "Data" / "Images"
    rows = [("object", "split", "label", "image", "mask")]
    good = sorted((src / "train" / "good").iterdir())[:n_train]
    good_test = sorted((src / "test" / "good").iterdir())[:n_test]
    bad = sorted((src / "test" / "defect").iterdir())[:n_test]
    for split, files in (("train", good), ("test", good_test)):
        for f in files:
            link(f, images / "Normal" / f.name)
            rows.append(("pcb4", split, "normal", f"pcb4/Data/Images/Normal/{f.name}", ""))
    for f in bad:
        link(f, images / "Anomaly" / f.name)
        mask = root / "pcb4" / "Data" / "Masks" / "Anomaly" / f"{f.stem}.png"
        link(src / "ground_truth" / "defect" / f"{f.stem}_mask.png", mask)
        rows.append(
            ("pcb4", "test", "anomaly", f"pcb4/Data/Images/Anomaly/{f.name}",
             mask.relative_to(root).as_posix())
        )  # fmt: skip
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def random_resnet18(path: Path) -> None:
    """ResNet-18 weights (random, seeded) in torchvision's state-dict layout."""
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)


def test_page_has_every_step() -> None:
    """The page covers every step of the MATLAB example, on the command line and in Python."""
    text = PAGE.read_text(encoding="utf-8")
    blocks = code_blocks(text)
    shell = [c for lang, code in blocks if lang == "bash" for c in commands(code)]
    python = "\n".join(code for lang, code in blocks if lang == "python")
    assert [c[:2] for c in shell[:5]] == [
        ["patchcore", "fit"], ["patchcore", "calibrate"], ["patchcore", "evaluate"],
        ["patchcore", "info"], ["patchcore", "predict"],
    ]  # fmt: skip
    reference = " ".join(shell[0])
    for option in ("--scale 0.4", "--train-fraction 0.2", "--coreset-ratio 0.1",
                   "--backbone resnet18", f"--weights {WEIGHTS}", "--top-k 1"):  # fmt: skip
        assert option in reference
    assert "--method max_f1 --calibration-fraction 0.5" in " ".join(shell[1])
    for call in ("load_visa(", "sample_fraction(", "calibrate_detector(", "evaluate_detector(",
                 "display_range(", "heatmap_picture(", "MATLAB_METRICS"):  # fmt: skip
        assert call in python
    for word in ("native resolution", "every training image", "1 %", "10 largest"):
        assert word.lower() in text.lower()


def test_every_command_and_python_block_runs(tmp_path: Path, monkeypatch) -> None:
    make_visa(tmp_path / "VisA")
    random_resnet18(tmp_path / WEIGHTS)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = code_blocks(PAGE.read_text(encoding="utf-8"))
    for lang, code in blocks:
        if lang == "bash":
            for cmd in commands(code):
                assert cmd[0] == "patchcore", cmd
                r = run(*cmd[1:])
                assert r.exit_code == 0, (cmd, r.output)
                if cmd[1] == "evaluate":
                    assert "GlobalAccuracy" in r.stdout and "FalseNegativeRate" in r.stdout
                    assert "Confusion matrix" in r.stdout
                if cmd[1] == "info":
                    assert "heatmap display range" in r.stdout
        elif lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(PAGE), "exec"), namespace)  # noqa: S102 - the page's code
    assert (tmp_path / "pcb4-reference-report" / "report.html").is_file()
    assert (tmp_path / "pcb4-report" / "report.html").is_file()
    assert (tmp_path / "pcb4-python-report" / "report.html").is_file()
    assert len(list((tmp_path / "pcb4-heatmaps").glob("*_heatmap.png"))) == 6
    assert namespace["drawn"]  # at least one outcome's heatmap picture
    assert all(Path(p).is_file() for p in namespace["drawn"].values())
