"""The inputs of a batch job: folders, globs, list files and URIs -> row keys, each once.

A row's key is the absolute local path (normalised, symbolic links not followed: two links are
two inputs) or the URI as given; the output's rows and the resume are keyed by it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchcore.lean.decode import decode_bytes
from patchcore.lean.pixels import IMAGE_SUFFIXES, input_limits, list_images
from patchcore.scale.session import BatchError, pyarrow_module

__all__ = ["is_uri", "list_sources", "read_uri", "row_key"]


def is_uri(s: str) -> bool:
    """Whether ``s`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in s


def row_key(path: str) -> str:
    """The row key of an input: its absolute local path, or a URI as given.

    Absolute and normalised (``..`` and ``.`` removed) but symbolic links are not followed: two
    links to one file are two inputs, each named in the output as it was listed.
    """
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def _read_list(spec: str) -> list[str]:
    """The paths in a ``.txt`` (one per line, ``#`` comments) or ``.parquet`` list file."""
    pa = pyarrow_module()
    pafs = pa.fs

    if is_uri(spec):
        filesystem, where = pafs.FileSystem.from_uri(spec)
    else:
        filesystem, where = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))
    try:
        if spec.lower().endswith(".parquet"):
            table = pa.parquet.read_table(where, filesystem=filesystem)
            if "path" not in table.column_names:
                raise BatchError(
                    f"{spec}: a Parquet list needs a 'path' column, has {table.column_names}"
                )
            paths = [p for p in table.column("path").to_pylist() if p]
        else:
            with filesystem.open_input_stream(where) as f:
                text = f.read().decode("utf-8")
            lines = (ln.strip() for ln in text.splitlines())
            paths = [ln for ln in lines if ln and not ln.startswith("#")]
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise BatchError(f"{spec}: cannot read the list of paths ({exc})") from None
    # relative paths in a local list are relative to the list's folder
    base = None if is_uri(spec) else Path(where).parent
    return [p if is_uri(p) or base is None else str(base / Path(p).expanduser()) for p in paths]


def list_sources(sources: Sequence[str | os.PathLike], *, recursive: bool = False) -> list[str]:
    """Folders, globs, list files and image paths -> the inputs, each once, in order.

    Args:
        sources: each a folder (its images), a glob (``"/data/**/*.png"``), a ``.txt`` list
            (one path per line) or a ``.parquet`` list (a ``path`` column), local or a URI
            any pyarrow filesystem opens (``s3://``, ``gs://``, ``file://``...), or an image
            path (kept even if missing: it becomes an error row).
        recursive: also list sub-folders of folders.

    Returns:
        row keys (absolute local paths, URIs as given), duplicates dropped.

    Raises:
        BatchError: a folder without images, a glob matching nothing, an unreadable list, or
            no input at all.
    """
    found: list[str] = []
    for src in map(str, sources):
        low = src.lower()
        p = Path(src).expanduser()
        if low.endswith((".txt", ".parquet")):
            found += _read_list(src)
        elif is_uri(src):
            found.append(src)
        elif p.is_dir():
            images = list_images(p, recursive=recursive)
            if not images:
                raise BatchError(f"{p}: no images found ({', '.join(IMAGE_SUFFIXES)})")
            found += map(str, images)
        elif glob.has_magic(src):
            matches = sorted(glob.glob(str(p), recursive=True))
            matches = [m for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise BatchError(f"{src}: the pattern matches no image")
            found += matches
        else:
            found.append(src)
    keys = list(dict.fromkeys(row_key(f) for f in found))
    if not keys:
        raise BatchError("no images given")
    return keys


def read_uri(uri: str) -> np.ndarray:
    """The decoded pixels of the image at ``uri`` (any file system pyarrow opens), under the
    limits :func:`patchcore.lean.pixels.read_image` applies to local files.

    Raises:
        ImageReadError: not an image, over the limits. OSError: missing, no access.
    """
    filesystem, where = pyarrow_module().fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(where) as f:
        data = f.read()
    lim = input_limits()
    return decode_bytes(
        data, name=uri, max_pixels=lim.max_pixels, max_aspect_ratio=lim.max_aspect_ratio
    )
