"""Files the workflow writes: whole or not at all, never over a file of another kind, one
model update at a time.

- :func:`atomic_file`: a temporary file in the target's folder, renamed over the target
  (``os.replace``) only once it is complete; removed on any failure, Ctrl-C included.
- Kinds: before replacing an existing file, :func:`check_target` makes sure it is one of ours
  (a model file, a regions file, a picture written by patchcore): anything else is refused
  unless ``force``.
- Folders (an evaluation report, the demo's output): :func:`new_folder` writes a new folder
  beside the target and swaps it in, so an interrupted run leaves the old one intact. An
  existing folder that is not one of ours is refused unless ``force``; with ``force`` the new
  files are moved into it and its other files are kept.
- :func:`check_writable` / :func:`check_writable_folder`: a read-only output location fails
  before any scoring work starts.
- :func:`model_transaction`: read-modify-write of a model file (``update``, ``calibrate``)
  under an exclusive lock (``fcntl.flock`` on ``.<name>.lock`` beside it) plus a
  compare-and-swap on the file's SHA-256: when the file changed since it was read (a writer
  that does not take the lock), nothing is written and :class:`ModelChangedError` says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere updates are guarded by the compare-and-swap alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import torch
from PIL import Image

from patchcore.apps.plots import PNG_SOFTWARE
from patchcore.apps.workflow.data import WorkflowError
from patchcore.core.persistence import FORMAT_NAME, ModelFileError

__all__ = [
    "FOLDER_MARKER",
    "MODEL",
    "PICTURE",
    "REGIONS",
    "REGIONS_CSV_HEADER",
    "REGIONS_FORMAT",
    "ModelChangedError",
    "ModelTransaction",
    "atomic_file",
    "check_folder_target",
    "check_target",
    "check_writable",
    "check_writable_folder",
    "file_digest",
    "model_transaction",
    "new_folder",
]

MODEL, REGIONS, PICTURE = (
    "a patchcore model file",
    "a regions file",
    "a picture written by patchcore",
)

#: The ``format`` entry of a regions JSON file.
REGIONS_FORMAT = "patchcore-regions"
#: The leading columns of a regions CSV file (then the region's own fields).
REGIONS_CSV_HEADER = ("image", "index", "verdict", "score", "region_threshold", "region")
#: Before the regions file followed the record (still recognised as ours).
_LEGACY_REGIONS_CSV = ("path", "verdict", "score", "region")

#: The file that marks a folder written by patchcore (a report, the demo's output).
FOLDER_MARKER = ".patchcore"
#: What a report folder written before the marker existed holds (still recognised as ours).
_LEGACY_FOLDER = {"report.html", "metrics.json", "figures", "gallery", "model.pt"}

_FORCE = "give --force to replace it, or choose another name"


class ModelChangedError(WorkflowError):
    """The model file changed on disk between reading and writing it (another writer)."""


def _fresh(path: Path, tag: str) -> Path:
    """A name beside ``path`` that no other process uses (hidden, ends with ``tag``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{tag}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``.

    The folder is created when missing. On any exception (KeyboardInterrupt included) the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ kinds


def _is_model(path: Path) -> bool:
    try:  # memory-mapped: only the small header is read, not the bank
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not a model file
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT_NAME


def _is_regions(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as fh:
            if path.suffix.lower() == ".csv":
                head = tuple(fh.readline().strip().split(","))
                return head[: len(REGIONS_CSV_HEADER)] == REGIONS_CSV_HEADER or (
                    head[: len(_LEGACY_REGIONS_CSV)] == _LEGACY_REGIONS_CSV
                )
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(doc, dict):
        return False
    return doc.get("format") == REGIONS_FORMAT or {"region_threshold", "images"} <= set(doc)


def _is_picture(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PNG_SOFTWARE
    except Exception:  # noqa: BLE001 - not an image at all
        return False


_KIND_CHECKS: dict[str, Callable[[Path], bool]] = {
    MODEL: _is_model,
    REGIONS: _is_regions,
    PICTURE: _is_picture,
}


def check_target(path: str | os.PathLike, kind: str, *, force: bool = False) -> Path:
    """Refuse to replace an existing ``path`` that is not of ``kind`` (unless ``force``), and
    check that it can be written. Nothing is written.

    Raises:
        WorkflowError: ``path`` is a folder, an existing file of another kind, or cannot be
            written there.
    """
    path = Path(path)
    if path.is_dir():
        raise WorkflowError(f"{path}: is a folder; give a file name, e.g. {path}/out")
    if path.exists() and not force and not _KIND_CHECKS[kind](path):
        raise WorkflowError(f"{path}: exists and is not {kind}; refusing to replace it ({_FORCE})")
    check_writable(path)
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after the work, when the file ``path`` cannot be created in its folder
    (the folder is created if missing).

    Raises:
        WorkflowError: naming the path and the reason (no permission, read-only, not a folder).
    """
    path = Path(path)
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise WorkflowError(f"{path}: cannot write there ({above} is a file, not a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = _fresh(path, "probe")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot write there ({exc.strerror or exc})") from None


def check_writable_folder(folder: str | os.PathLike, *, create: bool = False) -> Path:
    """Fail now when files cannot be written into ``folder``: it must be a writable folder,
    or not exist yet below a writable one (``create``: make it now).

    Raises:
        WorkflowError: naming the folder and the reason.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WorkflowError(f"{folder}: is a file, not a folder")
    if create or folder.is_dir():
        check_writable(folder / "probe")
        return folder
    above = folder.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    check_writable(above / folder.name)  # without creating anything yet
    return folder


def _is_our_folder(folder: Path) -> bool:
    entries = {p.name for p in folder.iterdir()}
    return FOLDER_MARKER in entries or entries <= _LEGACY_FOLDER


def check_folder_target(folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an existing, non-empty ``folder`` that patchcore did not write (unless
    ``force``), and check that its parent can be written. Nothing is written.

    Raises:
        WorkflowError: a file, a foreign folder, or a read-only location.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WorkflowError(f"{folder}: is a file, not a folder; {_FORCE}")
    if folder.is_dir() and not force and not _is_our_folder(folder):
        raise WorkflowError(
            f"{folder}: is a folder that patchcore did not write; refusing to replace it "
            "(give --force to write into it, keeping its other files, or choose another name)"
        )
    check_writable_folder(folder.parent, create=True)
    return folder


def _swap_in(new: Path, folder: Path) -> None:
    """Put the folder ``new`` at ``folder`` (whose old version, if any, is then deleted)."""
    if not folder.exists():
        os.rename(new, folder)
        return
    old = _fresh(folder, "old")
    os.rename(folder, old)
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _merge_into(new: Path, folder: Path) -> None:
    """Move each entry of ``new`` into the existing ``folder`` (same names replaced, files
    atomically and sub-folders swapped; other entries kept)."""
    for entry in sorted(new.iterdir()):
        target = folder / entry.name
        if entry.is_dir() and target.is_dir():
            _swap_in(entry, target)
        else:
            os.replace(entry, target)
    new.rmdir()


@contextlib.contextmanager
def new_folder(folder: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a new, empty folder beside ``folder`` to write into; on success it takes
    ``folder``'s place (see :func:`check_folder_target` for what is refused). On any
    exception it is deleted and ``folder`` is left as it was.
    """
    folder = check_folder_target(folder, force=force)
    foreign = folder.is_dir() and not _is_our_folder(folder)
    new = _fresh(folder, "new")
    new.mkdir()
    try:
        yield new
        if foreign:
            _merge_into(new, folder)
        else:
            (new / FOLDER_MARKER).write_text(json.dumps({"written_by": "patchcore"}) + "\n")
            _swap_in(new, folder)
    finally:
        shutil.rmtree(new, ignore_errors=True)


# ------------------------------------------------------------------------------ model updates


def file_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes; None when it is not a readable file (or not a path)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except (OSError, TypeError):
        return None
    return h.hexdigest()


class ModelTransaction:
    """A model file held for a read-modify-write (see :func:`model_transaction`)."""

    def __init__(self, target: Path, digest: str | None) -> None:
        self.target, self.digest = target, digest

    def save(self, det: Any) -> Path:
        """Write ``det`` to the target unless the file changed since the transaction began.

        Raises:
            ModelChangedError: the file's digest is not the one read at the start.
        """
        if file_digest(self.target) != self.digest:
            raise ModelChangedError(
                f"{self.target}: changed on disk while this command ran (another process "
                "wrote it); nothing written, so no update is lost: run the command again"
            )
        return det.save(self.target)


@contextlib.contextmanager
def model_transaction(
    target: str | os.PathLike, *, exists: bool = True
) -> Iterator[ModelTransaction]:
    """Hold ``target`` (a model file) for a read-modify-write.

    An exclusive ``flock`` on ``.<name>.lock`` in its folder serialises the commands that
    rewrite it (``update``, ``calibrate``, ``calibrate-regions``): the second waits for the
    first (with a warning that says so), then reads the first one's result.
    The file's digest is taken once the lock is held; :meth:`ModelTransaction.save` writes
    only when it is unchanged.

    Raises:
        ModelFileError: ``exists`` and there is no such file.
        WorkflowError: its folder cannot be written.
    """
    target = Path(target)
    if exists and not target.is_file():
        raise ModelFileError(f"{target}: no such model file")
    check_writable(target)
    lock = target.with_name(f".{target.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                warnings.warn(
                    f"{target}: another command is updating it; waiting for it to finish",
                    UserWarning,
                    stacklevel=3,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield ModelTransaction(target, file_digest(target))
    finally:
        os.close(fd)  # releases the lock
