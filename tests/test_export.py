"""Export to ONNX/OpenVINO and the torch-free runtime, against the torch path on real images.

Two small models on a casting subset: a fixed-size one (image_size=96, exported for OpenVINO,
which keeps the .onnx too, so both backends run the same graph) and a scale=0.4 one exported
with dynamic sizes through the ``patchcore export`` command. Both are compared on a few test
images of every shared set against the torch path with ``search_precision="float32"``: scores
within 1e-4 relative, maps within 1e-3 of the map's maximum, identical verdicts.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import data_set
from PIL import Image
from typer.testing import CliRunner

from patchcore.apps.cli import app
from patchcore.core.detector import PatchCore
from patchcore.core.export import MANIFEST, ExportError, export, parity
from patchcore.core.images import as_tensor, resize
from patchcore.lean import normalization
from patchcore.lean.pixels import ImageReadError, read_image, resize_array, to_chw
from patchcore.lean.runtime import ExportedModel, ExportFileError

pytestmark = pytest.mark.slow

SCORE_RTOL, MAP_RTOL = 1e-5, 1e-3
SCAN_MAP_RTOL = 2e-2  # the int8 / bfloat16 scans' maps (scores stay exact: SCORE_RTOL)
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
SRC = Path(__file__).resolve().parents[1] / "src"


def _few(root: Path, n: int = 2) -> list[Path]:
    """The first ``n`` normal and ``n`` defective test images of a set (sorted names)."""
    good = sorted((root / "test" / "good").iterdir())[:n]
    bad_dirs = sorted(d for d in (root / "test").iterdir() if d.is_dir() and d.name != "good")
    return good + sorted(bad_dirs[0].iterdir())[:n]


@pytest.fixture(scope="module")
def images() -> list[Path]:
    """Test images of every shared set (RGB JPEG, grey PNG of varying sizes, binarised grey)."""
    return [p for name in ("casting", "magnetic_tile", "deeppcb") for p in _few(data_set(name))]


def _thresholded(images: list[Path], n_train: int, **settings: Any) -> PatchCore:
    """Fitted on the first ``n_train`` casting normals; threshold: the median score of
    ``images``."""
    train = sorted((data_set("casting") / "train" / "good").iterdir())[:n_train]
    det = PatchCore(**settings, search_precision="float32", progress=False).fit(train)
    det.set_threshold(float(np.median(det.score_samples(images))))
    return det


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, images) -> tuple[PatchCore, Path]:
    """image_size=96 model with a threshold and the paper's score (eq. 7), exported (OpenVINO
    where it installs)."""
    det = _thresholded(images, 6, image_size=96, top_k=1)
    out = tmp_path_factory.mktemp("export_fixed")
    export(det, out, format="openvino" if HAS_OPENVINO else "onnx")
    return det, out


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory, images) -> tuple[PatchCore, Path]:
    """scale=0.4 model (the default top-10 score) saved to a file and exported by the CLI (a
    dynamic-size graph)."""
    det = _thresholded(images, 4, scale=0.4)
    tmp = tmp_path_factory.mktemp("export_dynamic")
    det.save(tmp / "model.pt")
    result = CliRunner().invoke(app, ["export", str(tmp / "model.pt"), "--out", str(tmp / "x")])
    assert result.exit_code == 0, result.output
    assert "Parity with the torch path" in result.output
    return det, tmp / "x"


def _check_parity(det: PatchCore, model: ExportedModel, images: list[Path]) -> None:
    """Scores, maps, verdicts, normalised scores and regions: the runtime's records against
    the torch path's (its float32 search)."""
    ref = det.inspect(images)
    got = model.inspect(images)
    map_rtol = MAP_RTOL if model.info["search"] == "float32" else SCAN_MAP_RTOL
    assert [r.image for r in got] == [str(p) for p in images]
    scores = np.array([r.score for r in got])
    ref_scores = np.array([r.score for r in ref])
    rel = np.abs(scores - ref_scores) / ref_scores
    assert rel.max() <= SCORE_RTOL, (rel.max(), images[int(rel.argmax())])
    for a, b, p in zip(ref, got, images, strict=True):
        assert b.anomaly_map.shape == a.anomaly_map.shape, p
        assert np.abs(b.anomaly_map - a.anomaly_map).max() <= map_rtol * a.map_max, p
        assert (b.verdict, b.threshold, b.region_threshold) == (
            a.verdict,
            a.threshold,
            a.region_threshold,
        ), p
        assert b.verdict in ("anomalous", "normal")
        assert bool(b.regions) == (b.verdict == "anomalous"), p
    np.testing.assert_allclose(
        [r.normalized_score for r in got], normalization.normalize(scores, model.normalization)
    )


def test_fixed_export_matches_torch_on_every_set(fixed, images):
    det, out = fixed
    info = json.loads((out / MANIFEST).read_text())
    assert info["processed_size"] == [96, 96] and not info["dynamic"]
    assert info["threshold"] == pytest.approx(det.threshold_)
    assert info["probe_parity"]["score_rel"] <= SCORE_RTOL
    _check_parity(det, ExportedModel(out, backend="onnxruntime"), images)


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino does not install on this platform")
def test_openvino_matches_torch(fixed, images):
    det, out = fixed
    model = ExportedModel(out)  # an OpenVINO export opens on OpenVINO by default
    assert model.backend == "openvino"
    assert model.info["search"] == "bfloat16"  # OpenVINO's default: the bfloat16 scan
    _check_parity(det, model, images)


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino does not install on this platform")
def test_openvino_model_runs_the_scan_in_bfloat16_and_the_rest_in_float32(fixed):
    """The IR holds the scan's product (one bank block here) with bfloat16 inputs; every
    other product, convolution included, stays float32 (the runtime's f32 hint)."""
    import openvino as ov

    _, out = fixed
    model = ov.Core().read_model(out / "model.xml")
    kinds = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() in ("MatMul", "Convolution", "GroupConvolution"):
            key = (node.get_type_name(), str(node.input_value(0).get_element_type()))
            kinds[key] = kinds.get(key, 0) + 1
    assert kinds.pop(("MatMul", "<Type: 'bfloat16'>")) == 1, kinds
    assert all("float32" in t for _, t in kinds), kinds
    assert kinds[("MatMul", "<Type: 'float32'>")] >= 1  # the re-check


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino does not install on this platform")
def test_openvino_scan_rounds_as_the_torch_path(fixed, images):
    """OpenVINO's conversion to bfloat16 truncates; the graph rounds to nearest first, so the
    OpenVINO maps are the eager bfloat16 graph's (the torch path's arithmetic) up to the order
    of the sums and the bfloat16 rounding of the products (0.12 of the scan's own error in a
    clean-clone run), where truncated inputs put them as far apart as the scan's whole
    error (0.98 of it)."""
    from patchcore.core.export_search import Bf16ScoringGraph
    from patchcore.core.graph import ScoringGraph

    det, out = fixed
    model = ExportedModel(out)
    batch = next(iter(model._batches(images, "raise")))  # every set's images at 96 x 96
    session = model.sessions[(96, 96)]
    _, ov_maps = session.run(batch.pixels)
    x = torch.from_numpy(batch.pixels)
    with torch.no_grad():
        eager = Bf16ScoringGraph(det, (96, 96)).eval()(x)[1].numpy()
        exact = ScoringGraph(det, (96, 96)).eval()(x)[1].numpy()
    top = exact.reshape(len(exact), -1).max(1)
    to_eager = (np.abs(ov_maps - eager).reshape(len(top), -1).max(1) / top).max()
    to_exact = (np.abs(eager - exact).reshape(len(top), -1).max(1) / top).max()
    assert to_exact > 1e-4  # the bfloat16 scan's own error is there to see
    assert to_eager <= 0.35 * to_exact, (to_eager, to_exact)


def test_bfloat16_search_is_refused_for_onnx(fixed, tmp_path):
    det, _ = fixed
    with pytest.raises(ExportError, match="search 'bfloat16' is for format 'openvino'"):
        export(det, tmp_path / "x", format="onnx", search="bfloat16")


def test_dynamic_export_with_scale_matches_torch(dynamic, images):
    det, out = dynamic
    info = json.loads((out / MANIFEST).read_text())
    assert info["dynamic"] and info["scale"] == 0.4 and info["source_model"]["name"] == "model.pt"
    model = ExportedModel(out)
    sizes = {tuple(np.asarray(Image.open(p)).shape[:2]) for p in images}
    assert len(sizes) >= 3  # several processed sizes through one graph
    _check_parity(det, model, images)
    # batches of several same-size images give the same answers as one by one
    casting = images[:4]
    one_by_one = [ExportedModel(out, batch_size=1).score_samples([p])[0] for p in casting]
    np.testing.assert_allclose(model.score_samples(casting), one_by_one, rtol=1e-5)


def test_a_dynamic_export_has_a_fixed_graph_for_the_training_size(dynamic, images):
    """casting's training images are all 300 x 300: at scale 0.4 the export adds a fixed
    120 x 120 graph (int8 search by default), which gives the dynamic graph's answers."""
    _, out = dynamic
    model = ExportedModel(out)
    info = model.info
    assert info["search"] == "int8"
    assert [g["size"] for g in info["graphs"]] == [None, [120, 120]]
    assert set(model.sessions) == {None, (120, 120)}
    (batch,) = list(model._batches(images[:4], "raise"))  # the casting images
    assert batch.pixels.shape[-2:] == (120, 120)
    s_fixed, m_fixed = model.sessions[(120, 120)].run(batch.pixels)
    s_dyn, m_dyn = model.sessions[None].run(batch.pixels)
    np.testing.assert_allclose(s_fixed, s_dyn, rtol=SCORE_RTOL)
    assert np.abs(m_fixed - m_dyn).max() <= SCAN_MAP_RTOL * m_dyn.max()


def test_dynamic_export_refuses_sizes_it_cannot_match(dynamic):
    _, out = dynamic
    model = ExportedModel(out)
    small = np.full((60, 60), 128, np.uint8)  # 24 px at scale 0.4: under the blur radius
    with pytest.raises(ImageReadError, match="needs both sides > 31"):
        model.score_samples([small])
    r = model.inspect([small, np.full((200, 200), 100, np.uint8)])
    assert r[0].verdict == "error" and "needs both sides > 31" in r[0].error
    assert r[1].verdict in ("anomalous", "normal") and np.isfinite(r[1].score)


def test_fixed_export_of_a_scale_model_is_refused(dynamic, tmp_path):
    det, _ = dynamic
    with pytest.raises(ExportError, match="fixed-size export needs a model fitted with image_size"):
        export(det, tmp_path, dynamic=False)


def test_both_image_scores_are_exported(dynamic, images, tmp_path):
    det, _ = dynamic
    assert det.top_k == 10  # the fixture's export holds the top-k mean; this one eq. 7
    other = PatchCore(**{**det.get_params(), "top_k": 1})
    other._set_fitted(det.state_, det.extractor_)
    export(other, tmp_path)
    model = ExportedModel(tmp_path)
    _check_parity(other, model, images[:2])
    assert not np.allclose(model.score_samples(images[:2]), det.score_samples(images[:2]))


def test_damaged_export_fails_closed(fixed, tmp_path):
    """A real export edited after the fact (the synthetic export's tests cover each field)."""
    _, out = fixed
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    info = json.loads((out / MANIFEST).read_text())
    info["threshold"] *= 1.01  # consistently edited: some defective parts would "pass"
    info["normalization"]["threshold"] = info["threshold"]
    (copy / MANIFEST).write_text(json.dumps(info))
    with pytest.raises(ExportFileError, match="do not match its digest"):
        ExportedModel(copy)
    (copy / MANIFEST).write_text((out / MANIFEST).read_text())
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportFileError, match="SHA-256"):
        ExportedModel(copy)


def test_runtime_runs_without_torch(fixed, images):
    """A subprocess where ``import torch`` fails scores images with the runtime."""
    det, out = fixed
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        from patchcore.lean.runtime import ExportedModel
        m = ExportedModel({str(out)!r}, backend="onnxruntime")
        r = m.inspect({[str(p) for p in images]!r})
        assert "torch" not in [k for k, v in sys.modules.items() if v is not None]
        print(json.dumps({{"scores": [x.score for x in r], "map0": r[0].map_max}}))
        """
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ref = det.score(images, maps="native")
    np.testing.assert_allclose(got["scores"], ref.scores, rtol=SCORE_RTOL)
    assert got["map0"] == pytest.approx(float(ref.maps[0].max()), rel=MAP_RTOL)


def test_patchcore_run_cli(fixed, images, capsys):
    from patchcore.lean.runtime_cli import main

    det, out = fixed
    assert main([str(out), *map(str, images[:2]), "--json", "--backend", "onnxruntime"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = det.inspect(images[:2])
    assert [r["image"] for r in rows] == [str(p) for p in images[:2]]
    np.testing.assert_allclose([r["score"] for r in rows], [r.score for r in ref], rtol=SCORE_RTOL)
    assert [r["verdict"] for r in rows] == [r.verdict for r in ref]
    assert main([str(out), "/no/such.png", "--format", "csv"]) == 1  # nothing readable
    assert "no such file" in capsys.readouterr().out


def test_runtime_service_inspect(fixed, images):
    """``patchcore-run serve``'s app: the one service over the runtime backend."""
    import time

    from fastapi.testclient import TestClient

    from patchcore.apps.service import RuntimeBackend, create_app

    det, out = fixed
    with TestClient(create_app(RuntimeBackend(out, engine="onnxruntime"), token="s3cret")) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.post("/v1/inspect", content=images[0].read_bytes()).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        r = c.post("/v1/inspect", content=images[0].read_bytes(), headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        ref = det.score([images[0]], maps="native")
        assert body["score"] == pytest.approx(float(ref.scores[0]), rel=SCORE_RTOL)
        assert body["verdict"] == ("anomalous" if ref.scores[0] >= det.threshold_ else "normal")
        assert 0.0 <= body["normalized_score"] <= 1.0
        assert (body["height"], body["width"]) == ref.maps[0].shape
        files = {"file": ("part.png", images[0].read_bytes(), "image/png")}
        assert c.post("/v1/inspect", files=files, headers=auth).json()["image"] == "part.png"
        bad = c.post("/v1/inspect", content=b"not an image", headers=auth)
        assert bad.status_code == 400 and "not an image" in bad.json()["detail"]


def test_numpy_decoding_and_resize_match_the_torch_path(images, tmp_path):
    """pixels.to_chw + resize_array reproduce images.as_tensor + resize (16-bit, palette, LA)."""
    rng = np.random.default_rng(0)
    extra = []
    for mode, im in (
        ("I16", Image.fromarray(rng.integers(0, 65535, (50, 70), dtype=np.uint16))),
        ("LA", Image.fromarray(rng.integers(0, 255, (40, 33, 2), dtype=np.uint8))),
        ("P", Image.fromarray(rng.integers(0, 255, (45, 45, 3), dtype=np.uint8)).convert("P")),
    ):
        p = tmp_path / f"{mode}.png"
        im.save(p)
        extra.append(p)
    for p in [*images, *extra]:
        ref = as_tensor(p)
        chw = to_chw(read_image(p), str(p))
        np.testing.assert_array_equal(chw, ref.numpy())
        for size in ((96, 96), (max(16, round(ref.shape[1] * 0.4)), 37), (300, 310)):
            np.testing.assert_allclose(
                resize_array(chw, size), resize(ref, size).numpy(), atol=1e-6, err_msg=str(p)
            )


def test_parity_measure():
    ref = (
        np.array([1.0, 2.0]),
        np.ones((2, 4, 4), np.float32) * np.array([1.0, 4.0])[:, None, None],
    )
    got = (np.array([1.0, 2.0002]), ref[1] + np.float32(0.002))
    p = parity(ref, got)
    assert p["score_rel"] == pytest.approx(1e-4)
    assert p["map_rel"] == pytest.approx(0.002, rel=1e-3)  # of the first map's maximum, 1.0
    assert torch.__version__  # the export side needs torch; the runtime tests above do not
