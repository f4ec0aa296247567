"""``POST /v1/explain``: the worst patch and the nearest normal training patch, over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import data_set
from fastapi.testclient import TestClient

from patchcore.apps.service import create_app
from patchcore.core.detector import PatchCore
from patchcore.core.explain import NO_PROVENANCE
from patchcore.core.images import read_image


@pytest.fixture(scope="module")
def files() -> dict[str, list[Path]]:
    root = data_set("casting")
    return {
        "train": sorted((root / "train" / "good").iterdir())[:4],
        "bad": sorted((root / "test" / "defective").iterdir())[:2],
    }


@pytest.fixture(scope="module")
def saved(files, tmp_path_factory) -> tuple[Path, PatchCore]:
    det = PatchCore(image_size=128, coreset_ratio=0.1, progress=False).fit(files["train"])
    det.set_threshold(float(np.median(det.score_samples(files["bad"]))))
    return det.save(tmp_path_factory.mktemp("m") / "m.pt"), det


def client_for(path: Path) -> TestClient:
    c = TestClient(create_app(path))
    c.__enter__()
    end = time.monotonic() + 30
    while c.get("/readyz").status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.05)
    return c


def test_explain_answers_what_the_library_does(saved, files) -> None:
    path, det = saved
    c = client_for(path)
    try:
        for f in files["bad"]:
            r = c.post("/v1/explain", files={"file": (f.name, f.read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
            body = r.json()
            [e] = det.explain([read_image(f)])
            assert body["score"] == pytest.approx(e.score, rel=1e-6)
            assert body["distance"] == pytest.approx(e.distance, rel=1e-6)
            assert body["verdict"] == ("anomalous" if e.score >= det.threshold_ else "normal")
            b = body["worst_patch"]
            assert (b["top"], b["left"], b["bottom"], b["right"]) == e.box
            nn = body["nearest"]
            assert nn["bank_row"] == e.bank_row and nn["training_image"] == e.train_index
            assert nn["training_file"] == Path(e.train_name).name  # no server folders
            assert nn["training_file"] in {p.name for p in files["train"]}
            assert 0 <= nn["box"]["top"] < nn["box"]["bottom"] <= 300
            assert body["image"] == f.name and body["note"] is None
            assert body["normalized_score"] == pytest.approx(float(det.normalize(e.score)))
            assert (body["width"], body["height"]) == (300, 300) and body["map_max"] is None
        raw = c.post("/v1/explain", content=files["bad"][0].read_bytes())
        assert raw.status_code == 200 and raw.json()["image"] == "image #0"
        bad = c.post("/v1/explain", content=b"not an image")
        assert bad.status_code == 400 and bad.json()["verdict"] == "error"
        assert "/v1/explain" in c.get("/openapi.json").json()["paths"]
    finally:
        c.__exit__(None, None, None)


def test_explain_without_provenance_says_so(saved, files, tmp_path: Path) -> None:
    _, det = saved
    det = PatchCore.load(saved[0])
    det.state_.provenance = None
    c = client_for(det.save(tmp_path / "old.pt"))
    try:
        r = c.post("/v1/explain", content=files["bad"][0].read_bytes())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["note"] == NO_PROVENANCE and body["nearest"]["training_image"] is None
        assert body["nearest"]["box"] is None and np.isfinite(body["distance"])
    finally:
        c.__exit__(None, None, None)
