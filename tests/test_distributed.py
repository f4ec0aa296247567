"""Ray scale-out (:mod:`patchcore.scale`) on a local Ray with 2 CPUs.

Real images (casting and magnetic_tile test images at 96 x 96) plus unreadable ones; one Ray
session for the module. Batch scoring must give the single-process library's scores bit for
bit, every input exactly once (after a resume, an interruption, a worker killed by its pid),
and unreadable inputs as error rows; the distributed fit with one worker must give the
single-process bank.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IN_CI, data_set

if not IN_CI:  # CI installs the extra (.[test]); a developer machine may lack it
    pytest.importorskip("ray")
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

import patchcore.scale as D
from patchcore.apps import plots
from patchcore.core.detector import ModelFileError, PatchCore
from patchcore.lean import record

pytestmark = pytest.mark.slow
SIZE = 96


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[str]]:
    """train: 8 casting normals; test: 16 casting + 6 magnetic_tile (other sizes, grey);
    bad: a non-image, an empty file and a missing path."""
    casting, tiles = data_set("casting"), data_set("magnetic_tile")
    root = tmp_path_factory.mktemp("bad")
    (root / "not_an_image.png").write_bytes(b"this is not a PNG")
    (root / "empty.png").write_bytes(b"")
    train = sorted(map(str, (casting / "train" / "good").iterdir()))[:8]
    test = sorted(map(str, (casting / "test" / "defective").iterdir()))[:8]
    test += sorted(map(str, (casting / "test" / "good").iterdir()))[:8]
    test += sorted(map(str, (tiles / "test" / "crack").iterdir()))[:6]
    bad = [str(root / "not_an_image.png"), str(root / "empty.png"), str(root / "missing.png")]
    return {"train": train, "test": test, "bad": bad}


@pytest.fixture(scope="module")
def model(images, tmp_path_factory) -> Path:
    # batches of 2 images: blocks (rounded up to whole batches) stay small and many
    det = PatchCore(image_size=SIZE, batch_size=2, progress=False).fit(images["train"])
    det.set_threshold(float(np.median(det.score(images["test"]).scores)))
    return det.save(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def reference(model, images) -> dict[str, tuple[float, float]]:
    """The single-process library: path -> (score, map maximum at the image's own size).

    On one torch thread, as each actor runs: oneDNN's convolutions may sum in another order
    for another thread count or batch size (float32 rounding, about 1e-7 of the score).
    """
    r = _one_thread(PatchCore.load(model).score, images["test"], maps="native", progress=False)
    return {
        p: (s, float(m.max())) for p, s, m in zip(images["test"], r.scores, r.maps, strict=True)
    }


def _one_thread(fn, *args, **kwargs):  # noqa: ANN001, ANN202
    """``fn(*args, **kwargs)`` on one torch thread, as each actor runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _listing(tmp_path: Path, paths: list[str]) -> Path:
    f = tmp_path / "list.txt"
    f.write_text("# inputs\n" + "\n".join(paths) + "\n")
    return f


def _check_complete(out: Path, inputs: list[str], reference: dict, exact: bool = True) -> pa.Table:
    """Every input exactly once, scores and map maxima equal to the library's.

    ``exact``: bit for bit (the images went through in the library's batches, on as many
    threads); else to float32 rounding.
    """
    table = D.read_results(out)
    paths = table.column("image").to_pylist()
    assert sorted(paths) == sorted(os.path.abspath(p) for p in inputs)
    assert len(set(paths)) == len(paths)
    rows = {r["image"]: r for r in table.to_pylist()}
    for p, (score, map_max) in reference.items():
        row = rows[os.path.abspath(p)]
        assert row["error"] is None
        if exact:
            assert row["score"] == score  # bit for bit
            assert row["map_max"] == np.float32(map_max)
        else:
            assert row["score"] == pytest.approx(score, rel=1e-6)
            assert row["map_max"] == pytest.approx(map_max, rel=1e-6)
    return table


def test_batch_equals_library_with_bad_inputs_as_rows(
    ray_session, model, images, reference, tmp_path
):
    inputs = images["test"] + images["bad"]
    summary = D.batch_score(
        model,
        [_listing(tmp_path, inputs)],
        tmp_path / "out",
        workers=2,
        block_size=5,
        heatmaps=tmp_path / "heat",
        overlay=plots.anomaly_map_overlay,
    )
    assert (summary.inputs, summary.written, summary.errors) == (len(inputs), len(inputs), 3)
    assert summary.parts == -(-len(inputs) // 6)  # one file per block of 6 (3 batches)
    table = _check_complete(tmp_path / "out", inputs, reference)
    rows = {r["image"]: r for r in table.to_pylist()}
    errors = {Path(p).name: rows[os.path.abspath(p)] for p in images["bad"]}
    assert "not an image" in errors["not_an_image.png"]["error"]
    assert "no such file" in errors["missing.png"]["error"]
    assert errors["empty.png"]["error"]
    assert all(r["verdict"] == "error" and r["score"] is None for r in errors.values())
    # every row is the library's inspection record (verdict, normalised score, regions...)
    library = _one_thread(PatchCore.load(model).inspect, images["test"], progress=False)
    assert {r.verdict for r in library} == {"anomalous", "normal"}
    for rec in library:
        row = rows[os.path.abspath(rec.image)]
        assert {k: row[k] for k in record.FIELD_NAMES if k != "index"} == {
            k: v for k, v in record.as_dict(rec).items() if k != "index"
        }
        assert row["index"] == inputs.index(rec.image)
        assert 0 <= row["map_max_y"] < row["height"] and 0 <= row["map_max_x"] < row["width"]
    tile = rows[os.path.abspath(images["test"][-1])]  # native size, not the 96 px processed
    from PIL import Image

    with Image.open(images["test"][-1]) as im:
        assert (tile["width"], tile["height"]) == im.size
    assert {r["model_digest"] for r in table.to_pylist()} == {summary.model_digest}
    heat = [rows[os.path.abspath(p)]["heatmap"] for p in images["test"]]
    assert len(set(heat)) == len(heat) and all(Path(f).is_file() for f in heat)
    assert not any(rows[os.path.abspath(p)]["heatmap"] for p in images["bad"])
    # the folder is a Parquet dataset with the documented schema
    assert pads.dataset(tmp_path / "out", format="parquet").schema == D.batch_schema()


def test_resume_and_interruption_write_each_input_once(
    ray_session, model, images, reference, tmp_path
):
    out, inputs = tmp_path / "out", images["test"]

    class InterruptError(Exception):
        pass

    def stop_after_one_block(n: int) -> None:
        raise InterruptError  # as a crash or Ctrl-C after the first finished block

    with pytest.raises(InterruptError):
        D.batch_score(model, inputs, out, workers=2, block_size=3, progress=stop_after_one_block)
    done = D.read_results(out).num_rows
    assert 0 < done < len(inputs)  # the finished block was kept
    again = D.batch_score(model, [*inputs, *inputs[:4]], out, workers=2, block_size=3)
    assert (again.already_done, again.written) == (done, len(inputs) - done)
    _check_complete(out, inputs, reference, exact=False)  # resumed: other batches
    assert D.batch_score(model, inputs, out, workers=2).written == 0  # nothing left to do
    assert not [f for f in os.listdir(out) if not f.endswith(".parquet")]  # no temporary left


def test_killed_worker_loses_nothing(ray_session, model, images, reference, tmp_path):
    out, inputs = tmp_path / "out", images["test"]
    killed: list[int] = []

    def kill_a_worker(n: int) -> None:
        if killed:
            return
        worker = D.read_results(out).column("worker")[0].as_py()
        pid = int(worker.rsplit(":", 1)[1])
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)  # the actor's process, mid-run
        killed.append(pid)

    summary = D.batch_score(model, inputs, out, workers=2, block_size=2, progress=kill_a_worker)
    assert killed and summary.written == len(inputs)
    table = _check_complete(out, inputs, reference)
    print(f"killed worker {killed[0]}: {table.num_rows} rows for {len(inputs)} inputs")


def test_sources_lists_globs_and_uris(ray_session, model, images, reference, tmp_path):
    test = images["test"][:6]
    folder = Path(test[0]).parent
    pq.write_table(pa.table({"path": test[:3]}), tmp_path / "list.parquet")
    rel = tmp_path / "rel.txt"
    rel.write_text("\n".join(os.path.relpath(p, tmp_path) for p in test[2:4]))
    keys = D.list_sources([tmp_path / "list.parquet", rel, test[3], str(folder / "*.jpeg")])
    assert keys[:4] == [os.path.abspath(p) for p in test[:4]]  # in order, each once
    assert len(keys) == len(set(keys)) == len(list(folder.glob("*.jpeg")))
    uris = [Path(p).resolve().as_uri() for p in test[:2]]  # file:// through pyarrow.fs
    gone = (tmp_path / "gone.png").as_uri()
    D.batch_score(model, [*uris, gone], tmp_path / "out", workers=1)
    rows = {r["image"]: r for r in D.read_results(tmp_path / "out").to_pylist()}
    assert [rows[u]["score"] for u in uris] == [reference[p][0] for p in test[:2]]
    assert rows[gone]["verdict"] == "error" and "cannot read" in rows[gone]["error"]
    with pytest.raises(D.BatchError, match="matches no image"):
        D.list_sources([str(tmp_path / "*.png")])
    with pytest.raises(D.BatchError, match="'path' column"):
        pq.write_table(pa.table({"file": ["x"]}), tmp_path / "bad.parquet")
        D.list_sources([tmp_path / "bad.parquet"])


def test_output_of_another_model_is_refused(model, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    row = dict.fromkeys(D.batch_schema().names)
    row.update(image="/x.png", score=1.0, model_digest="0" * 64)
    pq.write_table(pa.Table.from_pylist([row], schema=D.batch_schema()), out / "part-a.parquet")
    with pytest.raises(D.BatchError, match="another model"):
        D.batch_score(model, images["test"][:4], out, workers=1)
    with pytest.raises(ModelFileError, match="no such model file"):
        D.batch_score(tmp_path / "none.pt", images["test"], tmp_path / "o2", workers=1)
    with pytest.raises(D.BatchError, match="no images found"):
        D.batch_score(model, [tmp_path / "out"], tmp_path / "o3", workers=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_threshold_is_refused_before_any_work(model, images, tmp_path, bad):
    out = tmp_path / "out"
    with pytest.raises(record.NonFiniteScoreError, match="--threshold is"):
        D.batch_score(model, images["test"][:2], out, workers=1, threshold=bad)
    assert not out.exists()  # refused before the folder, Ray or any image
    with pytest.raises(D.BatchError, match="either a threshold or scores only"):
        D.batch_score(model, images["test"][:2], out, threshold=1.0, scores_only=True)


def test_model_without_threshold_needs_scores_only(ray_session, images, tmp_path):
    det = PatchCore(image_size=SIZE, batch_size=2, progress=False).fit(images["train"][:2])
    bare = det.save(tmp_path / "bare.pt")
    with pytest.raises(D.BatchError, match="no threshold.*scores only"):
        D.batch_score(bare, images["test"][:3], tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
    inputs = images["test"][:3] + images["bad"][:1]
    summary = D.batch_score(bare, inputs, tmp_path / "out", workers=1, scores_only=True)
    assert (summary.written, summary.errors, summary.anomalous) == (4, 1, 0)
    rows = D.read_results(tmp_path / "out").to_pylist()
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 3 and all(r["score"] > 0 and r["map_max"] > 0 for r in good)
    assert all(r["verdict"] is None and r["threshold"] is None for r in good)
    assert all(r["normalized_score"] is None and r["regions"] is None for r in good)
    assert [r["verdict"] for r in rows if r["error"]] == ["error"]


def _fit_params() -> dict:
    return {"image_size": SIZE, "coreset_ratio": 0.01, "seed": 3}


def test_distributed_fit_one_worker_is_the_single_process_bank(ray_session, images):
    single = PatchCore(**_fit_params(), progress=False).fit(images["train"])
    fit = D.fit_distributed(images["train"], workers=1, **_fit_params())
    assert torch.equal(fit.detector.memory_bank_, single.memory_bank_)
    assert fit.detector.n_train_patches_ == single.n_train_patches_
    # the same provenance: every bank row traced to the same training image and cell
    assert torch.equal(fit.detector.state_.provenance, single.state_.provenance)
    assert fit.detector.state_.train_names == single.state_.train_names == images["train"]
    assert fit.detector.state_.train_grids == single.state_.train_grids
    # and it explains like the single-process model: the nearest training patch's image
    probe = images["test"][:2] + images["train"][:1]
    ray_why = [e.as_dict() for e in fit.detector.explain(probe, progress=False)]
    assert ray_why == [e.as_dict() for e in single.explain(probe, progress=False)]
    assert all(e["train_name"] in images["train"] and e["note"] is None for e in ray_why)
    assert ray_why[-1]["train_name"] == images["train"][0]  # a training image finds itself
    # no Ray: two in-process shards run the same split, the bank has the same size
    params = {**_fit_params(), "weights": "imagenet"}
    shards = [D.FitShard(params, 1), D.FitShard(params, 1)]
    two = D.fit_distributed(images["train"], shards=shards, **_fit_params())
    assert two.shard_rows == [4 * (SIZE // 8) ** 2] * 2
    assert two.detector.memory_bank_.shape == single.memory_bank_.shape
    # the certified radius is the true coverage radius of the bank over all features
    feats = torch.cat([s.features() for s in shards])
    rows = {tuple(r) for r in feats.float().tolist()}
    assert all(tuple(r) in rows for r in two.detector.memory_bank_.tolist())
    radius = float(torch.cdist(feats.float(), two.detector.memory_bank_).amin(1).max())
    assert two.coverage_radius == pytest.approx(radius, rel=1e-4)


def test_distributed_fit_survives_a_killed_worker(ray_session, images):
    params = {**_fit_params(), "coreset_ratio": 0.02}
    calm = D.fit_distributed(images["train"], workers=2, **params)
    killed: list[str] = []

    def kill(words: str, workers: list[str]) -> None:
        if workers and not killed and ("pass 1" in words or "pass 3" in words):
            os.kill(int(workers[0].rsplit(":", 1)[1]), signal.SIGKILL)
            killed.append(words)

    fit = D.fit_distributed(images["train"], workers=2, on_stage=kill, **params)
    assert killed and fit.restarts >= 1
    assert torch.equal(fit.detector.memory_bank_, calm.detector.memory_bank_)
    assert torch.equal(fit.detector.state_.provenance, calm.detector.state_.provenance)
    assert fit.coverage_radius == calm.coverage_radius


def _gone(pids: set[int], seconds: float = 1.0) -> list[int]:
    """The ``pids`` still running after up to ``seconds``."""
    import time

    end = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_workers_end_with_the_job(ray_session, model, images, tmp_path):
    """In a Ray that outlives the job (a cluster joined with --address, here the test's own),
    the job's actors end with it (Ray Data's pool kept them 8 s after the call)."""
    D.batch_score(model, images["test"][:8], tmp_path / "out", workers=2, block_size=2)
    pids = {
        int(w.rsplit(":", 1)[1]) for w in D.read_results(tmp_path / "out")["worker"].to_pylist()
    }
    assert pids and not _gone(pids)
    seen: list[str] = []
    D.fit_distributed(
        images["train"][:4], workers=2, on_stage=lambda w, ids: seen.extend(ids), **_fit_params()
    )
    pids = {int(w.rsplit(":", 1)[1]) for w in seen}
    assert len(pids) == 2 and not _gone(pids)


def test_workers_end_with_the_driver_and_log_no_error(model, images, tmp_path):
    """`patchcore batch` as a user runs it: its own local Ray, in its own process."""
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-c", "from patchcore.apps.cli import app; app()"]
    cmd = [*cli, "batch", str(model), *images["test"][:4]]
    done = subprocess.run(
        [*cmd, "--out", str(out), "--workers", "2", "--block-size", "2", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    pids = {int(w.rsplit(":", 1)[1]) for w in D.read_results(out).column("worker").to_pylist()}
    assert len(pids) >= 1 and os.getpid() not in pids
    assert not _gone(pids), "a Ray worker outlived `patchcore batch`"
    errors = [ln for ln in done.stderr.splitlines() if " E " in ln[:40] or "ERROR" in ln]
    assert not errors, errors


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


def test_cli_batch_and_fit_ray(ray_session, model, images, reference, tmp_path):
    from typer.testing import CliRunner

    from patchcore.apps.cli import app

    listing = _listing(tmp_path, images["test"][:4] + images["bad"][:1])
    args = ["batch", str(model), str(listing), "--out", str(tmp_path / "out"), "-q"]
    result = CliRunner().invoke(app, [*args, "--workers", "2", "--block-size", "2"])
    assert result.exit_code == 0, result.output
    assert "5 image(s): 0 already in" in result.output and "1 unreadable" in result.output
    table = D.read_results(tmp_path / "out")
    assert table.num_rows == 5
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "5 already in" in again.output
    # a missing image is an error row, not a failed job; only errors: exit code 1
    none = ["batch", str(model), str(tmp_path / "none.png"), "-o", str(tmp_path / "o2"), "-q"]
    missing = CliRunner().invoke(app, none)
    assert missing.exit_code == 1 and "1 unreadable" in missing.output
    assert D.read_results(tmp_path / "o2").column("error").to_pylist() == ["no such file"]

    train = tmp_path / "train"
    train.mkdir()
    for p in images["train"][:4]:
        (train / Path(p).name).symlink_to(p)
    (train / "zz_broken.png").write_bytes(b"not a PNG")
    fit_args = ["fit", str(train), "--out", str(tmp_path / "m.pt"), "--image-size", str(SIZE)]
    result = CliRunner().invoke(app, [*fit_args, "--ray", "--workers", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "on Ray:          2 worker(s), coverage radius" in result.output
    assert "1 unreadable skipped" in result.output
    fitted = PatchCore.load(tmp_path / "m.pt")
    assert fitted.n_train_images_ == 4
    assert fitted.metadata_["distributed_fit"]["shard_patches"] == [2 * (SIZE // 8) ** 2] * 2
    single = PatchCore(image_size=SIZE, progress=False).fit(images["train"][:4])
    assert fitted.memory_bank_.shape == single.memory_bank_.shape
