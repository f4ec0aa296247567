"""API tests of the inspection service, on a tiny real model (efficientnet-lite0, 4 images)."""

from __future__ import annotations

import copy
import io
import logging
import re
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import data_set
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx2
    from fastapi.testclient import TestClient

from patchcore.apps.service import STATIC_DIR, InputError, ServiceLimits, create_app, decode_image
from patchcore.core.detector import PatchCore
from patchcore.core.images import read_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "casting"


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def casting() -> dict[str, list[Path]]:
    data_set("casting")
    return {
        "train": sorted((DATA / "train" / "good").iterdir())[:4],
        "good": sorted((DATA / "test" / "good").iterdir())[:3],
        "bad": sorted((DATA / "test" / "defective").iterdir())[:3],
    }


@pytest.fixture(scope="session")
def model(casting, tmp_path_factory) -> tuple[Path, PatchCore, dict[str, float]]:
    """A saved tiny model with a threshold between its test scores; library scores by name."""
    det = PatchCore(
        backbone="efficientnet-lite0", image_size=128, coreset_ratio=0.1, progress=False
    ).fit(casting["train"])
    tests = casting["good"] + casting["bad"]
    scores = det.score_samples(tests)
    det.set_threshold(float(np.median(scores)), method="median of test scores")
    path = det.save(tmp_path_factory.mktemp("model") / "tiny.pt")
    return (
        path,
        PatchCore.load(path),
        {p.name: float(s) for p, s in zip(tests, scores, strict=True)},
    )


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, client.get("/readyz").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model[0], heatmap_store_items=3)) as c:
        wait_ready(c)
        yield c


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but carries a few bytes of pixels (an image bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def service_logs(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "patchcore.apps.service"]


# ---------------------------------------------------------------------- endpoints


def test_health_and_ready(client):
    assert client.get("/healthz").json()["status"] == "ok"
    body = client.get("/readyz").json()
    assert body["ready"] is True and body["capacity"] == ServiceLimits().workers + 8


def test_model_card(client, model):
    card = client.get("/v1/model").json()
    assert card["backbone"] == "efficientnet-lite0"
    assert card["image_size"] == 128
    assert card["bank_size"] == model[1].memory_bank_.shape[0]
    assert card["threshold"] == pytest.approx(model[1].threshold_)
    assert card["threshold_method"] == "median of test scores"
    assert card["patchcore_version"] and card["format_version"] == 2
    assert card["model_file"] == "tiny.pt"
    assert card["limits"]["heatmap_store_items"] == 3


def test_inspect_multipart_matches_the_library(client, model, casting):
    _, det, _ = model
    for path in casting["good"][:1] + casting["bad"][:1]:
        r = client.post("/v1/inspect", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        image = read_image(path)
        amap = det.anomaly_map(image)
        assert body["score"] == pytest.approx(model[2][path.name], abs=1e-5)
        assert body["threshold"] == pytest.approx(det.threshold_)
        anomalous = body["score"] >= body["threshold"]
        assert body["verdict"] == ("anomalous" if anomalous else "normal")
        assert (body["height"], body["width"]) == image.shape[:2]
        assert body["map_max"] == pytest.approx(float(amap.max()), rel=1e-5)
        assert amap[body["map_max_y"], body["map_max_x"]] == pytest.approx(
            float(amap.max()), rel=1e-5
        )
        assert body["image"] == path.name and body["index"] == 0 and body["error"] is None
        assert body["backend"] == "torch"
        t = body["timing"]
        assert 0 <= t["inference_ms"] <= t["total_ms"]


def test_both_verdicts_occur(client, casting):
    verdicts = {
        client.post("/v1/inspect", content=p.read_bytes()).json()["verdict"]
        for p in casting["good"] + casting["bad"]
    }
    assert verdicts == {"anomalous", "normal"}


@pytest.mark.parametrize("ctype", ["image/jpeg", "application/octet-stream", None])
def test_inspect_raw_body(client, model, casting, ctype):
    path = casting["bad"][1]
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post("/v1/inspect", content=path.read_bytes(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(model[2][path.name], abs=1e-5)
    assert r.json()["image"] == "image #0"


def test_inspect_grey_png_is_scored_like_the_array(client, model):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (70, 90), dtype=np.uint8)
    r = client.post("/v1/inspect", content=png_bytes(grey), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    assert r.json()["score"] == pytest.approx(float(model[1].score_samples([grey])[0]), abs=1e-5)
    assert (r.json()["width"], r.json()["height"]) == (90, 70)


def test_heatmap_png(client, casting):
    path = casting["bad"][0]
    image = read_image(path)
    r = client.post("/v1/inspect?heatmap=png", content=path.read_bytes())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(r.content)))
    assert overlay.shape == (*image.shape[:2], 3)
    assert r.headers["x-patchcore-verdict"] in ("anomalous", "normal")
    assert float(r.headers["x-patchcore-score"]) > 0
    # alpha=0 is the image itself, alpha=1 the colour map alone: the blend is really there
    plain = client.post("/v1/inspect?heatmap=png&alpha=0", content=path.read_bytes())
    plain_rgb = np.asarray(Image.open(io.BytesIO(plain.content)))
    expected = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    np.testing.assert_array_equal(plain_rgb, expected)
    assert np.abs(overlay.astype(int) - expected).mean() > 5


def test_bad_query_gets_a_one_line_422(client, caplog):
    with caplog.at_level(logging.WARNING, logger="patchcore.apps.service"):
        r = client.post("/v1/inspect?heatmap=png&alpha=2", content=b"x")
    assert r.status_code == 422
    assert r.json()["detail"].startswith("invalid request: alpha: ")
    assert len(service_logs(caplog)) == 1
    r = client.post("/v1/inspect/batch?heatmap=png", files={"f": ("a.png", b"x")})
    assert r.status_code == 422 and "heatmap" in r.json()["detail"]


def test_heatmap_url_and_bounded_store(client, casting):
    urls = []
    for path in casting["good"] + casting["bad"][:1]:  # 4 inspections, store keeps 3
        r = client.post("/v1/inspect?heatmap=url", content=path.read_bytes())
        assert r.status_code == 200
        urls.append(r.json()["heatmap_url"])
    assert all(re.fullmatch(r"/v1/heatmaps/[\w-]{16}", u) for u in urls)
    assert len(set(urls)) == 4
    latest = client.get(urls[-1] + "?alpha=1")
    assert latest.status_code == 200 and latest.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(latest.content)).size == (300, 300)
    gone = client.get(urls[0])
    assert gone.status_code == 404 and "evicted" in gone.json()["detail"]
    assert client.get("/v1/heatmaps/nonsense").status_code == 404


def test_batch(client, model, casting, caplog):
    paths = [casting["good"][0], casting["bad"][0]]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files.insert(1, ("files", ("notes.txt", b"not an image", "text/plain")))
    with caplog.at_level(logging.WARNING, logger="patchcore.apps.service"):
        r = client.post("/v1/inspect/batch?heatmap=url", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["count"], body["errors"]) == (3, 1)
    assert [it["index"] for it in body["results"]] == [0, 1, 2]
    ok = [it for it in body["results"] if it["status"] == 200]
    assert [it["image"] for it in ok] == [p.name for p in paths]
    for it in ok:
        assert it["score"] == pytest.approx(model[2][it["image"]], abs=1e-5)
        assert it["heatmap_url"].startswith("/v1/heatmaps/")
    bad = body["results"][1]
    assert bad["status"] == 400 and "not an image" in bad["error"] and bad["score"] is None
    assert bad["verdict"] == "error" and bad["image"] == "notes.txt"
    assert body["anomalous"] == sum(it["verdict"] == "anomalous" for it in ok)
    assert body["anomalous"] + body["normal"] + body["errors"] == body["count"]
    assert len(service_logs(caplog)) == 1


def test_batch_request_errors(model, casting):
    one = casting["good"][0].read_bytes()
    with TestClient(create_app(model[1], max_batch_images=2)) as c:
        wait_ready(c)
        r = c.post("/v1/inspect/batch", files=[("files", (f"{i}.jpg", one)) for i in range(3)])
        assert r.status_code == 413 and "max_batch_images" in r.json()["detail"]
        r = c.post("/v1/inspect/batch", content=one, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 415
        r = c.post("/v1/inspect/batch", data={"note": "text"}, files=[("x", ("e.png", b""))])
        assert r.status_code == 200 and r.json()["results"][0]["status"] == 400
        assert "empty" in r.json()["results"][0]["error"]
        r = c.post(
            "/v1/inspect/batch",
            content=b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 400 and "no file parts" in r.json()["detail"]


def test_docs_and_openapi(client, monkeypatch):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    assert "'/openapi.json'" in docs.text
    assert not re.search(r"""(src|href|url)[=:] *["']?(https?:)?//""", docs.text)  # offline
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', docs.text):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    # only the three files the page needs: the bundle's own index.html points at a demo online
    assert client.get("/docs/assets/index.html").status_code == 404
    assert client.get("/docs/assets/..%2F..%2F__init__.py").status_code == 404
    assert client.get("/redoc").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/inspect", "/v1/inspect/batch", "/v1/model", "/healthz", "/readyz"):
        assert p in paths
    # without the swagger-ui-bundle package: a plain self-contained table of the routes
    from patchcore.apps.service.routers import docs as docs_router

    monkeypatch.setattr(docs_router, "swagger_ui_dir", lambda: None)
    plain = client.get("/docs")
    assert plain.status_code == 200 and "/v1/inspect/batch" in plain.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", plain.text)


def test_docs_and_schema_say_nothing_about_the_model(model):
    """/docs and /openapi.json are open, so they name no backbone, threshold, file or version
    (the runtime service's schema gave the library version to anyone)."""
    from patchcore.lean.util import package_version

    with TestClient(create_app(model[1], token="s3cret")) as c:
        wait_ready(c)
        schema = c.get("/openapi.json")
        assert schema.status_code == 200 and c.get("/docs").status_code == 200
        text = schema.text
        for secret in ("efficientnet", repr(float(model[1].threshold_)), "tiny.pt"):
            assert secret not in text, secret
        assert schema.json()["info"]["version"] == "1" != package_version()
        assert c.get("/v1/model").status_code == 401
        bearer = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/model", headers=bearer).json()["backbone"] == "efficientnet-lite0"
        assert schema.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_page_is_served_without_external_assets(client):
    html = client.get("/")
    assert html.status_code == 200 and "/static/app.js" in html.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    for f in STATIC_DIR.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", f.read_text()), f.name
    # the empty state's hidden image frame stays hidden whatever display rule .frame has
    assert "[hidden] { display: none !important; }" in (STATIC_DIR / "style.css").read_text()


# ---------------------------------------------------------------------- bad input


def _truncated(casting) -> bytes:
    data = casting["good"][0].read_bytes()
    return data[: len(data) // 2]


BAD_INPUTS = {
    # name: (body, content type, expected status, words in the reason)
    "empty": (lambda c: b"", "image/png", 400, "empty"),
    "not an image": (lambda c: b"hello, this is text", "image/png", 400, "not an image"),
    "a path is not read": (lambda c: b"/etc/passwd", "application/octet-stream", 400, "not an"),
    "truncated": (_truncated, "image/jpeg", 400, "truncated"),
    "too small": (lambda c: png_bytes(np.zeros((4, 4), np.uint8)), "image/png", 400, "small"),
    "bomb over our limit": (lambda c: png_header_only(6000, 6000), "image/png", 413, "max_pixels"),
    "bomb over PIL's limit": (lambda c: png_header_only(60000, 60000), "image/png", 413, "large"),
    "wrong content type": (lambda c: b"{}", "application/json", 415, "Content-Type"),
    "form-encoded": (lambda c: b"a=b", "application/x-www-form-urlencoded", 415, "curl"),
    "eps is refused unread": (lambda c: b"%!PS-Adobe-3.0 EPSF-3.0\n", "image/eps", 400, "not an"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_one_line_4xx_logged_once(client, casting, caplog, case):
    make, ctype, status, words = BAD_INPUTS[case]
    with caplog.at_level(logging.WARNING, logger="patchcore.apps.service"):
        r = client.post("/v1/inspect", content=make(casting), headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail and len(detail) < 300
    logs = service_logs(caplog)
    assert len(logs) == 1 and detail in logs[0].getMessage()
    assert client.get("/healthz").status_code == 200  # still up
    ok = client.post("/v1/inspect", content=casting["good"][0].read_bytes())
    assert ok.status_code == 200  # and still answering good requests


def test_multipart_without_a_file(client):
    r = client.post("/v1/inspect", files={"file": (None, "/etc/passwd")})  # a text field
    assert r.status_code == 400 and "no file part" in r.json()["detail"]


def test_decode_bytes_errors_are_typed():
    from patchcore.core.images import ImageReadError
    from patchcore.lean.decode import ImageTooLargeError, decode_bytes

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    assert decode_bytes(buf.getvalue(), name="a.png").shape == (20, 30)
    with pytest.raises(ImageTooLargeError, match=r"a\.png: 30x20 image has 600 pixels"):
        decode_bytes(buf.getvalue(), name="a.png", max_pixels=599)
    with pytest.raises(ImageReadError, match="truncated"):
        decode_bytes(buf.getvalue()[: len(buf.getvalue()) // 2], name="a.png")
    with pytest.raises(ImageReadError, match="not an image") as info:
        decode_bytes(b"%!PS-Adobe-3.0 EPSF-3.0", name="x.eps")
    assert not isinstance(info.value, ImageTooLargeError)


def test_decode_image_matches_read_image(casting):
    path = casting["bad"][0]
    np.testing.assert_array_equal(decode_image(path.read_bytes(), 10**6), read_image(path))
    with pytest.raises(InputError, match=r"300x300 image has 90,000 pixels") as info:
        decode_image(path.read_bytes(), 1000, "part.jpg")
    assert info.value.status == 413


def test_oversize_request(model, casting):
    data = casting["good"][0].read_bytes()
    with TestClient(create_app(model[1], max_request_bytes=len(data) - 1)) as c:
        wait_ready(c)
        r = c.post("/v1/inspect", content=data)  # Content-Length announced
        assert r.status_code == 413 and "max_request_bytes" in r.json()["detail"]
        r = c.post("/v1/inspect", content=iter([data[:1000], data[1000:]]))  # chunked
        assert r.status_code == 413 and "max_request_bytes" in r.json()["detail"]
        r = c.post("/v1/inspect", files={"file": ("a.jpg", data)})
        assert r.status_code == 413
        assert c.post("/v1/inspect", content=data[: len(data) // 2]).status_code == 400


# ---------------------------------------------------------------------- queue, workers, auth


def test_full_queue_answers_503_and_health_stays_fast(model, casting):
    app = create_app(model[1], workers=1, queue_length=0, retry_after_s=3)
    svc = app.state.service
    release = threading.Event()
    entered = threading.Event()
    real_inspect = svc.backend.inspect

    def slow_inspect(*args):
        entered.set()
        release.wait(20)
        return real_inspect(*args)

    data = casting["good"][0].read_bytes()
    with TestClient(app) as c:
        wait_ready(c)
        svc.backend.inspect = slow_inspect
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.post("/v1/inspect", content=data)))
        t.start()
        try:
            assert entered.wait(10)
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").json()["in_flight"] == 1
            assert time.perf_counter() - t0 < 1.0  # not stuck behind the slow request
            busy = c.post("/v1/inspect", content=data)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "3"
            assert "queue_length" in busy.json()["detail"]
        finally:
            release.set()
            t.join(20)
        assert first[0].status_code == 200  # the slow one was not lost
        assert c.post("/v1/inspect", content=data).status_code == 200


def test_concurrent_requests_with_two_workers_are_all_right(model, casting):
    paths = casting["good"] + casting["bad"]
    results: dict[int, tuple[str, float]] = {}
    with TestClient(create_app(model[1], workers=2, queue_length=8)) as c:
        wait_ready(c)

        def worker(k: int) -> None:
            p = paths[k % len(paths)]
            r = c.post("/v1/inspect", files={"file": (p.name, p.read_bytes())})
            results[k] = (p.name, r.json()["score"] if r.status_code == 200 else float("nan"))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    assert len(results) == 8
    for name, score in results.values():
        assert score == pytest.approx(model[2][name], abs=1e-5)


def test_not_ready_until_the_model_loads(tmp_path, casting):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    with TestClient(create_app(broken)) as c:
        assert c.get("/healthz").status_code == 200
        end = time.monotonic() + 10
        while "reason" in (body := c.get("/readyz").json()) and body["reason"] == "loading":
            assert time.monotonic() < end
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and "not a readable patchcore model" in r.json()["reason"]
        r = c.post("/v1/inspect", content=casting["good"][0].read_bytes())
        assert r.status_code == 503 and "retry-after" in r.headers


def test_token(model):
    with TestClient(create_app(model[1], token="s3cret")) as c:
        wait_ready(c)
        r = c.get("/v1/model")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/model", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/inspect", content=b"").status_code == 401  # before any body work
        assert c.get("/v1/heatmaps/x").status_code == 401
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/", "/static/app.js"):
            assert c.get(open_path).status_code == 200, open_path


def test_create_app_argument_errors(model, tmp_path):
    with pytest.raises(TypeError, match="unknown service limit.*max_pixel\\b"):
        create_app(model[1], max_pixel=10)
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        create_app(model[1], workers=0)
    with pytest.raises(FileNotFoundError, match="no such model file"):
        create_app(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="display_range"):
        create_app(model[1], display_range=(2.0, 1.0))
    bare = PatchCore.load(model[0])
    bare.threshold_ = None
    with pytest.raises(ValueError, match="no threshold"):
        create_app(bare)
    app = create_app(bare, threshold=1.5)
    assert app.state.service.threshold == 1.5


def test_heatmap_colours_use_the_range_chosen_at_calibration(model):
    from patchcore.apps.service import TorchBackend
    from patchcore.apps.service.dependencies import Service

    det = copy.deepcopy(model[1])
    fallback = Service(TorchBackend(det), ServiceLimits(), None, None)
    t = float(det.threshold_)
    assert fallback.display_range() == pytest.approx((0.5 * t, 1.25 * t))
    det.metadata_ = {**det.metadata_, "display_range": [1.5, 9.0]}  # as calibrate stores it
    assert fallback.display_range() == (1.5, 9.0)  # the CLI's and report's colours
    given = Service(TorchBackend(det), ServiceLimits(), None, (0.0, 2.0))
    assert given.display_range() == (0.0, 2.0)  # an explicit range still wins


def test_the_service_input_limits_are_the_one_table_s_row() -> None:
    from patchcore.lean.pixels import SURFACE_LIMITS

    row, lim = SURFACE_LIMITS["service"], ServiceLimits()
    assert (lim.max_pixels, lim.max_aspect_ratio, lim.max_processed_pixels) == (
        row.max_pixels,
        row.max_aspect_ratio,
        row.max_processed_pixels,
    )
