"""Shared fixtures: paths to the real data sets and small synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_CI = bool(os.environ.get("CI"))


def data_set(name: str = "") -> Path:
    """Root of a real data set in ../shared/data (``""``: the folder itself).

    Missing: the test fails when the environment variable ``CI`` is set (CI must run the
    real-data tests), and is skipped otherwise (a developer machine without the data).
    """
    root = DATA / name if name else DATA
    if not root.is_dir():
        if IN_CI:
            pytest.fail(f"real data set {root} missing (CI is set: CI must provide it)")
        pytest.skip(f"real data set {root} not present")
    return root


def run_cli(*args: object, env: dict[str, str] | None = None):
    """``patchcore ARGS`` in this process (typer's ``CliRunner``); arguments are ``str``-ed."""
    from typer.testing import CliRunner

    from patchcore.apps.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def link(src: Path, dst: Path) -> None:
    """A symbolic link ``dst`` to ``src`` (its folders made)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def link_first(src: Path, dst: Path, n: int) -> list[Path]:
    """Links in folder ``dst`` to the first ``n`` files of folder ``src`` (sorted by name);
    returns those files (nothing is copied)."""
    files = sorted(src.iterdir())[:n]
    for f in files:
        link(f, dst / f.name)
    return files


@pytest.fixture
def real_data() -> Path:
    """``../shared/data``, see :func:`data_set`."""
    return data_set()


needs_data = pytest.mark.usefixtures("real_data")


def textured(rng: np.random.Generator, size: int = 96, defect: bool = False) -> np.ndarray:
    """A regular striped texture with noise; ``defect`` adds a bright blob. uint8 HxWx3."""
    y, x = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.25 * np.sin(x / 3.0) + rng.normal(0, 0.03, (size, size))
    if defect:
        cy, cx = rng.integers(20, size - 20, 2)
        base[(y - cy) ** 2 + (x - cx) ** 2 < 36] = 1.0
    img = np.clip(base * 255, 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


@pytest.fixture(scope="session")
def toy_images() -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(train normals, test normals, test defects) of the striped texture."""
    rng = np.random.default_rng(0)
    train = [textured(rng) for _ in range(6)]
    good = [textured(rng) for _ in range(4)]
    bad = [textured(rng, defect=True) for _ in range(4)]
    return train, good, bad


@pytest.fixture
def canvases(monkeypatch) -> list[tuple[int, ...]]:
    """The (B, 3, H, W) shape of every canvas the fused plans run during the test (images of
    mixed sizes sharing one pass, :meth:`patchcore.core.fused.FusedPlan.forward_many`)."""
    from patchcore.core import fused

    shapes: list[tuple[int, ...]] = []
    call = fused.FusedPlan.__call__

    def spy(plan, x, boxes=None):  # noqa: ANN001, ANN202
        if boxes is not None:
            shapes.append(tuple(x.shape))
        return call(plan, x, boxes)

    monkeypatch.setattr(fused.FusedPlan, "__call__", spy)
    return shapes
