"""Fail closed, bound the work, trust no file (issue #11): on the toy detector, no real data."""

from __future__ import annotations

import copy
import io
import logging
import socket
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx2
    from fastapi.testclient import TestClient

from patchcore import ModelFileError, NonFiniteScoreError, PatchCore
from patchcore.apps.service import create_app
from patchcore.core.images import ImageReadError, as_tensor


@pytest.fixture(scope="module")
def fitted(toy_images) -> PatchCore:
    train, _, _ = toy_images
    det = PatchCore(image_size=64, coreset_ratio=0.25, progress=False, num_neighbors=3)
    det.fit(train)
    return det.set_threshold(1.0)


@pytest.fixture(scope="module")
def native(toy_images) -> PatchCore:
    """As ``fitted`` at each image's native size (image_size is fixed by fit)."""
    train, _, _ = toy_images
    det = PatchCore(image_size=None, coreset_ratio=0.25, progress=False, num_neighbors=3)
    return det.fit(train[:2]).set_threshold(1.0)


@pytest.fixture
def det(fitted: PatchCore) -> PatchCore:
    return copy.deepcopy(fitted)


def poison_bank(det: PatchCore, one: bool = False) -> PatchCore:
    """NaN in the bank: a whole column scores NaN; one element gives wrong finite scores."""
    if one:
        det.state_.memory_bank[0, 0] = float("nan")
    else:
        det.state_.memory_bank[:, 0] = float("nan")
    det._set_fitted(det.state_, det.extractor_)
    return det


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, client.get("/readyz").json()
        time.sleep(0.05)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- 1. NaN fails closed


def test_a_nan_in_the_bank_is_never_a_pass(det: PatchCore, toy_images) -> None:
    _, good, _ = toy_images
    poison_bank(det)
    with pytest.raises(NonFiniteScoreError, match="scored nan"):
        det.predict(good[:2])
    with pytest.raises(NonFiniteScoreError, match="scored nan"):
        det.classify(good[:1])
    with pytest.raises(NonFiniteScoreError, match="memory_bank"):
        det.check_finite()


def test_one_nan_in_the_bank_is_caught_by_check_finite(det: PatchCore) -> None:
    with pytest.raises(NonFiniteScoreError, match="memory_bank"):
        poison_bank(det, one=True).check_finite()


def test_a_nan_threshold_or_backbone_is_refused(det: PatchCore, toy_images) -> None:
    _, good, _ = toy_images
    det.state_.threshold = float("nan")
    with pytest.raises(NonFiniteScoreError, match="threshold_ is nan"):
        det.predict(good[:1])
    with pytest.raises(NonFiniteScoreError, match="threshold"):
        det.check_finite()
    det.set_threshold(1.0)
    name, tensor = next(
        (k, v) for k, v in det.extractor_.state_dict().items() if v.is_floating_point()
    )
    tensor.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteScoreError, match=f"backbone tensor '{name}'"):
        det.check_finite()


def test_skipped_inputs_still_read_false_with_a_warning(fitted: PatchCore, toy_images) -> None:
    _, good, _ = toy_images
    with pytest.warns(UserWarning, match="unreadable"):
        out = fitted.predict([good[0], "missing.png"], on_error="skip")
    assert out.tolist()[1] is False


def test_non_finite_tensors_are_refused_like_arrays() -> None:
    t = torch.full((3, 16, 16), 0.5)
    t[0, 1, 1] = float("nan")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        as_tensor(t)
    t[0, 1, 1] = float("inf")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        as_tensor(t)
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        as_tensor(t.permute(1, 2, 0).numpy())


def test_service_is_not_ready_with_a_nan_model(det: PatchCore) -> None:
    poison_bank(det, one=True)  # scores stay finite (and wrong): caught at start-up
    with TestClient(create_app(det)) as c:
        for _ in range(200):
            body = c.get("/readyz").json()
            if "reason" in body and body["reason"] != "loading":
                break
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and "non-finite" in r.json()["reason"]


def test_service_answers_a_nan_score_with_an_error_verdict(
    det: PatchCore, toy_images, monkeypatch
) -> None:
    _, good, _ = toy_images
    with TestClient(create_app(det)) as c:
        wait_ready(c)
        poison_bank(det)  # goes bad after start-up (e.g. an overflow): still no pass
        r = c.post("/v1/inspect", files={"file": ("a.png", png(good[0]), "image/png")})
        assert r.status_code == 500, r.text
        assert r.json()["verdict"] == "error" and "scored nan" in r.json()["detail"]
        assert r.json()["score"] is None and "scored nan" in r.json()["error"]
        files = [("files", ("a.png", png(good[0]), "image/png"))]
        b = c.post("/v1/inspect/batch", files=files).json()
        assert b["errors"] == 1 and b["results"][0]["verdict"] == "error"
        assert b["results"][0]["status"] == 500 and b["results"][0]["score"] is None
        assert "scored nan" in b["results"][0]["error"] and b["normal"] == 0


# ---------------------------------------------------------------- 2. model files verified


def test_one_flipped_byte_anywhere_is_an_error_or_changes_nothing(
    fitted: PatchCore, toy_images, tmp_path
) -> None:
    """Flip one byte at 60 offsets spread over the file: never silently different results."""
    _, good, bad = toy_images
    images = good[:2] + bad[:2]
    path = fitted.save(tmp_path / "m.pt")
    data = path.read_bytes()
    want = fitted.score_samples(images)
    outcomes = {"error": 0, "same": 0}
    for offset in np.linspace(0, len(data) - 1, 60).astype(int):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        damaged = tmp_path / f"flip{offset}.pt"
        damaged.write_bytes(bytes(flipped))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a digest-less (legacy) read would warn
                loaded = PatchCore.load(damaged)
        except ModelFileError as exc:
            assert str(damaged) in str(exc)
            outcomes["error"] += 1
        else:
            np.testing.assert_array_equal(loaded.score_samples(images), want)
            outcomes["same"] += 1
        damaged.unlink()
    assert outcomes["error"] >= 40, outcomes


def test_a_digest_less_file_loads_with_one_warning(fitted: PatchCore, tmp_path) -> None:
    from patchcore.core import persistence

    raw = torch.load(fitted.save(tmp_path / "m.pt"), weights_only=True)
    del raw["digest"]
    torch.save(raw, tmp_path / "legacy.pt")
    persistence._legacy_warned = False
    with pytest.warns(UserWarning, match="legacy.pt: written before model files carried a digest"):
        PatchCore.load(tmp_path / "legacy.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchCore.load(tmp_path / "legacy.pt")  # once per process


def _edit(raw: dict, where: str, value) -> None:
    *keys, last = where.split(".")
    d = raw
    for k in keys:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        ("format_version", "1", "format version '1' is not a positive integer"),
        ("format_version", KeyError, "no format version"),
        ("format_version", 0, "format version 0 is not a positive integer"),
        ("state", KeyError, "missing 'state'"),
        ("state", [1, 2], "state is a list, not a mapping"),
        ("state.n_train_images", KeyError, "'n_train_images' is None, not a count"),
        ("state.n_train_images", "6", "'n_train_images' is '6', not a count"),
        ("state.fit_seconds", float("nan"), "'fit_seconds' is nan"),
        ("state.threshold", float("nan"), "'threshold' is nan, not a finite number"),
        ("state.threshold", "1.0", "'threshold' is '1.0'"),
        ("state.threshold_method", 3, "'threshold_method' is 3"),
        ("state.feature_dtype", "int8", "'feature_dtype' is 'int8'"),
        ("state.metadata", [1], "'metadata' is a list"),
        ("config.layers", "stage3", "'layers' is 'stage3'"),
        ("config.layers", ["nope"], "invalid model configuration"),
        ("config.mean", [0.5], "'mean' is \\[0.5\\]"),
        ("config.backbone", "nope", "invalid model configuration"),
        ("config.image_size", "big", "invalid model configuration"),
        ("config.unknown", 1, "invalid model configuration"),
        ("memory_bank", torch.zeros(3), "memory_bank is not a 2-D float tensor"),
        ("memory_bank", torch.zeros(3, 7), "memory_bank has 7 features per row"),
        ("memory_bank", torch.full((3, 7), float("nan")), "memory_bank holds NaN"),
        ("backbone_state", [1], "backbone_state is not a mapping"),
        ("extra", 1, "unexpected entries \\['extra'\\]"),
    ],
)
def test_every_field_is_validated_with_a_clear_message(
    fitted: PatchCore, tmp_path, where, value, match
) -> None:
    raw = torch.load(fitted.save(tmp_path / "m.pt"), weights_only=True)
    del raw["digest"]  # as a file before the digest: the checks alone must catch it
    _edit(raw, where, value)
    torch.save(raw, tmp_path / "bad.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelFileError, match="bad.pt: .*" + match):
            PatchCore.load(tmp_path / "bad.pt")


def test_a_nan_backbone_tensor_in_a_file_is_refused(fitted: PatchCore, tmp_path) -> None:
    raw = torch.load(fitted.save(tmp_path / "m.pt"), weights_only=True)
    name = next(k for k, v in raw["backbone_state"].items() if v.is_floating_point())
    raw["backbone_state"][name].view(-1)[0] = float("nan")
    from patchcore.core.persistence import digest

    raw["digest"]["value"] = digest(raw)  # a file saved from a NaN model: digest is right
    torch.save(raw, tmp_path / "nan.pt")
    with pytest.raises(ModelFileError, match=f"backbone tensor '{name}' holds NaN"):
        PatchCore.load(tmp_path / "nan.pt")


# ---------------------------------------------------------------- 3. work bounded


def strip_png(width: int, height: int) -> bytes:
    """A flat grey image: a tall or wide one compresses to a few KB."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


def test_a_tall_strip_is_refused_from_the_header_by_the_service(fitted: PatchCore) -> None:
    data = strip_png(8, 400_000)  # 3.2 M pixels, under max_pixels; aspect 50,000:1
    assert len(data) < 20_000
    with TestClient(create_app(fitted)) as c:
        wait_ready(c)
        t = time.perf_counter()
        r = c.post("/v1/inspect", content=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and "aspect ratio of 50,000:1" in r.json()["detail"]
        assert time.perf_counter() - t < 2.0
        ok = c.post(
            "/v1/inspect", content=strip_png(200, 20), headers={"Content-Type": "image/png"}
        )
        assert ok.status_code == 200, ok.text  # 10:1 is fine


def test_native_resolution_work_is_bounded_by_max_processed_pixels(native: PatchCore) -> None:
    with TestClient(create_app(native, max_processed_pixels=100_000)) as c:
        wait_ready(c)
        r = c.post(
            "/v1/inspect", content=strip_png(400, 300), headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 413
        assert "processed at 400x300 = 120,000 pixels" in r.json()["detail"]
        assert "max_processed_pixels" in r.json()["detail"]
        ok = c.post(
            "/v1/inspect", content=strip_png(300, 300), headers={"Content-Type": "image/png"}
        )
        assert ok.status_code == 200, ok.text


def test_the_library_refuses_strips_and_oversized_work_naming_the_file(
    fitted: PatchCore, native: PatchCore, tmp_path
) -> None:
    from patchcore.core.images import ImageTooLargeError, read_image, set_input_limits

    tall = tmp_path / "tall.png"
    tall.write_bytes(strip_png(8, 100_000))
    with pytest.raises(ImageTooLargeError, match=r"tall.png: 8x100000 image has an aspect ratio"):
        read_image(tall)
    r = fitted.score([tall, np.full((96, 96, 3), 128, np.uint8)], on_error="skip")
    assert [s.name for s in r.skipped] == [str(tall)] and np.isfinite(r.scores[1])
    previous = set_input_limits(max_processed_pixels=5_000, max_aspect_ratio=None)
    try:
        with pytest.raises(ImageTooLargeError, match="image #0: would be processed at 96x96"):
            native.score_samples([np.full((96, 96, 3), 128, np.uint8)])
        read_image(tall)  # no aspect limit now
    finally:
        set_input_limits(**previous.__dict__)
    assert set_input_limits() == previous


def test_resizing_a_tall_strip_is_fast_and_the_same_filter() -> None:
    import torch.nn.functional as F

    from patchcore.core.images import resize

    x = torch.rand(3, 300_000, 8)
    t = time.perf_counter()
    y = resize(x, (128, 128))
    took = time.perf_counter() - t
    ref = F.interpolate(x[None], size=(128, 128), mode="bilinear", antialias=True)[0]
    assert torch.allclose(y, ref, atol=1e-5) and took < 0.5, took  # one call: 1.5 s, 1.2 GB
    square = torch.rand(3, 300, 200)  # ordinary images keep the single call, bit for bit
    ref = F.interpolate(square[None], size=(128, 128), mode="bilinear", antialias=True)[0]
    assert torch.equal(resize(square, (128, 128)), ref)


# ---------------------------------------------------------------- 4. slow uploads


def test_slow_uploads_do_not_starve_scoring_and_time_out(fitted: PatchCore, toy_images) -> None:
    from _slow_clients import free_port, request_bytes, running, slow_client, status_of

    _, good, _ = toy_images
    port = free_port()
    app = create_app(fitted, workers=1, queue_length=0, body_timeout_s=2)
    with running(app, port):
        for _ in range(600):  # warmed up
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if status_of(s) == 200:
                    break
            time.sleep(0.05)
        slow = [None] * 9
        threads = [
            threading.Thread(target=slow_client, args=(port, b"\0" * 1000, 4.0, slow, i))
            for i in range(9)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the slow clients are all sending by now
        normal = []
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(request_bytes(port, "/v1/inspect", png(good[0])))
                normal.append(status_of(s))
        for t in threads:
            t.join(15)
    assert normal == [200, 200, 200], normal  # before: 503 (slots held by the slow bodies)
    assert slow == [408] * 9, slow  # cut off after body_timeout_s


def test_a_disconnect_logs_one_line_and_an_abandoned_request_is_not_scored(
    fitted: PatchCore, toy_images, caplog
) -> None:
    from _slow_clients import free_port, request_bytes, running, status_of

    _, good, _ = toy_images
    port = free_port()
    app = create_app(fitted, workers=1, queue_length=2)
    svc = app.state.service
    calls = []
    real_inspect = svc.backend.inspect

    def slow_inspect(images):  # noqa: ANN001, ANN202
        calls.append(images[0][0])
        time.sleep(1.0)
        return real_inspect(images)

    caplog.set_level(logging.INFO)
    with running(app, port):
        while not svc.ready:
            time.sleep(0.05)
        svc.backend.inspect = slow_inspect
        # 1. a client that goes away half-way through its body
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(request_bytes(port, "/v1/inspect", b"\0" * 1000)[:-500])
            time.sleep(0.2)
        # 2. one request scored (1 s), and one that leaves while it waits for the worker
        first = socket.create_connection(("127.0.0.1", port), timeout=30)
        first.sendall(request_bytes(port, "/v1/inspect", png(good[0])))
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(request_bytes(port, "/v1/inspect", png(good[1])))
            time.sleep(0.2)
        assert status_of(first) == 200
        first.close()
        time.sleep(1.5)
    assert calls == ["image #0"]  # the abandoned one was not scored
    gone = [r.getMessage() for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 2, gone
    assert "after 500 bytes of the body" in gone[0] and "while queued" in gone[1]
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"
