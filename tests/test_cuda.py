"""The estimator on a CUDA device (run by benchmarks/gpu_check.sh; skipped without CUDA): the
device is picked, scores and maps agree with the CPU's, a model saved from the GPU reloads on
the CPU with the same scores, and size buckets keep input order on the GPU too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore.core.detector import PatchCore

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.cuda


def _images(n: int, seed: int, sizes=((64, 64),)) -> list[np.ndarray]:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "gpu.log"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(log)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout and not log.exists()


@pytest.fixture(scope="module")
def fitted() -> tuple[PatchCore, PatchCore]:
    train = _images(6, 0)
    gpu = PatchCore(coreset_ratio=0.2, device="auto", progress=False).fit(train)
    cpu = PatchCore(coreset_ratio=0.2, device="cpu", progress=False).fit(train)
    return gpu, cpu


@needs_cuda
def test_auto_picks_cuda(fitted: tuple[PatchCore, PatchCore]) -> None:
    gpu, _ = fitted
    assert gpu.device_.type == "cuda"
    assert gpu.memory_bank_.device.type == "cuda"


@needs_cuda
def test_gpu_scores_and_maps_agree_with_the_cpu(fitted: tuple[PatchCore, PatchCore]) -> None:
    gpu, cpu = fitted
    test = _images(5, 1)
    g = gpu.score(test, maps="native")
    c = cpu.score(test, maps="native")
    np.testing.assert_allclose(g.scores, c.scores, rtol=2e-3)
    for a, b in zip(g.maps, c.maps, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(np.abs(b).max()))


@needs_cuda
def test_saved_on_gpu_reloads_on_cpu(fitted: tuple[PatchCore, PatchCore], tmp_path: Path) -> None:
    gpu, _ = fitted
    path = gpu.save(tmp_path / "m.pt")
    back = PatchCore.load(path, device="cpu")
    test = _images(3, 2)
    np.testing.assert_allclose(back.score_samples(test), gpu.score_samples(test), rtol=2e-3)


@needs_cuda
def test_mixed_sizes_keep_input_order_on_gpu(fitted: tuple[PatchCore, PatchCore]) -> None:
    gpu, _ = fitted
    test = _images(9, 3, sizes=((64, 64), (48, 80), (80, 48)))
    results = list(gpu.iter_score(test, maps="native", size_buckets=True))
    assert [r.index for r in results] == list(range(9))
    assert [r.map.shape for r in results] == [t.shape[:2] for t in test]
    alone = [gpu.score_samples([t])[0] for t in test]
    np.testing.assert_allclose([r.score for r in results], alone, rtol=1e-4)
