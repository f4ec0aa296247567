"""The service's JSON schemas, derived from the inspection record (:mod:`patchcore.lean.record`).

:class:`InspectionRecord` is built from :data:`record.FIELDS` (names, order, types and
descriptions, nothing written out again), and :class:`RegionModel` from the fields of
:class:`~patchcore.lean.regions.Region`; the service's own extras follow the record's fields
(:class:`InspectionAnswer`: ``timing``, ``backend``, ``heatmap_url``). A new record field is
therefore a new field of every answer with no change here.
"""

from __future__ import annotations

from dataclasses import fields as dataclass_fields
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from patchcore.lean import record
from patchcore.lean.regions import Region

__all__ = [
    "BatchAnswer",
    "BatchItem",
    "ExplanationAnswer",
    "InspectionAnswer",
    "InspectionRecord",
    "NearestPatch",
    "PatchBox",
    "RegionModel",
    "Timing",
]

_PY_TYPES = {"int": int, "float": float, "str": str, "bool": bool}

#: One defect region, as :class:`~patchcore.lean.regions.Region` (box x1, y1 exclusive).
RegionModel = create_model(
    "Region",
    __doc__="A defect region in the image's pixels: box [x0, x1) x [y0, y1), area in pixels, "
    "peak and mean map value, where the peak is.",
    **{
        f.name: (_PY_TYPES[f.type if isinstance(f.type, str) else f.type.__name__], ...)
        for f in dataclass_fields(Region)
    },  # fmt: skip
)


def _field_type(f: record.Field) -> Any:
    if f.name == "verdict":
        return Literal[record.VERDICTS] | None  # type: ignore[valid-type]
    if f.kind == "regions":
        return list[RegionModel] | None  # type: ignore[valid-type]
    return _PY_TYPES[f.kind] | None


#: Every field of the inspection record, in :data:`record.FIELDS` order.
InspectionRecord = create_model(
    "InspectionRecord",
    __doc__="One inspection, field for field the record of patchcore.lean.record (the same "
    "names and values as the CLI's JSON/CSV, the runtime and the Parquet rows).",
    **{f.name: (_field_type(f), Field(None, description=f.description)) for f in record.FIELDS},
)


class Timing(BaseModel):
    """Milliseconds spent in each stage of one request (server side)."""

    queue_ms: float = Field(description="waiting for a free worker")
    decode_ms: float = Field(description="decoding the upload")
    inference_ms: float = Field(description="the backend (features, search, map, regions)")
    total_ms: float = Field(description="from admission to the answer")


class InspectionAnswer(InspectionRecord):  # type: ignore[misc, valid-type]
    """The answer for one image: the record's fields, then the service's extras."""

    timing: Timing
    backend: str = Field(description="what scored it: torch, onnxruntime or openvino")
    heatmap_url: str | None = Field(None, description="overlay PNG, when heatmap=url was asked")


class BatchItem(InspectionAnswer):
    """One image of a batch: its record (an ``error`` verdict when it was refused), the HTTP
    status it alone would have had, then the extras."""

    status: int = Field(200, description="HTTP status this image alone would have had")


class BatchAnswer(BaseModel):
    """All images of a batch, in upload order; a bad image does not spoil the others."""

    count: int
    anomalous: int = Field(description="images judged anomalous")
    normal: int = Field(description="images judged normal")
    errors: int = Field(description="images with an error verdict (refused or not scored)")
    results: list[BatchItem]
    total_ms: float


class PatchBox(BaseModel):
    """A patch's pixels, (top, left) inclusive, (bottom, right) exclusive."""

    top: int
    left: int
    bottom: int
    right: int


class NearestPatch(BaseModel):
    """The normal training patch nearest to the worst patch (from the bank's provenance)."""

    bank_row: int
    training_image: int | None = Field(None, description="training image index; None: unknown")
    training_file: str | None = Field(None, description="its file name (no folders)")
    box: PatchBox | None = Field(None, description="in the training image's own pixels")


class ExplanationAnswer(InspectionRecord):  # type: ignore[misc, valid-type]
    """Why one image scored what it did: the record's fields (no map), then the worst patch
    and its nearest normal training patch."""

    distance: float = Field(description="the worst patch's distance to the nearest bank row")
    worst_patch: PatchBox = Field(description="the image's worst patch, in its pixels")
    nearest: NearestPatch
    note: str | None = Field(None, description="why the training side is missing, if it is")
    timing: Timing
    backend: str = Field(description="what scored it")
