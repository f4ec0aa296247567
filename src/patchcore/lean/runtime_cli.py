"""``patchcore-run``: inspect images with an exported detector, without torch.

    patchcore-run EXPORT_DIR IMAGES_OR_FOLDERS... [--format table|json|csv] [--maps-dir DIR]
                  [--fail-fast] [--recursive] [--min-area N] [--backend B] [--threads N]
    patchcore-run serve EXPORT_DIR [--host 127.0.0.1] [--port 8000]

Prints one inspection record per image as it is done (:class:`patchcore.lean.writers.
RecordWriter`: the same table, JSON lines and CSV as ``patchcore predict``), so a run cut short
keeps every row printed so far. An unreadable or damaged file gets an ``"error"`` row and the run
goes on; ``--fail-fast`` stops at the first one. ``--maps-dir`` writes each native-size anomaly
map as ``<stem>.npy`` when its row is written (``<stem>_2.npy``, ... when names collide), never
holding more than one batch of maps. Exit codes as ``patchcore``: 0 success, 1 no input could
be read (or a runtime failure), 2 bad usage or export, 130 interrupted. argparse only: the
runtime's dependencies stay onnxruntime, numpy, Pillow and scipy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]


def _inputs(paths: list[str], recursive: bool) -> list[Path]:
    """Files as given (missing ones too: they get error rows) and the images in folders."""
    from patchcore.lean.pixels import list_images

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = list_images(p, recursive=recursive)
            if not found:
                raise FileNotFoundError(f"{p}: no images in this folder")
            out += found
        else:
            out.append(p)
    return out


class MapWriter:
    """Writes each map as ``<stem>.npy`` in ``folder`` as it comes; a stem met before gets
    ``_2``, ``_3``, ... (two folders holding ``part.png`` give ``part.npy`` and ``part_2.npy``).
    Each file is written to a temporary name and renamed, so no half-written map remains."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.used: set[str] = set()

    def name(self, image: str) -> str:
        stem = Path(image).stem or "image"
        name, k = f"{stem}.npy", 1
        while name in self.used:
            k += 1
            name = f"{stem}_{k}.npy"
        self.used.add(name)
        return name

    def write(self, image: str, anomaly_map: object) -> Path:
        import numpy as np

        path = self.folder / self.name(image)
        fd, tmp = tempfile.mkstemp(prefix=".map-", suffix=".npy", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, anomaly_map)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _score(args: argparse.Namespace) -> int:
    from patchcore.lean.runtime import ExportedModel
    from patchcore.lean.writers import RecordWriter

    model = ExportedModel(
        args.export, backend=args.backend, threads=args.threads, batch_size=args.batch_size
    )
    images = _inputs(args.images, args.recursive)
    maps = MapWriter(args.maps_dir) if args.maps_dir else None
    writer = RecordWriter(
        args.format, lambda line: print(line, flush=True), ("map",) if maps else ()
    )
    writer.header()
    counts = {"anomalous": 0, "normal": 0, "error": 0, None: 0}
    for r in model.iter_inspect(images, min_area=args.min_area):
        extra = {}
        if maps is not None and r.anomaly_map is not None:
            extra["map"] = str(maps.write(r.image, r.anomaly_map))
        writer.write(r, **extra)
        counts[r.verdict] += 1
        if r.verdict == "error" and args.fail_fast:
            print(f"patchcore-run: error: {r.image}: {r.error} (--fail-fast)", file=sys.stderr)
            return 2
    n = len(images)
    print(
        f"{n} image(s): {counts['anomalous']} anomalous, {counts['normal']} normal, "
        f"{counts['error']} error(s)" + (f"; maps in {args.maps_dir}" if maps else ""),
        file=sys.stderr,
    )
    return 1 if n and counts["error"] == n else 0


def _serve(args: argparse.Namespace) -> int:
    from patchcore.apps.service import RuntimeBackend, serve  # the one service (runtime-serve)

    backend = RuntimeBackend(args.export, engine=args.backend, threads=args.threads)
    serve(backend, args.host, args.port, token=args.token, token_file=args.token_file)
    return 0


def _parser(serve: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchcore-run" + (" serve" if serve else ""),
        description="Serve an exported detector over HTTP (torch-free)."
        if serve
        else "Inspect images with an exported detector (torch-free).",
    )
    p.add_argument("export", help="folder written by `patchcore export`")
    if serve:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--token", default=None, help="bearer token for /v1/* ($PATCHCORE_TOKEN)")
        p.add_argument("--token-file", default=None, help="read the token from this file")
    else:
        p.add_argument("images", nargs="+", help="image files or folders of images")
        p.add_argument(
            "--format", "-f", choices=("table", "json", "csv"), default="table",
            help="table (aligned text), json (one object per line), csv",
        )  # fmt: skip
        p.add_argument("--json", dest="format", action="store_const", const="json",
                       help="same as --format json")  # fmt: skip
        p.add_argument("--recursive", "-R", action="store_true", help="also look in sub-folders")
        p.add_argument("--maps-dir", default=None, help="write each map as <stem>.npy here")
        p.add_argument("--min-area", type=int, default=None, help="smallest region kept, pixels")
        p.add_argument("--batch-size", type=int, default=None, help="images per graph call")
        p.add_argument(
            "--fail-fast", action="store_true",
            help="stop at the first unreadable image (default: an error row, and go on)",
        )  # fmt: skip
        p.add_argument("--skip-unreadable", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=("onnxruntime", "openvino"), default=None)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    return p


def main(argv: list[str] | None = None) -> int:
    """The console entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    serve = bool(argv) and argv[0] == "serve"
    args = _parser(serve).parse_args(argv[1:] if serve else argv)
    if not serve and args.min_area is None:
        from patchcore.lean.regions import DEFAULT_MIN_AREA

        args.min_area = DEFAULT_MIN_AREA
    from patchcore.lean.pixels import ImageReadError
    from patchcore.lean.runtime import ExportFileError

    try:
        return _serve(args) if serve else _score(args)
    except KeyboardInterrupt:
        print("patchcore-run: interrupted", file=sys.stderr)
        return 130
    except (ExportFileError, ImageReadError, FileNotFoundError, ValueError) as exc:
        print(f"patchcore-run: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        print(f"patchcore-run: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def console() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console()
