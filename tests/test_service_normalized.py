"""The service's normalised score and the conformal calibration facts (tiny casting model)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
from conftest import data_set

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx2
    from fastapi.testclient import TestClient

from patchcore.apps.service import STATIC_DIR, create_app
from patchcore.core.detector import PatchCore


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = data_set("casting")
    train = sorted((root / "train" / "good").iterdir())
    det = PatchCore(image_size=96, coreset_ratio=0.1, progress=False).fit(train[:4])
    det.calibrate_normal(train[4:11], max_fpr=0.25)  # 7 held-out normals: rank 6
    path = det.save(tmp_path_factory.mktemp("m") / "tiny.pt")
    bad = sorted((root / "test" / "defective").iterdir())[:1]
    good = sorted((root / "test" / "good").iterdir())[:1]
    with TestClient(create_app(path)) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        yield client, PatchCore.load(path), good + bad


def test_inspect_returns_the_normalised_score(served):
    client, det, images = served
    for p in images:
        r = client.post("/v1/inspect", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["normalized_score"] == pytest.approx(float(det.normalize(body["score"])))
        assert (body["normalized_score"] >= 0.5) == (body["verdict"] == "anomalous")
    r = client.post("/v1/inspect?heatmap=png", content=Path(images[0]).read_bytes())
    assert float(r.headers["X-Patchcore-Normalized-Score"]) == pytest.approx(
        float(det.normalize(float(r.headers["X-Patchcore-Score"])))
    )


def test_model_card_and_page_show_method_n_and_mapping(served):
    client, det, _ = served
    card = client.get("/v1/model").json()
    assert card["threshold_method"] == "conformal"
    assert (card["calibration"]["n"], card["calibration"]["rank"]) == (7, 6)
    assert card["normalization"] == det.normalization_
    js = (STATIC_DIR / "app.js").read_text()
    assert "normalized_score" in js and "cal.n" in js
    assert 'id="normalized"' in client.get("/").text
