"""Predict: stream one inspection record (:class:`patchcore.lean.record.Inspection`) per image
file, with an optional heatmap picture per image and a regions file made from the records."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from patchcore.apps import plots
from patchcore.apps.workflow.data import WorkflowError
from patchcore.apps.workflow.files import (
    PICTURE,
    REGIONS,
    REGIONS_CSV_HEADER,
    REGIONS_FORMAT,
    atomic_file,
    check_target,
    check_writable_folder,
)
from patchcore.apps.workflow.model import display_range, require_threshold
from patchcore.core.detector import PatchCore
from patchcore.core.images import read_image
from patchcore.lean.record import ANOMALOUS, Inspection, check_threshold
from patchcore.lean.regions import DEFAULT_MIN_AREA, REGION_FIELDS

__all__ = [
    "HEATMAP_LAYOUTS",
    "REGION_SUFFIXES",
    "heatmap_caption",
    "inspect_files",
    "picture_name",
    "regions_file",
    "write_picture",
]

#: The regions file formats, by suffix.
REGION_SUFFIXES = (".json", ".csv")
#: Heatmap pictures: ``panels`` = image | overlay (regions boxed) | colour bar under a caption
#: line (the default); ``overlay`` = the overlay alone at the image's size (regions boxed).
HEATMAP_LAYOUTS = ("panels", "overlay")


def picture_name(path: Path, used: set[str], suffix: str = "heatmap") -> str:
    """A PNG name for ``path``'s picture not yet in ``used``: ``stem_suffix.png``, then
    ``stem_2_suffix.png``, ... (added to ``used``)."""
    stem = path.stem
    name = f"{stem}_{suffix}.png"
    k = 2
    while name in used:
        name = f"{stem}_{k}_{suffix}.png"
        k += 1
    used.add(name)
    return name


def write_picture(array: np.ndarray, path: Path, *, force: bool = False) -> str:
    """Write a picture atomically; an existing file that patchcore did not write is refused
    (unless ``force``)."""
    check_target(path, PICTURE, force=force)
    with atomic_file(path) as tmp:
        plots.save_png(array, tmp)
    return str(path)


def inspect_files(
    det: PatchCore,
    files: Sequence[str | os.PathLike],
    *,
    heatmaps: str | os.PathLike | None = None,
    alpha: float = 0.5,
    region_threshold: float | None = None,
    min_area: int = DEFAULT_MIN_AREA,
    force: bool = False,
    layout: str = "panels",
) -> Iterator[tuple[Inspection, str | None]]:
    """Stream ``(record, heatmap path or None)`` per file, in order, as the detector's
    batches finish (:meth:`PatchCore.iter_inspect`, one pass; an unreadable file is an
    ``"error"`` record and the stream goes on). Records come without their maps.

    With ``heatmaps``, a picture of each native-size map (colours on
    :func:`~patchcore.apps.workflow.model.display_range`, region boxes drawn) is written per
    image as ``<heatmaps>/<stem>_heatmap.png``: with ``layout="panels"`` the image | its
    overlay | the colour bar under a caption line (verdict, score against the threshold,
    regions), with ``"overlay"`` the overlay alone. ``region_threshold`` replaces the model's
    region cut for this call.

    Raises:
        WorkflowError: the model has no threshold, an unknown ``layout``, or ``heatmaps``
            cannot be written: before any image is scored.
    """
    require_threshold(det, None)
    if layout not in HEATMAP_LAYOUTS:
        raise WorkflowError(
            f"heatmap layout must be one of {', '.join(HEATMAP_LAYOUTS)}, got {layout!r}"
        )
    cut = None if region_threshold is None else check_threshold(region_threshold, "region cut")
    outdir = None if heatmaps is None else check_writable_folder(heatmaps, create=True)
    paths = [str(f) for f in files]
    draw = functools.partial(_panels if layout == "panels" else _overlay, alpha=alpha)
    return _inspect(det, paths, outdir, draw, cut, min_area, force)


def _inspect(
    det: PatchCore,
    paths: list[str],
    outdir: Path | None,
    draw: Callable[..., np.ndarray],
    cut: float | None,
    min_area: int,
    force: bool,
) -> Iterator[tuple[Inspection, str | None]]:
    """The stream of :func:`inspect_files` (its checks done)."""
    colours = display_range(det)
    used: set[str] = set()
    stored = det.region_threshold_
    try:
        if cut is not None:
            det.region_threshold_ = cut  # read once, as the stream starts
        for rec in det.iter_inspect(paths, regions=True, min_area=min_area, progress=False):
            heat = None
            if outdir is not None and rec.anomaly_map is not None:
                name = picture_name(Path(rec.image), used)
                heat = write_picture(draw(rec, colours), outdir / name, force=force)
            yield rec.without_map(), heat
    finally:
        det.region_threshold_ = stored


def _overlay(rec: Inspection, colours: tuple[float, float] | None, alpha: float) -> np.ndarray:
    """The ``overlay`` picture of a record: its map over the image's pixels, regions boxed."""
    amap = rec.anomaly_map
    overlay = plots.anomaly_map_overlay(read_image(rec.image), amap, colours, alpha)
    return plots.draw_regions(overlay, rec.regions, amap.shape) if rec.regions else overlay


def _panels(rec: Inspection, colours: tuple[float, float] | None, alpha: float) -> np.ndarray:
    """The ``panels`` picture of a record: image | overlay (regions boxed) | colour bar, under
    :func:`heatmap_caption`."""
    colour = plots.BAD_RGB if rec.verdict == ANOMALOUS else plots.OK_RGB
    return plots.heatmap_picture(
        read_image(rec.image), rec.anomaly_map, colours, regions=rec.regions, alpha=alpha,
        caption=heatmap_caption(rec), caption_rgb=colour,
    )  # fmt: skip


def heatmap_caption(rec: Inspection) -> str:
    """One line on a record: verdict, score against the threshold, regions, and the
    out-of-distribution hint (as the table)."""
    line = f"{rec.verdict}: score {rec.score:.4g}"
    if rec.threshold is not None:
        line += f" {'>=' if rec.verdict == ANOMALOUS else '<'} threshold {rec.threshold:.4g}"
    if rec.regions is not None:
        line += f", {len(rec.regions)} region{'' if len(rec.regions) == 1 else 's'}"
    if rec.ood:
        line += f"; {rec.ood_reason}"
    return line


def _region_rows(rec: Inspection) -> list[list[object]]:
    head = [rec.image, rec.index, rec.verdict, rec.score, rec.region_threshold]
    return [
        [*("" if v is None else v for v in head), k, *(r.as_dict()[f] for f in REGION_FIELDS)]
        for k, r in enumerate(rec.regions or (), start=1)
    ]


def _region_entry(rec: Inspection) -> dict[str, object]:
    return {
        "image": rec.image,
        "index": rec.index,
        "verdict": rec.verdict,
        "score": rec.score,
        "region_threshold": rec.region_threshold,
        "error": rec.error,
        "regions": None if rec.regions is None else [r.as_dict() for r in rec.regions],
    }


@contextlib.contextmanager
def regions_file(
    path: str | os.PathLike, *, min_area: int = DEFAULT_MIN_AREA, force: bool = False
) -> Iterator[Callable[[Inspection], None]]:
    """Write the regions of records to a .json or .csv file; yields ``add(record)``.

    Rows go to a temporary file as they come; it replaces ``path`` when the block ends
    without an exception (else it is removed and ``path`` is left as it was). An existing
    ``path`` that is not a regions file is refused unless ``force``.

    JSON: ``{"format": "patchcore-regions", "format_version": 1, "min_area", "images":
    [{"image", "index", "verdict", "score", "region_threshold", "error", "regions": [{x0, y0,
    x1, y1, area, peak, mean, peak_x, peak_y}, ...]}]}``, one entry per record. CSV: one row
    per region (``image, index, verdict, score, region_threshold, region`` (1 = highest peak)
    and the region's fields); records without regions have no row. Coordinates are the
    image's own pixels, boxes half-open (``x1``, ``y1`` exclusive).

    Raises:
        WorkflowError: another suffix, or a ``path`` that may not be replaced or written.
    """
    path = Path(path)
    if path.suffix.lower() not in REGION_SUFFIXES:
        raise WorkflowError(
            f"{path}: name a .json or .csv file for the regions (the suffix picks the format)"
        )
    check_target(path, REGIONS, force=force)
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        if path.suffix.lower() == ".csv":
            w = csv.writer(fh)
            w.writerow([*REGIONS_CSV_HEADER, *REGION_FIELDS])
            yield lambda rec: w.writerows(_region_rows(rec))
            return
        head = {"format": REGIONS_FORMAT, "format_version": 1, "min_area": int(min_area)}
        fh.write(json.dumps(head)[:-1] + ', "images": [')
        count = [0]

        def add(rec: Inspection) -> None:
            fh.write(("," if count[0] else "") + "\n " + json.dumps(_region_entry(rec)))
            count[0] += 1

        yield add
        fh.write("\n]}\n")
