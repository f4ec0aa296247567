"""Tests for patchcore.apps.plots (overlays, figures) and patchcore.apps.report (HTML report)."""

from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from patchcore.apps import plots, report


def _jet(x: float) -> np.ndarray:
    return np.round(np.asarray(colormaps["jet"](x)[:3]) * 255).astype(np.uint8)


def _halves(h: int = 16, w: int = 20, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    amap = np.full((h, w), lo, dtype=np.float32)
    amap[:, w // 2 :] = hi
    return amap


# --------------------------------------------------------------------------- overlay


def test_overlay_shape_and_dtype() -> None:
    image = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    out = plots.anomaly_map_overlay(image, _halves())
    assert out.shape == (16, 20, 3)
    assert out.dtype == np.uint8


def test_overlay_colours_at_range_ends() -> None:
    image = np.zeros((16, 20), dtype=np.uint8)
    out = plots.anomaly_map_overlay(image, _halves(), display_range=(0.0, 1.0), alpha=1.0)
    np.testing.assert_array_equal(out[0, 0], _jet(0.0))  # dark blue
    np.testing.assert_array_equal(out[0, -1], _jet(1.0))  # dark red
    assert out[0, -1, 0] > 100 and out[0, -1, 2] < 20
    assert out[0, 0, 2] > 100 and out[0, 0, 0] < 20


def test_overlay_clamps_outside_display_range() -> None:
    image = np.zeros((16, 20), dtype=np.uint8)
    out = plots.anomaly_map_overlay(image, _halves(lo=-3.0, hi=5.0), (0.0, 1.0), alpha=1.0)
    np.testing.assert_array_equal(out[0, 0], _jet(0.0))
    np.testing.assert_array_equal(out[0, -1], _jet(1.0))


def test_overlay_default_range_is_map_min_max() -> None:
    image = np.zeros((16, 20), dtype=np.uint8)
    own = plots.anomaly_map_overlay(image, _halves(lo=10.0, hi=20.0), alpha=1.0)
    unit = plots.anomaly_map_overlay(image, _halves(), (0.0, 1.0), alpha=1.0)
    np.testing.assert_array_equal(own, unit)


def test_overlay_mid_value_and_alpha_blend() -> None:
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    amap = np.full((4, 4), 0.5, dtype=np.float32)
    out = plots.anomaly_map_overlay(image, amap, (0.0, 1.0), alpha=0.25)
    expected = np.round(0.75 * 200 + 0.25 * _jet(128 / 255).astype(float))
    np.testing.assert_allclose(out[0, 0], expected, atol=1)
    unchanged = plots.anomaly_map_overlay(image, amap, (0.0, 1.0), alpha=0.0)
    np.testing.assert_array_equal(unchanged, image)


def test_overlay_grey_input_becomes_rgb() -> None:
    grey = np.arange(16 * 20, dtype=np.uint8).reshape(16, 20)
    out = plots.anomaly_map_overlay(grey, _halves(), alpha=0.0)
    assert out.shape == (16, 20, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)


def test_overlay_resizes_map_to_image() -> None:
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    amap = np.tile(np.linspace(0.0, 1.0, 8, dtype=np.float32), (8, 1))  # cold left, hot right
    out = plots.anomaly_map_overlay(image, amap, (0.0, 1.0), alpha=1.0)
    assert out.shape == (32, 48, 3)
    assert out[16, -1, 0] > out[16, 0, 0]  # red grows to the right
    assert out[16, 0, 2] > out[16, -1, 2]  # blue shrinks to the right


def test_overlay_mask_outline_drawn_only_on_boundary() -> None:
    image = np.zeros((40, 40), dtype=np.uint8)
    amap = np.zeros((40, 40), dtype=np.float32)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    out = plots.anomaly_map_overlay(image, amap, (0.0, 1.0), alpha=1.0, mask=mask)
    white = np.all(out == 255, axis=2)
    assert white[10, 20] and white[20, 10] and white[29, 20] and white[11, 20]  # 2 px edge
    assert not white[20, 20]  # interior keeps the colour map
    assert not white[5, 5] and not white[9, 20]  # outside untouched
    assert white.sum() == 20 * 20 - 16 * 16
    assert not white[mask == 0].any()


def test_overlay_mask_resized_and_custom_colour() -> None:
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    mask = np.zeros((10, 10), dtype=bool)
    mask[3:7, 3:7] = True
    out = plots.anomaly_map_overlay(
        image, np.zeros((40, 40)), mask=mask, outline_color=(0, 255, 0), outline_width=1
    )
    green = np.all(out == (0, 255, 0), axis=2)
    assert green.sum() == 16 * 16 - 14 * 14
    assert green[12, 20] and not green[20, 20]


def test_overlay_handles_flat_and_nan_maps() -> None:
    image = np.zeros((8, 8), dtype=np.uint8)
    flat = plots.anomaly_map_overlay(image, np.ones((8, 8)), alpha=1.0)
    np.testing.assert_array_equal(flat[0, 0], _jet(0.0))
    amap = np.ones((8, 8))
    amap[0, 0] = np.nan
    out = plots.anomaly_map_overlay(image, amap, (0.0, 1.0), alpha=1.0)
    np.testing.assert_array_equal(out[0, 0], _jet(0.0))
    np.testing.assert_array_equal(out[1, 1], _jet(1.0))


def test_overlay_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        plots.anomaly_map_overlay(np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="display_range"):
        plots.anomaly_map_overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4)), (1.0, 0.0))
    with pytest.raises(ValueError, match="alpha"):
        plots.anomaly_map_overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        plots.anomaly_map_overlay(np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4)))


def test_save_png_round_trip(tmp_path: Path) -> None:
    array = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    path = plots.save_png(array, tmp_path / "sub" / "x.png")
    assert path == tmp_path / "sub" / "x.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), array)


# --------------------------------------------------------------------------- figures


def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 100


def test_figure_functions_write_decodable_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(20, int)]
    scores = np.r_[rng.normal(1.0, 0.2, 30), rng.normal(2.0, 0.4, 20)]
    paths = [
        plots.score_histogram(scores, labels, 1.5, tmp_path / "hist.png", title="t"),
        plots.score_histogram(scores, labels, None, tmp_path / "hist_nothr.png"),
        plots.roc_plot([0, 0.1, 0.5, 1], [0, 0.7, 0.9, 1], 0.87, tmp_path / "roc.png", (0.1, 0.7)),
        plots.confusion_matrix_plot([[28, 2], [3, 17]], tmp_path / "cm.png"),
        plots.confusion_matrix_plot(np.zeros((2, 2), int), tmp_path / "cm_empty.png"),
        plots.per_type_recall_plot(
            {"crack": 0.9, "hole": 1.0, "x": float("nan")}, tmp_path / "r.png"
        ),
        plots.per_type_recall_plot({"a": 0.4}, tmp_path / "r1.png", counts={"a": 5}, target=0.9),
    ]
    for path in paths:
        assert isinstance(path, Path)
        _assert_png(path)


def test_figure_functions_validate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2, 2"):
        plots.confusion_matrix_plot([[1, 2, 3]], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="differ"):
        plots.score_histogram([1, 2, 3], [0, 1], 1.0, tmp_path / "h.png")
    with pytest.raises(ValueError, match="differ"):
        plots.roc_plot([0, 1], [0, 0.5, 1], 0.5, tmp_path / "r.png")


def test_gallery_tile_layout() -> None:
    image = np.full((30, 40), 128, dtype=np.uint8)
    amap = np.zeros((15, 20))
    bare = plots.gallery_tile(image, amap, (0, 1), 0.2, 0.5, "c", gap=4, annotate=False)
    assert bare.shape == (30, 84, 3) and bare.dtype == np.uint8
    np.testing.assert_array_equal(bare[:, :40], 128)  # original on the left
    assert np.all(bare[:, 40:44] == 255)  # white gap
    tile = plots.gallery_tile(image, amap, (0, 1), 0.9, 0.5, "<caption>", np.ones((30, 40), bool))
    assert tile.shape[1] == 84 and tile.shape[0] > 30
    resized = plots.gallery_tile(image, amap, None, 0.9, None, "c", height=60, annotate=False)
    assert resized.shape == (60, 2 * 80 + 4, 3)


# --------------------------------------------------------------------------- report


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)


SECTIONS = (
    "Summary",
    "Image-level metrics",
    "Confusion matrix",
    "Score distribution",
    "ROC curve",
    "Recall per defect type",
    "Pixel-level localisation",
    "Galleries",
    "True positives",
    "True negatives",
    "False positives",
    "False negatives",
    "Model card",
    "Notes",
)


def _report_inputs(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "confusion_matrix": plots.confusion_matrix_plot([[5, 1], [2, 8]], out / "cm.png"),
        "score_histogram": plots.score_histogram([0.1, 0.2, 0.9], [0, 0, 1], 0.5, out / "h.png"),
        "roc": plots.roc_plot([0, 0.2, 1], [0, 0.8, 1], 0.9, out / "roc.png"),
        "per_type_recall": "recall.png",  # relative to out
    }
    plots.per_type_recall_plot({"crack": 0.8}, out / "recall.png")
    tile = np.zeros((8, 8, 3), np.uint8)
    galleries = {}
    for i, group in enumerate(
        ("true_positives", "true_negatives", "false_positives", "false_negatives")
    ):
        name = f"tiles/t #{i}.png"  # a space and a '#': must be URL-quoted
        plots.save_png(tile, out / name)
        galleries[group] = [{"image_path": name, "caption": f"img{i}", "score": 0.7}]
    galleries["false_negatives"].append(
        {"image_path": "tiles/t #0.png", "caption": "<script>alert('x')</script>", "score": 0.1}
    )
    return {
        "title": "Tiles <b>report</b>",
        "model_card": {"backbone": "wide_resnet50_2", "bank": {"size": 1000}, "layers": ["l2"]},
        "metrics": {
            "GlobalAccuracy": 0.8125,
            "MeanAccuracy": 0.8,
            "Precision": 0.888,
            "Recall": 0.8,
            "Specificity": 0.833,
            "F1Score": 0.842,
            "FalsePositiveRate": 0.167,
            "FalseNegativeRate": 0.2,
            "AUROC": 0.9,
            "Threshold": 0.5,
            "n_images": 16,
        },
        "figures": figures,
        "galleries": galleries,
        "per_type_recall": {"crack": {"recall": 0.8, "n": 10}, "hole & <gap>": 1.0},
        "pixel_metrics": {"PixelAUROC": 0.97, "AUPRO": 0.91},
        "notes": ["first note", "a < b"],
    }


def test_report_has_every_section(tmp_path: Path) -> None:
    path = report.write_report(tmp_path, **_report_inputs(tmp_path))
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")
    headings = re.findall(r"<h[23][^>]*>(.*?)</h[23]>", text, flags=re.S)
    for section in SECTIONS:
        assert any(h.startswith(section) for h in headings), section
    columns = re.findall(r'<th class="num">(\w+)</th>', text)
    assert columns[:8] == list(report.MATLAB_METRICS)
    assert ">0.8125<" in text
    assert "0.842" in text and "AUROC" in text


def test_report_escapes_caller_text(tmp_path: Path) -> None:
    text = report.write_report(tmp_path, **_report_inputs(tmp_path)).read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "Tiles &lt;b&gt;report&lt;/b&gt;" in text
    assert "hole &amp; &lt;gap&gt;" in text and "a &lt; b" in text


def test_report_references_only_existing_local_files(tmp_path: Path) -> None:
    text = report.write_report(tmp_path, **_report_inputs(tmp_path)).read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert len(parser.refs) == 4 + 5  # figures + tiles
    for ref in parser.refs:
        assert not re.match(r"^[a-z]+:|^/", ref), ref  # relative, no scheme, no CDN
        assert quote(unquote(ref), safe="/") == ref, ref  # '#' would cut the path
        assert (tmp_path / unquote(ref)).is_file(), ref
    assert "http://" not in text and "https://" not in text


def test_report_rejects_missing_or_outside_files(tmp_path: Path) -> None:
    inputs = _report_inputs(tmp_path / "r")
    missing = dict(inputs, figures={"roc": "nope.png"})
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        report.write_report(tmp_path / "r", **missing)
    outside = plots.save_png(np.zeros((4, 4), np.uint8), tmp_path / "outside.png")
    elsewhere = dict(inputs, galleries={"tp": [{"image_path": outside, "caption": "", "score": 1}]})
    with pytest.raises(ValueError, match="outside"):
        report.write_report(tmp_path / "r", **elsewhere)


def test_report_minimal_and_targets(tmp_path: Path) -> None:
    path = report.write_report(
        tmp_path,
        title="minimal",
        model_card={},
        metrics={"Recall": 0.8, "FalsePositiveRate": 0.05, "ConfusionMatrix": [[19, 1], [2, 8]]},
        figures={},
        galleries={},
        targets={"Recall": 0.9, "FalsePositiveRate": 0.1},
    )
    text = path.read_text(encoding="utf-8")
    assert "FAIL: 1 of 2 targets missed" in text
    assert '<td class="num fail"' in text and '<td class="num pass"' in text
    assert "Confusion matrix" in text  # table fallback from metrics["ConfusionMatrix"]
    assert "Pixel-level localisation" not in text and "Galleries" not in text
    for targets, match in (
        ({"speed": 1.0}, "unknown target"),
        ({"fpr": 0.1}, "unknown target metric 'fpr'"),  # no aliases
    ):
        with pytest.raises(ValueError, match=match):
            report.write_report(
                tmp_path,
                title="t",
                model_card={},
                metrics={},
                figures={},
                galleries={},
                targets=targets,
            )


def test_report_takes_a_metrics_object_and_no_aliases(tmp_path: Path) -> None:
    from patchcore.core.metrics import Metrics, evaluate

    m = Metrics.from_dict(evaluate([1, 0, 1, 0], [1, 0, 0, 0]))
    m = dataclasses.replace(m, auroc=0.75, threshold=0.5, pixel_auroc=0.93, aupro=0.81)
    text = report.write_report(
        tmp_path, title="t", model_card={}, metrics=m, figures={}, galleries={}
    ).read_text(encoding="utf-8")
    assert ">0.7500<" in text and ">0.930<" in text and ">0.810<" in text
    assert "PixelAUROC" in text and "AUPRO" in text and "NumSamples" not in text
    text = report.write_report(
        tmp_path, title="t", model_card={}, metrics={"accuracy": 0.5}, figures={}, galleries={}
    ).read_text(encoding="utf-8")
    assert "Other metrics" in text and "accuracy" in text  # not taken for GlobalAccuracy
