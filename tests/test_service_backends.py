"""One service over two backends (issues #20, #25): the same routes, answers, limits, token
handling, readiness and errors for the torch detector and the torch-free runtime export.

Every check runs on both (``backend`` is ``"torch"`` or ``"runtime"``); the toy detector and
its ONNX export come from ``_service_models`` (made once per session).
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from _service_models import png, toy_detector, toy_export, toy_images
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx2
    from fastapi.testclient import TestClient

from patchcore.apps.service import RuntimeBackend, create_app
from patchcore.lean import record

pytestmark = pytest.mark.slow
BACKENDS = ("torch", "runtime")
SRC = Path(__file__).resolve().parents[1] / "src"
PNG = {"Content-Type": "image/png"}


def model_of(backend: str):  # noqa: ANN201
    return toy_detector() if backend == "torch" else toy_export()


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, client.get("/readyz").json()
        time.sleep(0.05)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def client(backend):
    with TestClient(create_app(model_of(backend), token="s3cret")) as c:
        wait_ready(c)
        c.headers["Authorization"] = "Bearer s3cret"
        yield c


def flat_png(width: int, height: int, value: int = 128) -> bytes:
    """A single-colour PNG: a few KB however many pixels it declares."""
    buf = io.BytesIO()
    Image.new("L", (width, height), value).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------- the answer is the record


def test_the_answer_is_the_record_with_the_extras_after_it(client, backend):
    _, good, bad = toy_images()
    det = toy_detector()
    for image in good[:1] + bad[:1]:
        r = client.post("/v1/inspect", files={"file": ("part.png", png(image), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert list(body) == [*record.FIELD_NAMES, "timing", "backend", "heatmap_url"]
        want = det.inspect([image])[0]
        assert body["score"] == pytest.approx(want.score, rel=1e-4)
        assert body["verdict"] == want.verdict in ("anomalous", "normal")
        assert body["normalized_score"] == pytest.approx(want.normalized_score, abs=1e-4)
        assert (body["image"], body["index"], body["width"], body["height"]) == (
            "part.png",
            0,
            96,
            96,
        )
        assert (body["map_max_x"], body["map_max_y"]) == (want.map_max_x, want.map_max_y)
        assert len(body["regions"]) == len(want.regions)
        if body["regions"]:
            assert body["regions"][0]["x0"] == want.regions[0].x0
        assert body["region_threshold"] == pytest.approx(want.region_threshold, rel=1e-6)
        assert body["backend"] == ("torch" if backend == "torch" else "onnxruntime")


def test_both_backends_give_the_same_verdicts_and_regions():
    _, good, bad = toy_images()
    files = [("files", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(good + bad)]
    answers = {}
    for backend in BACKENDS:
        with TestClient(create_app(model_of(backend))) as c:
            wait_ready(c)
            r = c.post("/v1/inspect/batch", files=files)
            assert r.status_code == 200, r.text
            answers[backend] = r.json()
    a, b = (answers[k]["results"] for k in BACKENDS)
    assert [x["verdict"] for x in a] == [x["verdict"] for x in b]
    assert {x["verdict"] for x in a} == {"anomalous", "normal"}
    np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], rtol=1e-4)
    for x, y in zip(a, b, strict=True):
        assert [r["x0"] for r in x["regions"]] == [r["x0"] for r in y["regions"]]
    assert answers["torch"]["anomalous"] == answers["runtime"]["anomalous"] > 0


def test_a_refused_image_is_an_error_record(client):
    r = client.post("/v1/inspect", files={"file": ("notes.png", b"not an image", "image/png")})
    assert r.status_code == 400
    body = r.json()
    assert body["verdict"] == "error" and body["image"] == "notes.png" and body["score"] is None
    assert "not an image" in body["error"] and body["detail"] == f"notes.png: {body['error']}"


def test_heatmap_png_headers_follow_the_record(client):
    _, _, bad = toy_images()
    r = client.post("/v1/inspect?heatmap=png", content=png(bad[0]))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-patchcore-verdict"] in ("anomalous", "normal")
    assert float(r.headers["x-patchcore-map-max"]) > 0
    assert r.headers["x-patchcore-image"] == "image #0"
    assert Image.open(io.BytesIO(r.content)).size == (96, 96)


# ---------------------------------------------------------------------- same answers, same input


@pytest.mark.parametrize(
    "case",
    ["text/plain body", "field not named file", "lowercase bearer", "23 MiB", "aspect 50:1"],
)
def test_the_same_input_gets_the_same_answer_on_both(client, case):
    """The issue's table: the two services answered each of these differently."""
    _, good, _ = toy_images()
    data = png(good[0])
    if case == "text/plain body":
        r = client.post("/v1/inspect", content=data, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "Content-Type" in r.json()["detail"]
    elif case == "field not named file":
        r = client.post("/v1/inspect", files={"image": ("a.png", data, "image/png")})
        assert r.status_code == 200 and r.json()["image"] == "a.png"
    elif case == "lowercase bearer":
        r = client.get("/v1/model", headers={"Authorization": "bearer s3cret"})
        assert r.status_code == 200
    elif case == "23 MiB":
        r = client.post("/v1/inspect", content=b"\0" * (23 * 2**20), headers=PNG)
        assert r.status_code == 413 and "max_request_bytes" in r.json()["detail"]
    else:
        r = client.post("/v1/inspect", content=flat_png(8, 400), headers=PNG)
        assert r.status_code == 413 and "aspect ratio of 50:1" in r.json()["detail"]


def test_readiness_and_open_routes(client):
    r = client.get("/readyz", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["ready"] is True
    for path in ("/healthz", "/docs", "/openapi.json", "/"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200, path


def test_docs_and_schema_name_nothing_about_the_model(client):
    """Open pages: /docs (no CDN) and /openapi.json give no backbone, threshold, export path
    or library version (the runtime service's schema carried the package version)."""
    from patchcore.lean.util import package_version

    docs = client.get("/docs", headers={"Authorization": ""})
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text
    schema = client.get("/openapi.json", headers={"Authorization": ""}).text
    threshold = repr(float(toy_detector().threshold_))
    for word in ("efficientnet", threshold, str(toy_export()), package_version()):
        assert word not in schema, word


def test_the_model_card_is_behind_the_token(client, backend):
    assert client.get("/v1/model", headers={"Authorization": ""}).status_code == 401
    assert client.get("/v1/model", headers={"Authorization": "Bearer nope"}).status_code == 401
    card = client.get("/v1/model").json()
    assert card["backbone"] == toy_detector().backbone and card["image_size"] == 64
    assert card["threshold"] == pytest.approx(toy_detector().threshold_, rel=1e-6)
    assert card["bank_size"] == toy_detector().memory_bank_.shape[0]
    assert card["limits"]["max_batch_pixels"] == 50_000_000 and card["token_required"]
    assert "_root" not in card  # no server paths
    lo, hi = card["display_range"]
    assert (lo, hi) == pytest.approx((0.5 * card["threshold"], 1.25 * card["threshold"]))


def test_explain_on_the_runtime_says_it_cannot(client, backend):
    _, _, bad = toy_images()
    r = client.post("/v1/explain", content=png(bad[0]), headers={"Content-Type": "image/png"})
    if backend == "torch":
        assert r.status_code == 200 and list(r.json())[: len(record.FIELD_NAMES)] == list(
            record.FIELD_NAMES
        )
    else:
        assert r.status_code == 501 and "provenance" in r.json()["detail"]


# ---------------------------------------------------------------------- limits before the work


def test_the_batch_pixel_budget_refuses_before_decoding(client):
    """16 single-colour 5000x5000 PNGs (1.3 MB) cost 3.5 GB and 25-30 s before the budget."""
    big = flat_png(5000, 5000)
    files = [("files", (f"{i}.png", big, "image/png")) for i in range(16)]
    t = time.perf_counter()
    r = client.post("/v1/inspect/batch", files=files)
    assert r.status_code == 413 and "max_batch_pixels" in r.json()["detail"], r.text
    assert time.perf_counter() - t < 5.0


def test_a_huge_single_colour_image_is_refused_from_its_header(client):
    for data, words in ((flat_png(7000, 7000), "max_pixels"), (flat_png(8, 3_000_000), "aspect")):
        t = time.perf_counter()
        r = client.post("/v1/inspect", content=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and words in r.json()["detail"]
        assert time.perf_counter() - t < 2.0


def test_a_multipart_upload_is_never_spooled_to_disk(client, monkeypatch):
    """The runtime service's request.form() spooled every file part over 1 MB to /tmp."""
    import tempfile

    import starlette.formparsers

    spooled = []

    class Recorder(tempfile.SpooledTemporaryFile):
        def __init__(self, *args, **kwargs) -> None:
            spooled.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Recorder)
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", Recorder)
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    data = png(noise)
    assert len(data) > 3 * 2**20
    r = client.post("/v1/inspect", files={"file": ("noise.png", data, "image/png")})
    assert r.status_code == 200, r.text
    assert spooled == []


def test_scoring_runs_off_the_event_loop(backend):
    """The runtime service scored on its event loop: /healthz waited 7.8 s behind a 7000^2."""
    app = create_app(model_of(backend), workers=1)
    svc = app.state.service
    _, good, _ = toy_images()
    with TestClient(app) as c:
        wait_ready(c)
        real = svc.backend.inspect
        entered = threading.Event()

        def slow(images):  # noqa: ANN001, ANN202
            entered.set()
            time.sleep(3.0)
            return real(images)

        svc.backend.inspect = slow
        done: list = []
        t = threading.Thread(
            target=lambda: done.append(c.post("/v1/inspect", content=png(good[0])))
        )
        t.start()
        assert entered.wait(10)
        t0 = time.perf_counter()
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert time.perf_counter() - t0 < 1.0
        t.join(30)
        assert done[0].status_code == 200


# ---------------------------------------------------------------------- readiness, start-up


def test_an_export_is_loaded_in_the_background_and_checked(tmp_path):
    export = toy_export()
    with TestClient(create_app(export)) as c:
        wait_ready(c)
        assert c.get("/v1/model").json()["backend"] == "onnxruntime"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in export.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    onnx = broken / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"\0" * 10)
    with TestClient(create_app(broken)) as c:
        end = time.monotonic() + 30
        while (body := c.get("/readyz").json()).get("reason") == "loading":
            assert time.monotonic() < end
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 503 and "SHA-256" in body["reason"]
        assert c.post("/v1/inspect", content=b"x").status_code == 503
    with pytest.raises(FileNotFoundError, match="no such export folder"):
        RuntimeBackend(tmp_path / "missing")


def test_an_export_without_a_threshold_is_refused(tmp_path):
    import json

    from patchcore.lean.manifest import digest

    folder = tmp_path / "nothr"
    folder.mkdir()
    for f in toy_export().iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    manifest = folder / "patchcore-export.json"
    info = json.loads(manifest.read_text())
    info.update(threshold=None, normalization=None, normalization_source=None)
    info.update(region_threshold=None)
    info["digest"] = digest(info)  # sealed again: an uncalibrated export
    manifest.write_text(json.dumps(info))
    backend = RuntimeBackend(folder)
    # refused by the service ("has no threshold, so it cannot give verdicts") or, where the
    # manifest's fields are checked against each other, already by the runtime
    with pytest.raises(ValueError, match="threshold"):
        backend.load()
    with pytest.raises(TypeError, match="fixed at export"):
        create_app(folder, threshold=1.0)


def test_the_service_package_imports_without_torch():
    """The lean distribution ships the service: it must load (and serve an export) without
    torch or matplotlib."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'matplotlib'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fastapi.testclient import TestClient\n"
        "from patchcore.apps.service import create_app\n"
        f"with TestClient(create_app({str(toy_export())!r})) as c:\n"
        "    import time\n"
        "    for _ in range(600):\n"
        "        if c.get('/readyz').status_code == 200: break\n"
        "        time.sleep(0.05)\n"
        "    print(c.post('/v1/inspect?heatmap=png', content=open(sys.argv[1], 'rb').read(),\n"
        "                 headers={'Content-Type': 'image/png'}).headers['x-patchcore-verdict'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib')))\n"
    )
    _, good, _ = toy_images()
    image = Path(toy_export()).parent / "good.png"
    image.write_bytes(png(good[0]))
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(image)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    verdict, modules = out.stdout.strip().splitlines()
    assert verdict in ("anomalous", "normal") and modules == "[]"


def test_a_bad_limit_or_option_is_named(backend):
    with pytest.raises(TypeError, match="unknown service limit.*max_pixel\\b"):
        create_app(model_of(backend), max_pixel=10)
    with pytest.raises(ValueError, match="client_upload_slots must be an integer >= 1, got 0"):
        create_app(model_of(backend), client_upload_slots=0)
    if backend == "runtime":
        with pytest.raises(TypeError, match="give the threshold"):
            create_app(RuntimeBackend(toy_export()), threshold=1.0)


def test_batch_logs_each_refused_image_once(client, caplog):
    _, good, _ = toy_images()
    files = [
        ("files", ("a.png", png(good[0]), "image/png")),
        ("files", ("b.png", zlib.compress(b"x"), "image/png")),
    ]
    with caplog.at_level(logging.WARNING, logger="patchcore.apps.service"):
        r = client.post("/v1/inspect/batch", files=files)
    body = r.json()
    assert r.status_code == 200 and body["errors"] == 1 and body["count"] == 2
    assert [x["status"] for x in body["results"]] == [200, 400]
    assert len([x for x in caplog.records if x.name == "patchcore.apps.service"]) == 1
