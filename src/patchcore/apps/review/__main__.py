"""``python -m patchcore.apps.review MODEL DATA [--port N] [--host H] [--no-browser]``."""

from __future__ import annotations

import argparse

from patchcore.apps.review import run


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and :func:`~patchcore.apps.review.run` the review."""
    p = argparse.ArgumentParser(
        prog="python -m patchcore.apps.review",
        description="Review MODEL on the labelled images of DATA in the browser.",
    )
    p.add_argument("model", help="model file (rewritten by Save threshold / Mark as normal)")
    p.add_argument("data", help="labelled images: DATA/test/<label>/ or DATA/<label>/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument("--cache", default=None, help="cache folder (default: MODEL.review)")
    p.add_argument("--device", default=None, help="torch device (default: the model's)")
    a = p.parse_args(argv)
    run(a.model, a.data, host=a.host, port=a.port, open_browser=not a.no_browser,
        cache_dir=a.cache, device=a.device)  # fmt: skip


if __name__ == "__main__":
    main()
