"""Update: add normal images (a new batch, a new variant, marked false alarms) to a model file."""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from patchcore.apps.workflow.data import WorkflowError, expand_inputs
from patchcore.apps.workflow.files import MODEL, check_target, model_transaction
from patchcore.apps.workflow.model import load_model
from patchcore.core.detector import PatchCore


@dataclass
class UpdateSummary:
    """What :func:`update_model` did (the model's own record is ``det.updates_[-1]``)."""

    model_path: str
    images: int
    patches: int
    rows_added: int
    rows_dropped: int
    bank_size: int
    seconds: float
    updates: int
    threshold: float | None
    threshold_method: str | None
    skipped: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)


def held_out_overlap(md: dict, files: Sequence[Path]) -> list[str]:
    """The files that are among the model's stored calibration or held-out test images."""
    root = md.get("calibration_data")
    stored = set(md.get("test_names", [])) | set(md.get("calibration_names", []))
    if not root or not stored or root.lower().startswith("elpv"):
        return []
    roots = {Path(os.path.abspath(root)), Path(root).resolve()}
    out = []
    for f in files:
        # as given (a linked file keeps its place in the folder) and with links resolved
        for path, base in itertools.product((Path(os.path.abspath(f)), Path(f).resolve()), roots):
            if path.is_relative_to(base) and path.relative_to(base).as_posix() in stored:
                out.append(path.relative_to(base).as_posix())
                break
    return out


def update_model(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    recursive: bool = False,
    device: str | None = None,
    progress: bool = False,
    force: bool = False,
) -> UpdateSummary:
    """Add the normal images ``inputs`` (files and folders) to ``model`` with ``partial_fit``.

    Unreadable images are skipped (and recorded). The model is written to ``out`` (default:
    in place, atomically). Updates of one file are serialised (:func:`~.files.
    model_transaction`): a second update waits for the first and adds its images to the
    first one's result, and a file changed by a writer that does not wait is never
    overwritten. A calibrated threshold is kept with a warning (calibrate again); images
    that are among the stored calibration or held-out test images are added with a warning,
    since ``evaluate`` would then score images the bank holds.

    Raises:
        WorkflowError: a missing path, no images, no readable image, ``out`` not writable or
            an existing file that is not a model file (unless ``force``).
        ModelChangedError: the target changed on disk during the update (nothing written).
    """
    target = Path(out) if out is not None else Path(model)
    check_target(target, MODEL, force=force)
    files = expand_inputs([str(p) for p in inputs], recursive=recursive)
    with model_transaction(target, exists=out is None) as transaction:
        det = load_model(model, device=device)
        summary = _update(det, files, progress)
        summary.model_path = str(transaction.save(det))
    return summary


def _update(det: PatchCore, files: Sequence[Path], progress: bool) -> UpdateSummary:
    """``partial_fit`` of ``files`` on ``det`` (in memory) and what it did."""
    held = held_out_overlap(det.metadata_, files)
    if held:
        warnings.warn(
            f"{len(held)} of the added images are in the model's calibration / held-out split "
            f"(e.g. {held[0]}): calibrate again on other images before `evaluate`",
            UserWarning,
            stacklevel=2,
        )
    try:
        det.partial_fit([str(f) for f in files], on_error="skip", progress=progress)
    except ValueError as exc:  # no readable image
        raise WorkflowError(str(exc)) from None
    rec = det.updates_[-1]
    if "train_names" in det.metadata_:
        det.metadata_["train_names"] = [*det.metadata_["train_names"], *rec["names"]]
    return UpdateSummary(
        model_path="",
        images=rec["images"],
        patches=rec["patches"],
        rows_added=rec["rows_added"],
        rows_dropped=rec["rows_dropped"],
        bank_size=rec["bank_size"],
        seconds=rec["seconds"],
        updates=len(det.updates_),
        threshold=det.threshold_,
        threshold_method=det.threshold_method_,
        skipped=list(rec["skipped"]),
        held_out=held,
    )
