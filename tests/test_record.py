"""The one inspection record and its rule (patchcore.lean.record), and PatchCore.inspect."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from patchcore.lean import record as rec
from patchcore.lean.regions import label_regions
from patchcore.lean.writers import RecordWriter


def test_judge_is_score_at_or_above_threshold() -> None:
    got = rec.judge([0.5, 1.0, 1.5, float("nan"), None, float("inf")], 1.0)
    assert list(got) == ["normal", "anomalous", "anomalous", "error", "error", "error"]
    assert list(rec.judge([0.5, 2.0], None)) == [None, None]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "1e9", True, [1.0]])
def test_a_threshold_that_is_not_a_finite_number_refuses_every_verdict(bad: object) -> None:
    with pytest.raises(rec.NonFiniteScoreError, match="threshold"):
        rec.judge([1.0], bad)


def test_nonfinite_score_or_map_is_an_error_record_never_normal() -> None:
    m = np.zeros((20, 20), np.float32)
    r = rec.inspection("a.png", 0, float("nan"), threshold=1.0, anomaly_map=m)
    assert r.verdict == "error" and r.score is None and "nan" in r.error
    m[3, 3] = np.nan
    r = rec.inspection("a.png", 0, 0.1, threshold=1.0, anomaly_map=m)
    assert r.verdict == "error" and "NaN" in r.error


def _peaked(h: int = 40, w: int = 50, at: tuple[int, int] = (10, 30), top: float = 2.0):
    y, x = np.mgrid[0:h, 0:w]
    return (top * np.exp(-((y - at[0]) ** 2 + (x - at[1]) ** 2) / 20.0)).astype(np.float32)


def test_record_fields_map_maximum_and_normalised_score() -> None:
    m = _peaked()
    mapping = {"kind": "piecewise_linear", "low": 0.0, "threshold": 1.0, "high": 3.0}
    r = rec.inspection(
        "a.png", 4, 2.0, threshold=1.0, normalization_map=mapping, anomaly_map=m, region_cut=1.0
    )
    assert (r.verdict, r.index, r.width, r.height) == ("anomalous", 4, 50, 40)
    assert (r.map_max_x, r.map_max_y) == (30, 10) and r.map_max == pytest.approx(2.0)
    assert r.normalized_score == pytest.approx(0.75)
    assert r.regions == tuple(label_regions(m, 1.0))
    assert len(r.regions) == 1 and r.region_threshold == 1.0
    d = rec.as_dict(r)
    assert tuple(d) == rec.FIELD_NAMES
    json.dumps(d)


def test_an_anomalous_record_always_shows_a_region_and_a_normal_one_none() -> None:
    m = _peaked(top=0.5)  # every pixel below the cut
    r = rec.inspection("a.png", 0, 2.0, threshold=1.0, anomaly_map=m, region_cut=1.0)
    assert r.verdict == "anomalous" and len(r.regions) >= 1
    peak = r.regions[0]
    assert (peak.peak_x, peak.peak_y) == (30, 10) and peak.area >= 16
    hot = _peaked(top=5.0)  # a normal verdict hides the regions the map would have
    r = rec.inspection("b.png", 1, 0.5, threshold=1.0, anomaly_map=hot, region_cut=1.0)
    assert r.verdict == "normal" and r.regions == ()


def test_a_one_pixel_spike_still_gives_an_anomalous_image_a_region() -> None:
    m = np.zeros((30, 30), np.float32)
    m[5, 5] = 1.0
    m[20, 20] = 0.9
    r = rec.inspection("a.png", 0, 2.0, threshold=1.0, anomaly_map=m, region_cut=5.0)
    assert len(r.regions) == 1 and (r.regions[0].peak_x, r.regions[0].peak_y) == (5, 5)


def test_display_range_rule() -> None:
    assert rec.display_range([1.0, 3.0], 2.0) == (1.0, 3.0)
    assert rec.display_range(None, 2.0) == (1.0, 2.5)
    assert rec.display_range([3.0, 1.0], 2.0) == (1.0, 2.5)  # not increasing: ignored
    assert rec.display_range(None, None) is None


def test_writers_derive_every_format_from_the_fields() -> None:
    lines: list[str] = []
    w = RecordWriter("csv", lines.append, extra=("heatmap",))
    good = rec.inspection("a.png", 0, 2.0, threshold=1.0, anomaly_map=_peaked(), region_cut=1.0)
    bad = rec.error_record("b.png", 1, "damaged", threshold=1.0)
    w.write(good, heatmap="a_heatmap.png")
    w.write(bad)
    assert lines[0].split(",") == [*rec.FIELD_NAMES, "heatmap"]
    assert lines[1].startswith("a.png,0,anomalous,2.0,")
    assert lines[2].startswith("b.png,1,error,,")
    lines.clear()
    w = RecordWriter("json", lines.append)
    w.write(good)
    assert json.loads(lines[0])["regions"][0]["peak_x"] == 30
    lines.clear()
    w = RecordWriter("table", lines.append)
    w.write(bad)
    assert lines[1].startswith("error") and "(damaged)" in lines[1]


def test_arrow_schema_has_every_field() -> None:
    pa = pytest.importorskip("pyarrow")
    schema = rec.arrow_schema([("worker", pa.string())])
    assert schema.names == [*rec.FIELD_NAMES, "worker"]
    r = rec.inspection("a.png", 0, 2.0, threshold=1.0, anomaly_map=_peaked(), region_cut=1.0)
    table = pa.Table.from_pylist([{**rec.as_dict(r), "worker": "w"}], schema=schema)
    assert table.column("regions").to_pylist()[0][0]["peak_x"] == 30


def test_detector_inspect_records_match_its_scores_and_maps(toy_images) -> None:
    from patchcore import PatchCore

    train, good, bad = toy_images
    det = PatchCore(weights=None, image_size=64, progress=False).fit(train)
    scores = det.score_samples(good + bad)
    det.set_threshold(float(np.median(scores)))
    records = det.inspect([*good, *bad, "missing.png"])
    assert [r.index for r in records] == list(range(len(scores) + 1))
    for r, s in zip(records, scores, strict=False):
        assert r.score == s
        assert r.verdict == ("anomalous" if s >= det.threshold_ else "normal")
        assert r.normalized_score == pytest.approx(float(det.normalize(s)))
        assert (r.width, r.height) == (96, 96)
        assert (len(r.regions) > 0) == (r.verdict == "anomalous")
    assert records[-1].verdict == "error" and "no such file" in records[-1].error
    assert math.isnan(float(det.score(["missing.png"], on_error="skip").scores[0]))
