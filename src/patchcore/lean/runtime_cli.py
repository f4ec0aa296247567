"""``patchcore-run``: score images with an exported detector, without torch.

    patchcore-run EXPORT_DIR IMAGES_OR_FOLDERS... [--json] [--maps-dir DIR] [--skip-unreadable]
    patchcore-run serve EXPORT_DIR [--host 127.0.0.1] [--port 8000]

Prints one line per image: name, raw score, normalised score (threshold at 0.5; a mapping, not a
probability) and the verdict. Exit codes as ``patchcore``: 0 success, 1 runtime failure, 2 bad
usage or input. argparse only: the runtime's dependencies stay onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["main"]


def _inputs(paths: list[str]) -> list[Path]:
    from patchcore.lean.pixels import list_images

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise FileNotFoundError(f"{p}: no images in this folder")
            out += found
        else:
            out.append(p)
    return out


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from patchcore.lean.runtime import ExportedModel

    model = ExportedModel(args.export, backend=args.backend, threads=args.threads)
    images = _inputs(args.images)
    on_error = "skip" if args.skip_unreadable else "raise"
    maps = "native" if args.maps_dir else None
    r = model.score(images, maps=maps, on_error=on_error)
    t = model.threshold
    if args.maps_dir:
        Path(args.maps_dir).mkdir(parents=True, exist_ok=True)
    reasons = {s.index: s.reason for s in r.skipped}
    for i, name in enumerate(r.names):
        score = float(r.scores[i])
        norm = None if r.normalized is None else float(r.normalized[i])
        verdict = (
            "error" if i in reasons else ("" if t is None else "fail" if score >= t else "pass")
        )
        if args.json:
            row = {"image": name, "score": None if math.isnan(score) else score,
                   "normalized_score": None if norm is None or math.isnan(norm) else norm,
                   "verdict": verdict or None, "error": reasons.get(i)}  # fmt: skip
            print(json.dumps(row))
        else:
            n = "" if norm is None or math.isnan(norm) else f"{norm:.4f}"
            print(f"{name}\t{score:.6g}\t{n}\t{verdict or reasons.get(i, '')}")
        if args.maps_dir and r.maps is not None and r.maps[i] is not None:
            np.save(Path(args.maps_dir) / f"{Path(name).stem}.npy", r.maps[i])
    return 0


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
        else "Score images with an exported detector (torch-free).",
    )
    p.add_argument("export", help="folder written by `patchcore export`")
    if serve:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--token", default=None, help="bearer token for /v1/* ($PATCHCORE_TOKEN)")
        p.add_argument("--token-file", default=None, help="read the token from this file")
    else:
        p.add_argument("images", nargs="+", help="image files or folders of images")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--maps-dir", default=None, help="write each map as <stem>.npy here")
        p.add_argument("--skip-unreadable", action="store_true", help="report, don't stop")
    p.add_argument("--backend", choices=("onnxruntime", "openvino"), default=None)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    return p


def main(argv: list[str] | None = None) -> int:
    """The console entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    serve = bool(argv) and argv[0] == "serve"
    args = _parser(serve).parse_args(argv[1:] if serve else argv)
    from patchcore.lean.pixels import ImageReadError
    from patchcore.lean.runtime import ExportFileError

    try:
        return _serve(args) if serve else _score(args)
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
