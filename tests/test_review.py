"""``patchcore review``: the cache, the API, the actions, and the page's metrics (metrics.js)
against the library's (run in node; the browser test runs them in chromium)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _review_data import review_set, tiny_model

from patchcore.apps.review import ReviewSession, create_app
from patchcore.apps.review.cache import file_digest
from patchcore.core import metrics
from patchcore.core.detector import PatchCore
from patchcore.lean import record as rec

STATIC = Path(__file__).resolve().parents[1] / "src/patchcore/apps/review/static"
NODE = shutil.which("node")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    data = review_set(root)
    return root, data, tiny_model(root / "a.pt"), tiny_model(root / "b.pt", image_size=64)


def fresh(built, tmp_path) -> tuple[Path, Path]:
    """A copy of model A (the actions rewrite it) and the data."""
    _, data, a, _ = built
    model = tmp_path / "a.pt"
    shutil.copy(a, model)
    return model, data


def session_of(model: Path, data: Path) -> ReviewSession:
    s = ReviewSession(model, data)
    s.score_missing()
    job = s.wait()
    assert job.error is None
    return s


# ---------------------------------------------------------------------------- cache


def test_scores_are_cached_and_a_bad_file_is_an_error_row(built, tmp_path):
    model, data = fresh(built, tmp_path)
    s = session_of(model, data)
    names = [it.name for it in s.items]
    bad = names.index("good/zz_broken.png")
    r = s.record(s.items[bad])
    assert r["verdict"] == "error" and r["score"] is None and r["error"]
    assert list(r) == list(rec.FIELD_NAMES)
    # the cached scores are the library's scores of the same files
    det = PatchCore.load(model)
    ok = [it for it in s.items if it.name != "good/zz_broken.png"]
    direct = det.score_samples([str(it.path) for it in ok])
    cached = [s.record(it)["score"] for it in ok]
    np.testing.assert_allclose(cached, direct, rtol=1e-6)
    assert s.job.total == len(s.items)  # the broken file too: its error record is cached
    # re-opening reads the cache: nothing to score, well under the scoring time
    t0 = time.perf_counter()
    again = ReviewSession(model, data)
    assert again.missing() == 0
    assert time.perf_counter() - t0 < 5.0
    assert [again.record(it)["score"] for it in ok] == cached


def test_a_changed_file_or_model_is_rescored(built, tmp_path):
    model, data0 = fresh(built, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(data0, data, symlinks=False)
    s = session_of(model, data)
    assert s.missing() == 0
    first = data / "good" / sorted(p.name for p in (data / "good").iterdir())[0]
    other = data / "crack" / sorted(p.name for p in (data / "crack").iterdir())[0]
    first.write_bytes(other.read_bytes() + b"\0")  # same name, new bytes (still decodable)
    again = ReviewSession(model, data)
    assert again.missing() == 1
    # another model file: everything is scored again
    shutil.copy(built[3], model)
    third = ReviewSession(model, data)
    assert third.missing() == len(third.items)


# ---------------------------------------------------------------------------- API


def test_api_state_detail_and_methods_agree_with_the_library(built, tmp_path):
    from fastapi.testclient import TestClient

    model, data = fresh(built, tmp_path)
    s = session_of(model, data)
    c = TestClient(create_app(s))
    st = c.get("/api/state").json()
    items = st["items"]
    assert len(items["name"]) == len(s.items)
    pairs = zip(items["label"], items["score"], strict=True)
    y = np.array([lab for lab, v in pairs if v is not None])
    sc = np.array([v for v in items["score"] if v is not None])
    for method in metrics.THRESHOLD_METHODS:
        got = c.post("/api/threshold/choose", json={"method": method}).json()
        assert got["value"] == metrics.anomaly_threshold(y, sc, method)
    bounded = c.post("/api/threshold/choose", json={"method": "max_f1", "max_fpr": 0.0}).json()
    assert bounded["value"] == metrics.anomaly_threshold(y, sc, "max_f1", max_fpr=0.0)
    bad = c.post("/api/threshold/choose", json={"method": "best"})
    assert bad.status_code == 400 and "unknown threshold method" in bad.json()["detail"]
    # one image at a threshold of the page: the record's words and fields, verdict by judge
    i = next(k for k, lab in enumerate(items["label"]) if lab == 1)
    t = float(np.median(sc))
    d = c.get(f"/api/item/{i}", params={"threshold": t}).json()
    assert d["verdict"] == rec.judge([d["score"]], t)[0]
    assert set(rec.FIELD_NAMES) <= set(d)
    assert d["has_mask"] and c.get(f"/api/mask/{i}").status_code == 200
    if d["verdict"] == "anomalous":
        assert d["regions"], "an anomalous image shows at least its peak region"
        assert all(0 <= g["x0"] < g["x1"] <= d["width"] for g in d["regions"])
    for path in (f"/api/thumb/{i}", f"/api/image/{i}", f"/api/heat/{i}", "/", "/static/metrics.js"):
        assert c.get(path).status_code == 200, path
    e = c.get(f"/api/explain/{i}").json()
    assert e["score"] == pytest.approx(d["score"], rel=1e-5) and e["train_name"]
    assert c.get(f"/api/explain/{i}/picture").headers["content-type"] == "image/png"
    bad_row = items["name"].index("good/zz_broken.png")
    assert c.get(f"/api/thumb/{bad_row}").status_code == 404
    assert c.get(f"/api/item/{bad_row}", params={"threshold": t}).json()["verdict"] == "error"
    assert c.get("/api/item/9999", params={"threshold": t}).status_code == 404
    assert c.get(f"/api/item/{i}", params={"threshold": "nan"}).status_code == 400
    assert c.get("/api/reports/../../a.pt/x").status_code == 404


def test_save_threshold_writes_the_model_and_keeps_the_cache(built, tmp_path):
    from fastapi.testclient import TestClient

    model, data = fresh(built, tmp_path)
    s = session_of(model, data)
    c = TestClient(create_app(s))
    before = file_digest(model)
    chosen = c.post("/api/threshold/choose", json={"method": "youden"}).json()
    wrong = c.post("/api/threshold/save", json={"value": chosen["value"] + 1, "method": "youden"})
    assert wrong.status_code == 400 and "youden gives" in wrong.json()["detail"]
    assert file_digest(model) == before  # nothing written
    ok = c.post("/api/threshold/save", json={"value": chosen["value"], "method": "youden"})
    assert ok.status_code == 200, ok.text
    det = PatchCore.load(model)  # a real reload
    assert det.threshold_ == chosen["value"] and det.threshold_method_ == "youden"
    hist = det.threshold_history_  # the model's one history (calibrate writes it too)
    assert hist[-1]["method"] == "youden" and hist[-1]["data"] == str(data)
    assert hist[-1]["replaced"]["method"] == "max of training scores"
    assert det.metadata_["test_names"] == []  # nothing held out: evaluate must not claim it
    assert det.calibration_["n_normal"] + det.calibration_["n_anomalous"] == chosen["n"]
    again = ReviewSession(model, data)
    assert again.missing() == 0, "a threshold change must not rescore"
    manual = c.post("/api/threshold/save", json={"value": 1.5})
    assert PatchCore.load(model).threshold_method_ == "manual (review)", manual.text
    nan = c.post("/api/threshold/save", json={"value": "NaN"})
    assert nan.status_code in (400, 422)


def test_mark_as_normal_updates_rescores_and_leaves_them_out(built, tmp_path):
    from fastapi.testclient import TestClient

    model, data = fresh(built, tmp_path)
    s = session_of(model, data)
    c = TestClient(create_app(s))
    t = float(s.det.threshold_)
    items = c.get("/api/state").json()["items"]
    fps = [i for i, (lab, sc) in enumerate(zip(items["label"], items["score"], strict=True))
           if lab == 0 and sc is not None and sc >= t]  # fmt: skip
    assert fps, "the tiny model should flag some normal test image"
    defect = items["label"].index(1)
    refused = c.post("/api/mark-normal", json={"ids": [defect], "threshold": t})
    assert refused.status_code == 400 and "only normal images" in refused.json()["detail"]
    r = c.post("/api/mark-normal", json={"ids": fps[:1], "threshold": t})
    assert r.status_code == 200, r.text
    assert s.wait().error is None
    st = c.get("/api/state").json()
    assert st["items"]["excluded"][fps[0]] and sum(st["items"]["excluded"]) == 1
    u = st["last_update"]
    assert u["marked"] == [items["name"][fps[0]]]
    assert u["counted"] == len(s.items) - 2  # less the marked image and the broken file
    assert sum(map(sum, u["before"])) == sum(map(sum, u["after"])) == u["counted"]
    det = PatchCore.load(model)
    assert len(det.updates_) == 1 and det.metadata_["review_marked_normal"][0]["name"]
    assert st["missing"] == 0
    # the rescored scores are the updated model's
    k = next(i for i in range(len(s.items)) if i not in fps[:1] and items["score"][i] is not None)
    assert st["items"]["score"][k] == pytest.approx(
        float(det.score_samples([str(s.items[k].path)])[0]), rel=1e-6
    )
    # a marked image is no longer counted by the methods
    counted = c.post("/api/threshold/choose", json={"method": "max_f1"}).json()["n"]
    assert counted == len(s.items) - 2


def test_compare_and_export(built, tmp_path):
    from fastapi.testclient import TestClient

    model, data = fresh(built, tmp_path)
    s = session_of(model, data)
    c = TestClient(create_app(s))
    missing = c.post("/api/compare", json={"model": str(tmp_path / "none.pt"), "threshold": 1.0})
    assert missing.status_code == 400
    t = float(s.det.threshold_)
    assert c.post("/api/compare", json={"model": str(built[3]), "threshold": t}).status_code == 200
    assert s.wait().error is None
    cmp = c.get("/api/state").json()["compare"]
    det_b = PatchCore.load(built[3])
    ok = [it for it in s.items if it.name != "good/zz_broken.png"]
    y = np.array([it.label for it in ok])
    sb = det_b.score_samples([str(it.path) for it in ok])
    assert cmp["b"]["auroc"] == pytest.approx(metrics.auroc(y, sb), abs=1e-9)
    assert cmp["b"]["threshold"] == det_b.threshold_
    va = rec.judge([s.record(it)["score"] for it in ok], t) == "anomalous"
    vb = rec.judge(sb, det_b.threshold_) == "anomalous"
    assert len(cmp["disagree"]) == int((va != vb).sum())
    assert sum(map(sum, cmp["a"]["confusion"])) == len(ok)
    out = c.post("/api/export", json={"threshold": t, "method": "manual (review)"}).json()
    html = Path(out["path"]).read_text(encoding="utf-8")
    assert "False positives" in html and "GlobalAccuracy" in html and "zz_broken.png" in html
    got = c.get(out["url"].replace("api/", "/api/", 1))
    assert got.status_code == 200 and "False positives" in got.text


# ---------------------------------------------------------------------------- metrics.js


def run_js(code: str) -> object:
    if NODE is None:
        pytest.skip("node not installed (the browser test checks metrics.js in chromium)")
    script = f"const M = require({json.dumps(str(STATIC / 'metrics.js'))});\n{code}"
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_metrics_js_agrees_with_the_library():
    rng = np.random.default_rng(0)
    n = 400
    labels = (rng.random(n) < 0.35).astype(int)
    scores = np.round(rng.normal(1.0 + labels, 0.6), 2)  # rounded: ties on purpose
    types = np.where(labels == 1, rng.choice(["crack", "hole"], n), "good")
    scores_js = [None if k % 97 == 0 else float(v) for k, v in enumerate(scores)]
    keep = np.array([v is not None for v in scores_js])
    thresholds = [float(np.quantile(scores, q)) for q in (0.0, 0.1, 0.5, 0.9)] + [9.0, 1.5]
    items = {"score": scores_js, "label": labels.tolist(), "type": types.tolist(),
             "excluded": [k % 50 == 1 for k in range(n)]}  # fmt: skip
    keep &= ~np.array(items["excluded"])
    got = run_js(
        f"const items = {json.dumps(items)}; const p = M.prepare(items);"
        f"const ts = {json.dumps(thresholds)};"
        "console.log(JSON.stringify({auroc: p.roc.auroc, fpr: p.roc.fpr, tpr: p.roc.tpr,"
        " at: ts.map((t) => M.evaluateAt(p, t)), stops: M.stops(p),"
        " same: [...ts, 0.37, 1.234, 2.5].map((t) => M.evaluateAt(p, M.stops(p)[M.stopIndex(p, t)])"
        ".FalsePositives === M.evaluateAt(p, t).FalsePositives)}));"
    )
    y, s, ty = labels[keep], scores[keep], types[keep]
    assert got["auroc"] == pytest.approx(metrics.auroc(y, s), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(y, s)
    np.testing.assert_allclose(got["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(got["tpr"], tpr, atol=1e-12)
    for t, js in zip(thresholds, got["at"], strict=True):
        py = metrics.evaluate(rec.judge(s, t) == "anomalous", y, ty)
        assert js["ConfusionMatrix"] == py["ConfusionMatrix"]
        for key in (*metrics.MATLAB_METRICS, "TruePositives", "NumSamples"):
            assert js[key] == pytest.approx(py[key], abs=1e-12), (t, key)
        assert {k: v["recall"] for k, v in js["DefectTypeRecall"].items()} == pytest.approx(
            py["DefectTypeRecall"], abs=1e-12
        )
    # every stop gives one operating point: stops lie between neighbouring distinct scores
    stops = np.array(got["stops"])
    distinct = np.unique(s)
    assert stops.size == distinct.size + 1
    assert all(got["same"]), "stopIndex must give the stop with the threshold's verdicts"
    flagged = [int((s >= v).sum()) for v in stops]
    assert flagged == sorted(flagged, reverse=True) and len(set(flagged)) == len(flagged)


def test_judge_js_is_record_judge():
    values = [0.5, 1.0, 1.0000001, -2.0, None, "nan", "inf"]
    js_values = "[0.5, 1.0, 1.0000001, -2.0, null, NaN, Infinity]"
    got = run_js(f"console.log(JSON.stringify({js_values}.map((v) => M.judge(v, 1.0))));")
    py = rec.judge([v if not isinstance(v, str) else float(v) for v in values], 1.0)
    assert got == list(py)
    assert math.isfinite(1.0)


def test_router_mounts_under_a_prefix(built, tmp_path):
    """The service mounts the review under /review: page, assets and API all answer there."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from patchcore.apps.review import review_router

    model, data = fresh(built, tmp_path)
    s = session_of(model, data)
    app = FastAPI()
    app.include_router(review_router(s), prefix="/review")
    c = TestClient(app)
    page = c.get("/review/")
    assert page.status_code == 200 and 'src="static/review.js"' in page.text
    assert "://" not in page.text  # offline: nothing from another host
    for name in ("review.js", "metrics.js", "viewer.js", "panels.js", "review.css"):
        asset = c.get(f"/review/static/{name}")
        assert asset.status_code == 200 and "://" not in asset.text, name
    assert c.get("/review/static/../routes.py").status_code == 404
    assert c.get("/review/api/state").json()["data"]["count"] == len(s.items)
    assert c.get("/review", follow_redirects=False).status_code in (307, 308)


def test_the_service_serves_the_review_under_review(built, tmp_path):
    """``patchcore serve MODEL --review DATA``: the inspection page at /, the review at
    /review/ (the service's create_app mounts the review's router)."""
    from fastapi.testclient import TestClient

    from patchcore.apps.review import MOUNT, service_router
    from patchcore.apps.service import create_app as service_app
    from patchcore.apps.service.main import serve

    model, data = fresh(built, tmp_path)
    app = service_app(model, routers=[service_router(model, data)])
    with TestClient(app) as c:
        assert "patchcore inspection" in c.get("/").text
        page = c.get(f"{MOUNT}/")
        assert page.status_code == 200 and "patchcore review" in page.text
        st = c.get(f"{MOUNT}/api/state").json()
        assert st["data"]["count"] == 13 and st["model"]["path"] == str(model)
    with pytest.raises(ValueError, match="local use"):
        serve(model, review=data, token="secret")


def test_cli_review_command_runs_the_page(monkeypatch, tmp_path):
    """``patchcore review MODEL DATA`` (and ``serve --review``) call the review with the
    arguments given; a missing model is a one-line error."""
    from conftest import run_cli

    import patchcore.apps.review as page
    from patchcore.apps import service

    seen = {}
    monkeypatch.setattr(page, "run", lambda *a, **k: seen.update(args=a, kwargs=k))
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    r = run_cli("review", model, tmp_path, "--port", 9123, "--no-browser", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert seen["args"] == (model, tmp_path)
    assert seen["kwargs"] == {"host": "127.0.0.1", "port": 9123, "open_browser": False,
                              "cache_dir": None, "device": "cpu"}  # fmt: skip
    monkeypatch.setattr(service, "serve", lambda *a, **k: seen.update(serve=k))
    assert run_cli("serve", model, "--review", tmp_path).exit_code == 0
    assert seen["serve"]["review"] == tmp_path
    monkeypatch.undo()
    bad = run_cli("review", tmp_path / "none.pt", tmp_path, "--no-browser")
    assert bad.exit_code != 0 and "none.pt" in bad.output
