"""The export manifest fails closed (issue #25): digest over every field and file, each field
checked when read, file entries confined to the export folder.

On the tiny synthetic export of ``_runtime_export`` (no torch, no fitting): each case edits a
sealed manifest as a user or an attacker would and expects a refusal that says what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from _runtime_export import edit_manifest, synthetic_export

from patchcore.lean.manifest import MANIFEST, ExportFileError, export_kind, load_export
from patchcore.lean.runtime import ExportedModel

WHITE = np.full((64, 64, 3), 255, np.uint8)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return synthetic_export(tmp_path / "export", threshold=35.98, normalization=None)


def test_a_sealed_export_loads_and_scores(export):
    model = ExportedModel(export)
    assert model.threshold == 35.98 and model.backend == "onnxruntime"
    assert model.score_samples([WHITE]) == pytest.approx([1.0])


def test_an_edited_threshold_is_refused(export):
    edit_manifest(export, threshold=75.98)  # one digit: defective parts would "pass"
    with pytest.raises(ExportFileError, match="do not match its digest"):
        ExportedModel(export)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1e9", "threshold must be a number, got '1e9'"),
        (math.nan, "threshold must be a finite number, got nan"),
        (math.inf, "threshold must be a finite number, got inf"),
        (True, "threshold must be a number, got True"),
    ],
)
def test_a_threshold_that_is_not_a_finite_number_is_refused(export, value, message):
    edit_manifest(export, reseal=True, threshold=value)  # even with a recomputed digest
    with pytest.raises(ExportFileError, match=message):
        ExportedModel(export)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", -1, r"batch_size must be an integer in \[1, 4096\], got -1"),
        ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
        ("image_size", [4, 4], r"image_size must be \[height, width\] with sides in \[32, "),
        ("scale", -0.4, "scale must be > 0, got -0.4"),
        ("sigma", "4", "sigma must be a number, got '4'"),
        ("dynamic", "yes", "dynamic must be true or false"),
        ("normalization", {"kind": "piecewise_linear", "low": 0, "threshold": "1e9", "high": 2},
         "normalization must be a number, got '1e9'"),
        ("region_threshold", math.nan, "region_threshold must be a finite number"),
        ("display_range", [3.0, 1.0], "display_range must be .* low < high"),
        ("input_profile", {"version": 1, "height": [300, "x"]},
         "input_profile is not an input profile of version 1"),
        ("surprise", 1, "unknown field"),
        ("search", "int4", "search must be one of 'float32', 'int8'"),
        ("graphs", [{"size": None, "onnx": "other.onnx", "openvino": None}],
         "graphs name files the manifest does not list"),
        ("graphs", [{"size": [300, 300], "onnx": "model.onnx", "openvino": None}],
         "graphs must start with the export's own graph"),
        ("graphs", [{"size": None, "onnx": "../model.onnx", "openvino": None}],
         "graphs entry 0: must name a file inside the export folder"),
    ],
)  # fmt: skip
def test_every_field_is_checked_and_named(export, field, value, message):
    edit_manifest(export, reseal=True, **{field: value})
    with pytest.raises(ExportFileError, match=message):
        ExportedModel(export)


def test_a_missing_field_is_named(export):
    info = json.loads((export / MANIFEST).read_text())
    del info["threshold"]
    (export / MANIFEST).write_text(json.dumps(info))
    with pytest.raises(ExportFileError, match="field.s. missing: threshold"):
        ExportedModel(export)


def test_normalization_must_agree_with_the_threshold(tmp_path):
    mapping = {"kind": "piecewise_linear", "low": 0.0, "threshold": 0.5, "high": 1.0}
    with pytest.raises(ValueError, match="normalization's threshold 0.5 is not the threshold 0.7"):
        synthetic_export(tmp_path, threshold=0.7, normalization=mapping)


SECRET = "root:x:0:0:do-not-print-me"


@pytest.mark.parametrize("entry", ["../outside.onnx", "/etc/passwd", "sub/model.onnx", ".."])
def test_file_entries_stay_inside_the_folder(export, entry):
    outside = export.parent / "outside.onnx"
    outside.write_text(SECRET)
    info = json.loads((export / MANIFEST).read_text())
    info["files"][0]["name"] = entry
    (export / MANIFEST).write_text(json.dumps(info))
    with pytest.raises(ExportFileError, match="a plain file name") as err:
        ExportedModel(export)
    assert SECRET not in str(err.value)


def test_a_graph_outside_the_folder_with_a_matching_digest_is_refused(export):
    """The graph moved out and linked back in: the digest matches, the link leaves the folder."""
    outside = export.parent / "outside.onnx"
    os.replace(export / "model.onnx", outside)
    (export / "model.onnx").symlink_to(outside)
    with pytest.raises(ExportFileError, match="symbolic link out of the export folder"):
        ExportedModel(export)
    # a link that stays inside the folder is fine
    (export / "model.onnx").unlink()
    os.replace(outside, export / "real.onnx")
    (export / "model.onnx").symlink_to("real.onnx")
    assert ExportedModel(export).score_samples([WHITE]) == pytest.approx([1.0])


def test_a_manifest_linked_from_elsewhere_is_refused(export, tmp_path):
    elsewhere = tmp_path / "m.json"
    os.replace(export / MANIFEST, elsewhere)
    (export / MANIFEST).symlink_to(elsewhere)
    with pytest.raises(ExportFileError, match="symbolic link out of the export folder"):
        load_export(export)


def test_a_replaced_or_damaged_graph_is_refused(export):
    data = bytearray((export / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (export / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportFileError, match="does not match the manifest's size and SHA-256"):
        ExportedModel(export)


def test_foreign_newer_and_missing_manifests(export, tmp_path):
    with pytest.raises(ExportFileError, match="no export manifest"):
        ExportedModel(tmp_path)
    edit_manifest(export, version=99)
    with pytest.raises(ExportFileError, match="export version 99"):
        ExportedModel(export)
    (export / MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(ExportFileError, match="not a patchcore export manifest"):
        ExportedModel(export)
    (export / MANIFEST).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ExportFileError, match="not valid JSON"):
        ExportedModel(export)


def test_what_a_folder_holds(export, tmp_path):
    assert export_kind(export) == "export"
    assert export_kind(tmp_path / "nothing") == "missing"
    (tmp_path / "empty").mkdir()
    assert export_kind(tmp_path / "empty") == "empty"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    assert export_kind(tmp_path / "notes") == "other"
    assert export_kind(tmp_path / "notes" / "a.txt") == "other"


# ------------------------------------------------------------------ a manifest fuzz pass

#: Values a damaged or hostile manifest may hold in any field.
ODD_VALUES = [
    None, math.nan, math.inf, -math.inf, -1, 0, 2.5, 1e308, -1e308, True, "", "0.5", "../x",
    [], [None], [1, 2, 3], {}, {"a": 1}, "x" * 10_000, list(range(1000)),
]  # fmt: skip
FUZZ_CASES = int(os.environ.get("PATCHCORE_FUZZ_EXAMPLES", "300"))


def _mutated(info: dict, rng: np.random.Generator) -> tuple[dict | bytes, bool]:
    """One seeded damage of a sealed manifest: a field set to an odd value, deleted, added,
    swapped with another's, or the file's bytes cut or flipped; whether to reseal it."""
    info = json.loads(json.dumps(info))
    keys = sorted(info)
    kind = rng.integers(5)
    if kind == 0:
        info[keys[rng.integers(len(keys))]] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    elif kind == 1:
        del info[keys[rng.integers(len(keys))]]
    elif kind == 2:
        info[f"extra_{rng.integers(100)}"] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    elif kind == 3:
        a, b = rng.choice(keys, 2, replace=False)
        info[a], info[b] = info[b], info[a]
    else:
        raw = bytearray(json.dumps(info).encode())
        if rng.integers(2):
            raw = raw[: rng.integers(len(raw))]
        else:
            raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
        return bytes(raw), False
    return info, bool(rng.integers(2))


def test_fuzzed_manifests_load_or_are_refused_by_name(tmp_path):
    """Seeded damage of every kind: each manifest either loads with a finite (or no) threshold
    or is refused with ExportFileError, never another exception; damage without a new digest
    is always refused (when it changed anything)."""
    from patchcore.lean.manifest import digest

    folder = synthetic_export(tmp_path / "export", threshold=35.98, normalization=None)
    pristine = json.loads((folder / MANIFEST).read_text())
    rng = np.random.default_rng(25)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(FUZZ_CASES):
        damaged, reseal = _mutated(pristine, rng)
        if isinstance(damaged, dict):
            if reseal:
                damaged["digest"] = digest(damaged)
            text = json.dumps(damaged)  # NaN/inf written as JSON's NaN/Infinity
            changed = damaged != pristine
        else:
            text, changed = damaged.decode("utf-8", "replace"), damaged != json.dumps(pristine)
        (folder / MANIFEST).write_text(text)
        try:
            model = ExportedModel(folder)
        except ExportFileError:
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n{text[:300]}")
        outcomes["loaded"] += 1
        assert reseal or not changed, f"case {case}: damage without a new digest loaded"
        t = model.threshold
        assert t is None or math.isfinite(t), f"case {case}: threshold {t!r} loaded"
    assert outcomes["refused"] > FUZZ_CASES // 2, outcomes
