"""Pictures a user can read (#21, finding 5): ``predict --heatmaps`` draws the image beside its
overlay with region boxes and a colour bar (the overlay alone stays available); the report
shows every false positive and false negative, a colour bar by the galleries, tiles without
empty grey bands (checked in a real browser) and the calibration warnings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import data_set, link_first
from conftest import run_cli as run
from PIL import Image

from patchcore.apps import plots, report
from patchcore.apps.report_parts import GALLERY_VISIBLE
from patchcore.apps.workflow.reporting import gallery_order

SIZE = "96"
CHROMIUM = Path(os.environ.get("PATCHCORE_CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def casting(tmp_path_factory) -> Path:
    """casting subset: 6 train, 6 normal + 6 defective test images (links)."""
    src = data_set("casting")
    root = tmp_path_factory.mktemp("data") / "cast"
    link_first(src / "train" / "good", root / "train" / "good", 6)
    link_first(src / "test" / "good", root / "test" / "good", 6)
    link_first(src / "test" / "defective", root / "test" / "defective", 6)
    return root


@pytest.fixture(scope="module")
def model(casting: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.pt"
    r = run("fit", casting, "--out", path, "--image-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    r = run("calibrate", path, casting, "-q")
    assert r.exit_code == 0, r.output
    return path


def _is_jet_bar(column: np.ndarray) -> bool:
    """A column going from jet's dark red (top) to its dark blue (bottom)."""
    top, bottom = column[0].astype(int), column[-1].astype(int)
    return top[0] > 100 > top[2] and bottom[2] > 100 > bottom[0]


@pytest.mark.slow
def test_predict_heatmaps_show_image_overlay_regions_and_colour_bar(
    model: Path, casting: Path, tmp_path: Path
) -> None:
    files = sorted((casting / "test" / "defective").iterdir())  # 6: at least one flagged
    r = run("predict", model, *files, "--heatmaps", tmp_path / "p", "-f", "json", "-q")
    assert r.exit_code == 0, r.output
    for f in files:
        with Image.open(f) as src, Image.open(tmp_path / "p" / f"{f.stem}_heatmap.png") as pic:
            w, h = src.size
            arr = np.asarray(pic.convert("RGB"))
        assert arr.shape[1] > 2 * w and arr.shape[0] > h  # image | overlay | bar, a caption
        band = arr.shape[0] - h
        left = arr[band:, :w]
        assert np.abs(left.astype(int) - np.asarray(Image.open(f).convert("RGB"))).max() <= 1
        bar_cols = [x for x in range(2 * w, arr.shape[1]) if _is_jet_bar(arr[band:, x])]
        assert bar_cols, "no colour bar right of the overlay"
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    boxed = [row for row in rows if row["regions"]]
    assert boxed, "no defective casting flagged with a region"
    for row in boxed:
        arr = np.asarray(Image.open(row["heatmap"]).convert("RGB"))
        magenta = (arr[..., 0] == 255) & (arr[..., 1] == 0) & (arr[..., 2] == 255)
        assert magenta.any(), "region boxes missing"
    # the earlier picture, the overlay alone at the image's size, stays available
    r = run("predict", model, files[0], "--heatmaps", tmp_path / "o", "--heatmap-layout",
            "overlay", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    with Image.open(files[0]) as src, Image.open(next((tmp_path / "o").iterdir())) as pic:
        assert pic.size == src.size


def test_heatmap_picture_enlarges_a_thumbnail_and_labels_its_range() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    amap = rng.random((20, 20)).astype(np.float32)
    pic = plots.heatmap_picture(image, amap, (0.0, 1.0), caption="normal: score 1")
    assert pic.shape[0] >= plots.MIN_PICTURE_HEIGHT
    bar = plots.colour_bar((0.25, 0.75), 120)
    assert bar.shape[0] == 120 and _is_jet_bar(bar[:, 2])


def _tiles(folder: Path, n: int) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = plots.save_png(np.full((40, 80, 3), 100, np.uint8), folder / f"t{i}.png")
        out.append({"image_path": path, "caption": f"img {i}", "score": 2.0 + i})
    return out


def test_report_shows_every_false_positive_behind_a_switch(tmp_path: Path) -> None:
    scores = np.r_[np.linspace(3, 4, 30), np.linspace(0, 1, 10), np.linspace(3, 4, 8)]
    truth = np.r_[np.zeros(40, int), np.ones(8, int)]
    pred = scores >= 2.5
    order = gallery_order(scores, truth, pred, 6)
    assert len(order["false_positives"]) == 30 and len(order["true_positives"]) == 6
    bar = plots.colour_bar_figure((0.5, 2.5), tmp_path / "figures" / "colours.png")
    page = report.write_report(
        tmp_path,
        title="t",
        model_card={},
        metrics={"Threshold": 2.5},
        figures={},
        galleries={"false_positives": _tiles(tmp_path / "g", 30)},
        colour_bar=bar,
        warnings=["calibration AUROC is 0.51 (0.5 = chance)"],
        history=[{"time": "2026-01-01T00:00:00+00:00", "method": "max_f1", "value": 2.5}],
    ).read_text(encoding="utf-8")
    fp = page.split('id="gallery-false_positives"')[1]
    shown, hidden = fp.split("<details", 1)
    assert shown.count('class="tile"') == GALLERY_VISIBLE
    assert hidden.count('class="tile"') == 30 - GALLERY_VISIBLE
    assert "30 images" in shown and "Show the other 24" in hidden
    assert 'alt="heatmap colour scale"' in page
    warn = page.split('id="warnings"')[1].split("</section>")[0]
    assert "calibration AUROC is 0.51" in warn
    assert 'id="history"' in page and "max_f1" in page


@pytest.mark.slow
@pytest.mark.browser
def test_report_tiles_have_no_empty_bands_in_a_browser(model: Path, casting: Path, tmp_path):
    """Every gallery picture fills its tile's width and starts at the tile's top: no grey band
    above, below or beside it (the old fixed-height frames left bands)."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed")
    sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    r = run("evaluate", model, casting, "--report", tmp_path / "rep", "-q")
    assert r.exit_code == 0, r.output
    with sync.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.goto((tmp_path / "rep" / "report.html").as_uri())
        pg.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
        pg.wait_for_function("[...document.images].every(i => i.complete && i.naturalHeight)")
        gaps = pg.evaluate(
            """() => [...document.querySelectorAll('#galleries figure.tile')]
                 .filter(t => t.offsetParent !== null)
                 .map(t => { const a = t.getBoundingClientRect();
                             const i = t.querySelector('img').getBoundingClientRect();
                             return [i.top - a.top, a.width - 2 - i.width, i.height]; })"""
        )
        pg.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert gaps, "no gallery tile rendered"
    for top, side, height in gaps:
        assert top <= 1.5 and abs(side) <= 1.5 and height > 50, (top, side, height)
