"""Default-path scores and native maps against two commits: 667b4ee (before the input
pipeline, scoring rule and region changes of issue #20) to float rounding, and the latest
commit that meant to change the arithmetic (:data:`SAME_AS`) bit for bit.

Since 667b4ee three changes moved bits on purpose: the bfloat16 scan's tighter error bound
(12d87ce: fewer patches re-checked in float32, so more map values are the scan's estimates,
within 1 % of each map's maximum), one search for several images of different sizes
(the float32 re-check of their patches in one product: image scores within 1e-6 relative), and
the int8 scan as the default on CPUs with int8 dot products (map values the float32 distance to
the row it found instead of the bfloat16 estimate: nearer float32's, within 1 % of each map's
maximum of 667b4ee's; image scores as before).

Each commit's ``src/`` is exported with ``git archive`` and the same script
(``tests/_unchanged_run.py``) runs under it and under this checkout, each in a subprocess with
the same environment on the same CPU (floats depend on the CPU, so nothing is compared with
numbers stored in the repo). With ``CI`` set the test fails instead of skipping when git, the
commit or the data are missing. The cases name their backbone (that commit defaulted to
efficientnet-lite0, today's default is efficientnet-lite2), so both backbones are pinned, and
the default's other parameters are those of that commit.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CI, data_set

BEFORE = "667b4ee"
#: the commit whose scores and maps today's equal bit for bit (None: only BEFORE's checks)
SAME_AS: str | None = "fcb0422"
#: against BEFORE: image scores to this relative difference, maps to this share of their maximum
SCORE_RTOL, MAP_RTOL = 1e-6, 0.01
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_unchanged_run.py")


def _unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why} (CI is set: the bit-identity test must run)")
    pytest.skip(why)


def _export_before(dest: Path, commit: str = BEFORE) -> Path:
    git = shutil.which("git")
    if git is None:
        _unavailable("git not found")
    done = subprocess.run(
        [git, "-C", str(ROOT), "archive", commit, "src"], capture_output=True, check=False
    )
    if done.returncode != 0:
        _unavailable(f"commit {commit} not in this clone: {done.stderr.decode()[:200]}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def _run(src: Path, out: Path, data: Path) -> dict[str, np.ndarray]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(data)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_scores_and_maps_are_those_of_before(tmp_path: Path) -> None:
    data = data_set()
    before = _run(_export_before(tmp_path / "before"), tmp_path / "before.npz", data)
    now = _run(ROOT / "src", tmp_path / "now.npz", data)
    assert sorted(before) == sorted(now)
    maps = [k for k in now if ".map" in k]
    assert len(maps) == 6 * 7
    far = [
        k
        for k in now
        if k not in maps and np.abs(now[k] - before[k]).max() > SCORE_RTOL * np.abs(before[k]).max()
    ]
    assert not far, f"scores moved by more than {SCORE_RTOL:.0e} since {BEFORE}: {far}"
    far = [k for k in maps if np.abs(now[k] - before[k]).max() > MAP_RTOL * before[k].max()]
    assert not far, f"maps moved by more than {MAP_RTOL:.0%} of their maximum: {far}"
    if SAME_AS is not None:
        ref = _run(_export_before(tmp_path / "same", SAME_AS), tmp_path / "same.npz", data)
        differ = [k for k in now if not np.array_equal(ref[k], now[k])]
        assert not differ, f"changed since {SAME_AS}: {differ}"
    # the comparison can fail: scores are not all equal and maps are not constant, and the
    # backbones differ between cases
    assert not np.array_equal(now["casting.scores"], now["casting_lite0.scores"])
    assert len(set(now["casting.scores"].tolist())) > 1 and np.ptp(now["tile.map0"]) > 0


def test_the_pinned_cases_include_the_default_backbone() -> None:
    from _unchanged_run import LITE2

    from patchcore import PatchCore

    assert PatchCore().backbone == LITE2["backbone"]
