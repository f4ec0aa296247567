"""The lean distribution (runtime/) ships exactly the torch-free part (issue #20).

Builds the wheel from a copy of ``runtime/`` and ``src/`` (``pip wheel --no-deps
--no-build-isolation``: no network, no build files left in the checkout), compares its file list
with the torch-free trees of the source (``patchcore/__init__.py``, ``patchcore/apps/__init__.py``,
``patchcore/lean/**``, ``patchcore/apps/service/**`` less its torch backend), and imports every
module of the wheel, from the wheel, in a process where ``import torch`` fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Modules of the shipped trees that need torch: left out of the lean wheel.
TORCH_ONLY = {"patchcore/apps/service/torch_backend.py"}
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


def _expected() -> set[str]:
    src = ROOT / "src"
    files = {"patchcore/__init__.py", "patchcore/apps/__init__.py"}
    for tree in ("patchcore/lean", "patchcore/apps/service"):
        for p in (src / tree).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                files.add(p.relative_to(src).as_posix())
    return files - TORCH_ONLY


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("lean")
    shutil.copytree(ROOT / "runtime", work / "runtime", ignore=SKIP)
    shutil.copytree(ROOT / "src", work / "src", ignore=SKIP)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        [*cmd, str(work / "runtime"), "-w", str(work / "wheel")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = (work / "wheel").glob("patchcore_runtime-*.whl")
    return found


def test_the_wheel_holds_exactly_the_torch_free_part(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if ".dist-info/" not in n}
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
        entry = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert names == _expected(), (sorted(names - _expected()), sorted(_expected() - names))
    requires = {
        line.split(":", 1)[1].strip() for line in meta.splitlines() if "Requires-Dist" in line
    }
    assert {r for r in requires if "extra ==" not in r} == {
        "onnxruntime>=1.17", "numpy>=1.24", "pillow>=10", "scipy>=1.10",
    }  # fmt: skip
    assert not any("torch" in r for r in requires)
    assert "patchcore-run = patchcore.lean.runtime_cli:console" in entry


def test_every_module_of_the_wheel_imports_without_torch(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    modules = sorted(
        p.relative_to(site).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for p in site.rglob("*.py")
    )
    script = textwrap.dedent(
        f"""
        import importlib, json, sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        sys.path.insert(0, {str(site)!r})
        where = {{}}
        for name in {modules!r}:
            where[name] = importlib.import_module(name).__file__
        loaded = [k for k, v in sys.modules.items() if v is not None and k.split(".")[0] in
                  ("torch", "torchvision")]
        print(json.dumps({{"where": where, "torch": loaded}}))
        """
    )
    env = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH: the editable checkout must not be found first
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["torch"] == []
    assert len(out["where"]) == len(modules) >= 15
    assert all(f.startswith(str(site)) for f in out["where"].values()), out["where"]
