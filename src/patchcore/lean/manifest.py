"""The export manifest ``patchcore-export.json``: its fields, their checks and its digest.

:func:`patchcore.core.export.export` writes the manifest beside the graph; the torch-free runtime
(:mod:`patchcore.lean.runtime`) reads it with :func:`load_export`, which fails closed:

- every field is checked when read (:data:`FIELD_CHECKS`: typed, finite, in range; unknown
  fields refused), and the message names the field and the value;
- the manifest carries ``digest``, the SHA-256 of all its other fields (canonical JSON), which
  include each graph file's own SHA-256 and size: an edited threshold or a replaced graph is
  refused. The digest detects edits and damage; it is not a signature (whoever can write the
  folder can also write a new digest);
- file entries are plain names of regular files inside the export folder (no ``..``, no
  absolute paths, no symbolic links that leave the folder). Nothing outside the folder is read,
  and errors never quote a file's content;
- the graph bytes are read once, checked, and handed to the backend from memory (what was
  checked is what runs).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchcore.lean import normalization, ood

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "FIELD_CHECKS",
    "MANIFEST",
    "ExportFileError",
    "LoadedExport",
    "digest",
    "export_kind",
    "file_entry",
    "load_export",
    "seal",
]

EXPORT_FORMAT = "patchcore-export"
EXPORT_VERSION = 2  # 2: file entries with their own digests, the manifest digest, record fields
MANIFEST = "patchcore-export.json"
MAX_MANIFEST_BYTES = 1 << 20
#: Processed image sides the exported graph accepts (the exporter's dynamic dimension range).
MIN_SIDE, MAX_SIDE = 32, 16384
MAX_BATCH = 4096
_HEX = frozenset("0123456789abcdef")


class ExportFileError(ValueError):
    """An export folder that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------- field checks
def _number(lo: float | None = None, hi: float | None = None, *, above: bool = False) -> Callable:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"must be a number, got {v!r}")
        x = float(v)
        if not math.isfinite(x):
            raise ValueError(f"must be a finite number, got {v!r}")
        if lo is not None and (x <= lo if above else x < lo):
            raise ValueError(f"must be {'>' if above else '>='} {lo:g}, got {v!r}")
        if hi is not None and x > hi:
            raise ValueError(f"must be <= {hi:g}, got {v!r}")
        return x

    return check


def _integer(lo: int, hi: int | None = None) -> Callable:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"must be an integer, got {v!r}")
        if v < lo or (hi is not None and v > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"must be an integer {bound}, got {v!r}")
        return int(v)

    return check


def _text(v: Any) -> str:
    if not isinstance(v, str) or len(v) > 1000:
        raise ValueError(f"must be a string (at most 1000 characters), got {type(v).__name__}")
    return v


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _const(value: Any) -> Callable:
    def check(v: Any) -> Any:
        if v != value:
            raise ValueError(f"must be {value!r}, got {v!r}")
        return v

    return check


def _optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def _size(v: Any) -> list[int]:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError(f"must be [height, width], got {v!r}")
    side = _integer(MIN_SIDE, MAX_SIDE)
    try:
        return [side(x) for x in v]
    except ValueError:
        raise ValueError(
            f"must be [height, width] with sides in [{MIN_SIDE}, {MAX_SIDE}] pixels (the "
            f"exported graph's range), got {v!r}"
        ) from None


def _texts(v: Any) -> list[str]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"must be a non-empty list of strings, got {v!r}")
    return [_text(x) for x in v]


def _range(v: Any) -> list[float]:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError(f"must be [low, high], got {v!r}")
    lo, hi = (_number()(x) for x in v)
    if not lo < hi:
        raise ValueError(f"must be [low, high] with low < high, got {v!r}")
    return [lo, hi]


def _mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"must be an object, got {type(v).__name__}")
    for k in ("low", "threshold", "high"):
        _number()(v.get(k))  # numbers, not strings such as "1e9"
    return normalization.check_mapping(v)


def _profile(v: Any) -> dict[str, Any]:
    prof = ood.check_profile(v)
    if prof is None:
        raise ValueError(f"is not an input profile of version {ood.PROFILE_VERSION}")
    return prof


def _floats(v: Any) -> dict[str, float]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ValueError(f"must be an object of numbers, got {v!r}")
    return {k: _number(0.0)(x) for k, x in v.items()}


def _source(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or set(v) != {"name", "bytes"}:
        raise ValueError(f"must be {{'name', 'bytes'}}, got {v!r}")
    return {"name": _text(v["name"]), "bytes": _integer(0)(v["bytes"])}


def _sha(v: Any) -> str:
    if not isinstance(v, str) or len(v) != 64 or not set(v) <= _HEX:
        raise ValueError("must be a SHA-256 as 64 lowercase hex digits")
    return v


def _file_name(v: Any) -> str:
    """A plain file name: no folder part, no '..', no absolute path, no odd characters."""
    ok = (
        isinstance(v, str)
        and 0 < len(v) <= 255
        and v not in (".", "..")
        and not any(c in v for c in "/\\\0:")
        and v.isprintable()
    )
    if not ok:
        raise ValueError(
            "must name a file inside the export folder (a plain file name: no folders, "
            "'..' or absolute paths)"
        )
    return v


def _entries(v: Any, keys: dict[str, Callable], most: int) -> list[dict[str, Any]]:
    """A list of 1 to ``most`` objects with exactly ``keys``, each value checked."""
    if not isinstance(v, list) or not 1 <= len(v) <= most:
        raise ValueError(f"must be a list of 1 to {most} entries")
    out = []
    for i, entry in enumerate(v):
        if not isinstance(entry, dict) or set(entry) != set(keys):
            raise ValueError(f"entry {i} must be {{{', '.join(map(repr, keys))}}}")
        try:
            out.append({k: check(entry[k]) for k, check in keys.items()})
        except ValueError as exc:
            raise ValueError(f"entry {i}: {exc}") from None
    return out


def _files(v: Any) -> list[dict[str, Any]]:
    out = _entries(v, {"name": _file_name, "sha256": _sha, "bytes": _integer(1)}, 16)
    if len({e["name"] for e in out}) != len(out):
        raise ValueError("names a file twice")
    if not any(e["name"].endswith((".onnx", ".xml")) for e in out):
        raise ValueError("holds no graph (.onnx or .xml)")
    return out


def _choice(*values: str) -> Callable:
    def check(v: Any) -> str:
        if v not in values:
            raise ValueError(f"must be one of {', '.join(map(repr, values))}, got {v!r}")
        return v

    return check


def _graphs(v: Any) -> list[dict[str, Any]]:
    """The graphs of an export: one for any size (``size`` null) or the fixed size, and
    fixed-size ones for common sizes; each an ONNX file and optionally an OpenVINO one."""
    keys = {"size": _optional(_size), "onnx": _file_name, "openvino": _optional(_file_name)}
    out = _entries(v, keys, 4)
    for i, g in enumerate(out):
        if not g["onnx"].endswith(".onnx") or not (g["openvino"] or ".xml").endswith(".xml"):
            raise ValueError(f"entry {i}: needs a .onnx graph and, if any, a .xml one")
    sizes = [None if g["size"] is None else tuple(g["size"]) for g in out]
    if len(set(sizes)) != len(sizes):
        raise ValueError("names one size twice")
    return out


_any_number = _optional(_number())
#: Every manifest field and its check; ``None`` is allowed only where the check is optional.
FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "format": _const(EXPORT_FORMAT),
    "version": _const(EXPORT_VERSION),
    "digest": _sha,
    "files": _files,
    "input": _const("pixels"),
    "outputs": _const(["scores", "maps"]),
    "dynamic": _flag,
    "processed_size": _optional(_size),
    "image_size": _optional(_size),
    "scale": _optional(_number(0.0, 16.0, above=True)),
    "batch_size": _integer(1, MAX_BATCH),
    "blur_radius": _integer(0, MAX_SIDE),
    "sigma": _number(0.0, 1000.0),
    "threshold": _any_number,
    "threshold_method": _optional(_text),
    "normalization": _optional(_mapping),
    "normalization_source": _optional(_text),
    "region_threshold": _any_number,
    "display_range": _optional(_range),
    "input_profile": _optional(_profile),
    "backbone": _text,
    "layers": _texts,
    "bank_rows": _integer(1),
    "num_neighbors": _integer(1),
    "top_k": _integer(1),
    "search": _choice("float32", "int8", "bfloat16"),
    "graphs": _graphs,
    "backbone_dtype": _text,
    "package_version": _text,
    "torch_version": _text,
    "exporter": _text,
    "opset": _integer(1, 1000),
    "probe_parity": _floats,
    "export_seconds": _number(0.0),
    "source_model": _optional(_source),
}
OPTIONAL_FIELDS = frozenset({"source_model", "region_threshold", "display_range", "input_profile"})


def _check_fields(info: dict[str, Any]) -> dict[str, Any]:
    """Every field checked (``ValueError`` naming the first bad one); returns the clean dict."""
    unknown = sorted(set(info) - set(FIELD_CHECKS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown[:5]))}")
    missing = sorted(set(FIELD_CHECKS) - set(info) - OPTIONAL_FIELDS)
    if missing:
        raise ValueError(f"field(s) missing: {', '.join(missing)}")
    out = {}
    for key, check in FIELD_CHECKS.items():
        if key in info:
            try:
                out[key] = check(info[key])
            except ValueError as exc:
                raise ValueError(f"{key} {exc}") from None
    norm, t = out["normalization"], out["threshold"]
    if norm is not None and (t is None or norm["threshold"] != t):
        raise ValueError(
            f"normalization's threshold {norm['threshold']!r} is not the threshold {t!r}"
        )
    if out["dynamic"] == (out["processed_size"] is not None):
        raise ValueError("processed_size must be set for a fixed-size export, and only then")
    if not out["dynamic"] and out["image_size"] != out["processed_size"]:
        raise ValueError("image_size must equal processed_size in a fixed-size export")
    named = {e["name"] for e in out["files"]}
    listed = {n for g in out["graphs"] for n in (g["onnx"], g["openvino"]) if n is not None}
    listed |= {g["openvino"][: -len(".xml")] + ".bin" for g in out["graphs"] if g["openvino"]}
    if not listed <= named:
        raise ValueError(f"graphs name files the manifest does not list: {sorted(listed - named)}")
    main = [g["size"] for g in out["graphs"]][0]
    if main != out["processed_size"]:
        raise ValueError("graphs must start with the export's own graph (any size, or its size)")
    return out


# ----------------------------------------------------------------------------- digests
def digest(info: dict[str, Any]) -> str:
    """SHA-256 (hex) of every field but ``digest`` as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in info.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def seal(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with its ``digest``; checked as :func:`load_export` will check it.

    Raises:
        ValueError: a field the runtime would refuse (the message names it).
    """
    sealed = {**info, "digest": "0" * 64}
    _check_fields(sealed)
    sealed["digest"] = digest(sealed)
    return sealed


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a file just written: name, SHA-256 and size."""
    data = Path(path).read_bytes()
    return {"name": Path(path).name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class LoadedExport:
    """A checked export: its folder, its fields (``info["graphs"]``: each graph's size, ONNX
    and OpenVINO file) and the bytes of each file (by name)."""

    root: Path
    info: dict[str, Any]
    data: dict[str, bytes]


def _regular(root: Path, name: str, what: str) -> Path:
    """``root/name`` if it is a regular file inside ``root`` (a link may stay inside)."""
    path = root / name
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if path.resolve(strict=True).parent != root.resolve(strict=True):
                raise ExportFileError(
                    f"{root}: {what} {name!r} is a symbolic link out of the export folder: refused"
                )
            st = os.stat(path)
    except FileNotFoundError:
        raise ExportFileError(f"{root}: {what} {name!r} is missing") from None
    except OSError as exc:
        raise ExportFileError(f"{root}: {what} {name!r} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ExportFileError(f"{root}: {what} {name!r} is not a regular file")
    return path


def _read_manifest(root: Path, any_version: bool = False) -> dict[str, Any]:
    if not os.path.lexists(root / MANIFEST):
        raise ExportFileError(
            f"{root / MANIFEST}: no export manifest (run 'patchcore export' first)"
        )
    path = _regular(root, MANIFEST, "the manifest")
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ExportFileError(f"{path}: over {MAX_MANIFEST_BYTES:,} bytes: not an export manifest")
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ExportFileError(f"{path}: not valid JSON: not an export manifest") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise ExportFileError(f"{path}: not a patchcore export manifest")
    if info.get("version") != EXPORT_VERSION and not any_version:
        raise ExportFileError(
            f"{path}: export version {info.get('version')!r}; this runtime reads version "
            f"{EXPORT_VERSION} (export the model again with this version of patchcore)"
        )
    return info


def export_kind(folder: str | os.PathLike) -> str:
    """What a folder holds: ``"missing"``, ``"empty"``, ``"export"`` (a patchcore export
    manifest of any version) or ``"other"`` (used before an export replaces a folder)."""
    root = Path(folder)
    if not os.path.lexists(root):
        return "missing"
    if not root.is_dir() or root.is_symlink():
        return "other"
    if not any(root.iterdir()):
        return "empty"
    try:
        _read_manifest(root, any_version=True)
    except ExportFileError:
        return "other"
    return "export"


def load_export(folder: str | os.PathLike) -> LoadedExport:
    """Read and check an export folder (or its manifest / graph file): fields, digest, files.

    Raises:
        ExportFileError: missing, foreign, newer or older, a field out of range (named), a
            digest that does not match (edited or damaged), or a file entry that leaves the
            folder or does not match its SHA-256.
    """
    root = Path(folder)
    if root.is_file():  # a path to the manifest or the graph: its folder
        root = root.parent
    info = _read_manifest(root)
    where = root / MANIFEST
    try:
        clean = _check_fields(info)
    except ValueError as exc:
        raise ExportFileError(f"{where}: {exc}: export the model again") from None
    if digest(info) != info["digest"]:
        raise ExportFileError(
            f"{where}: the manifest's fields do not match its digest (edited or damaged): "
            "export the model again"
        )
    data = {}
    for entry in clean["files"]:
        path = _regular(root, entry["name"], "graph file")
        with open(path, "rb") as f:
            raw = f.read(entry["bytes"] + 1)
        if len(raw) != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise ExportFileError(
                f"{where}: {entry['name']} does not match the manifest's size and SHA-256 "
                "(damaged or replaced): export the model again"
            )
        data[entry["name"]] = raw
    return LoadedExport(root, clean, data)
