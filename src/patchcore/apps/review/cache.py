"""The review's cache beside the model: ``MODEL.review/``.

Everything the page shows is computed once and kept here, keyed by the SHA-256 of the model
file's bytes and of each image file's bytes, so re-opening the same model on the same images
reads files instead of scoring, and a changed image or model is scored again::

    MODEL.review/
      <model digest[:16]>/           one folder per model file version
        entries.json                 image digest -> {"record": the inspection record, ...}
        maps/<image digest[:20]>.npy the anomaly map, shrunk to MAP_SIDE px (float16)
        thumbs/<image digest[:20]>.jpg
        explain/<image digest[:20]>.json / .png
      reports/<UTC time>/report.html exported views

Writes are atomic (a temporary file, then a rename), so a review stopped half-way leaves a
readable cache that holds what was scored before the stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAP_SIDE", "Cache", "file_digest", "write_atomic"]

#: Longest side of a cached anomaly map (the native map is shrunk to it for tiles and heatmaps).
MAP_SIDE = 192
_KEY = 20  # hex characters of an image digest used in file names


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex (raises OSError when it cannot be read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class Cache:
    """The cache folder of one model file (see the module docstring).

    Args:
        model_path: the model file; the cache is ``<model_path>.review`` unless ``root`` is
            given.
        root: another cache folder.
    """

    def __init__(self, model_path: str | os.PathLike, root: str | os.PathLike | None = None):
        model_path = Path(model_path)
        self.root = (
            Path(root) if root is not None else model_path.with_name(model_path.name + ".review")
        )

    def model_dir(self, model_digest: str) -> Path:
        """The folder of one model version."""
        return self.root / model_digest[:16]

    def load_entries(self, model_digest: str) -> dict[str, dict[str, Any]]:
        """The cached entries of a model version (empty when none or unreadable)."""
        path = self.model_dir(model_digest) / "entries.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("model_digest") != model_digest:
            return {}
        return dict(data.get("entries") or {})

    def save_entries(self, model_digest: str, entries: dict[str, dict[str, Any]]) -> None:
        """Write a model version's entries (atomically)."""
        payload = {"model_digest": model_digest, "entries": entries}
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        write_atomic(self.model_dir(model_digest) / "entries.json", text.encode("utf-8"))

    def path(self, model_digest: str, kind: str, image_digest: str, suffix: str) -> Path:
        """``<model dir>/<kind>/<image digest>.<suffix>``."""
        return self.model_dir(model_digest) / kind / f"{image_digest[:_KEY]}.{suffix}"

    def save_map(self, model_digest: str, image_digest: str, small: np.ndarray) -> None:
        """Keep a shrunk anomaly map (float16)."""
        target = self.path(model_digest, "maps", image_digest, "npy")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp.npy")
        np.save(tmp, np.asarray(small, dtype=np.float16))
        os.replace(tmp, target)

    def load_map(self, model_digest: str, image_digest: str) -> np.ndarray | None:
        """A shrunk anomaly map as float32, or None."""
        try:
            return np.load(self.path(model_digest, "maps", image_digest, "npy")).astype(np.float32)
        except (OSError, ValueError):
            return None

    def carry_over(self, old_digest: str, new_digest: str) -> None:
        """Reuse a model version's folder for a new file version whose scores are the same
        (the review changed only the threshold): the folder is renamed, the entries re-keyed."""
        old, new = self.model_dir(old_digest), self.model_dir(new_digest)
        if old == new or not old.is_dir():
            return
        entries = self.load_entries(old_digest)
        if new.exists():
            shutil.rmtree(new)
        os.replace(old, new)
        self.save_entries(new_digest, entries)

    def reports_dir(self) -> Path:
        """Where exported reports go."""
        return self.root / "reports"
