"""Writing inspection records as a table, JSON lines or CSV: the one output of both CLIs
(``patchcore predict`` and ``patchcore-run``), derived from :data:`patchcore.lean.record.FIELDS`.

Rows are written as they come (a stream): a run cut short keeps every row written so far.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from patchcore.lean.record import FIELD_NAMES, Inspection, as_dict, as_row

__all__ = ["FORMATS", "RecordWriter"]

#: Output formats: aligned text, one JSON object per line, CSV with a header row.
FORMATS = ("table", "json", "csv")


class RecordWriter:
    """Formats records one by one and hands each line to ``emit``.

    Args:
        fmt: one of :data:`FORMATS`.
        emit: called with each line (no newline), e.g. ``print``.
        extra: names of surface-specific columns after the record's own (e.g. ``heatmap``);
            their values are passed to :meth:`write`.
    """

    def __init__(self, fmt: str, emit: Callable[[str], Any], extra: Sequence[str] = ()) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fmt, self.emit, self.extra = fmt, emit, tuple(extra)
        self.columns = (*FIELD_NAMES, *self.extra)
        self.started = False

    def header(self) -> None:
        """Write the header line (table and CSV) once, even when no record follows."""
        if self.started:
            return
        self.started = True
        if self.fmt == "csv":
            self.emit(_csv_line(self.columns))
        elif self.fmt == "table":
            self.emit(f"{'verdict':<10} {'score':>10} {'normalized':>10}  image")

    def write(self, record: Inspection, **extra: Any) -> None:
        """Write one record; ``extra`` holds the values of the extra columns."""
        self.header()
        values = {k: extra.get(k) for k in self.extra}
        if self.fmt == "json":
            self.emit(json.dumps({**as_dict(record), **values}))
        elif self.fmt == "csv":
            row = {**as_row(record), **{k: "" if v is None else v for k, v in values.items()}}
            self.emit(_csv_line([row[c] for c in self.columns]))
        else:
            self.emit(_table_line(record, values))


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def _table_line(r: Inspection, extra: dict[str, Any]) -> str:
    score = "-" if r.score is None else f"{r.score:.4f}"
    norm = "-" if r.normalized_score is None else f"{r.normalized_score:.3f}"
    tail = ""
    if r.regions is not None:
        tail += f"  [{len(r.regions)} region(s)]"
    if r.ood:
        tail += f"  [{r.ood_reason}]"
    tail += "".join(f"  -> {v}" for v in extra.values() if v)
    if r.error:
        tail = f"  ({r.error})"
    return f"{r.verdict or '-':<10} {score:>10} {norm:>10}  {r.image}{tail}"
