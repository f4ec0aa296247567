"""``patchcore review``: threshold-move latency in the real browser, and cache re-open time.

A review of N labelled images (default 2,000) is laid out with its cache already filled: small
generated images (good and three defect types), a tiny model fitted on four of them, and cached
inspection records whose scores are drawn per class (records and maps made by
:func:`patchcore.lean.record.inspection`, as scoring makes them). What is measured is the
page and the cache, not the model:

* re-open: a new :class:`~patchcore.apps.review.ReviewSession` (data folder listed, every file
  digested, entries read) and the page's state JSON built from it;
* page load: from navigation to the first gallery tiles in Debian's chromium;
* threshold move: in the page, from the input event on the threshold slider (and on the
  histogram, a pointer move) to the metrics table, confusion matrix, per-type recall,
  histogram, ROC point and galleries updated (the handler is synchronous; the time includes
  a forced layout), over ``--moves`` moves to random positions; median, p95 and max.

    python benchmarks/bench_review.py [--images 2000] [--moves 300] [--out benchmarks/out]
    python benchmarks/bench_review.py --model mt.pt --data data/magnetic_tile   # a real review

Prints one JSON line with the figures, the CPU, the load and the date (benchmarks/RESULTS.md,
"Review page").
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import append_row, machine, write_results_section  # noqa: E402

from patchcore.apps.review import ReviewSession, create_app, view
from patchcore.apps.review.cache import Cache, file_digest
from patchcore.apps.review.session import entry_of, items_of, load_data
from patchcore.core.detector import PatchCore
from patchcore.lean import record as rec

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
TYPES = ("good", "crack", "hole", "scratch")


def make_images(root: Path, n: int, rng: np.random.Generator) -> Path:
    """``root/data/<type>/<k>.png``: 64x64 noise images, 60 % good."""
    data = root / "data"
    for k in range(n):
        kind = "good" if k % 10 < 6 else TYPES[1 + k % 3]
        path = data / kind / f"{k:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(90, 160, (64, 64), dtype=np.uint8)
            if kind != "good":
                y, x = rng.integers(8, 48, 2)
                pixels[y : y + 8, x : x + 8] = 250
            Image.fromarray(pixels).save(path)
    return data


def fill_cache(model: Path, data: Path, rng: np.random.Generator) -> float:
    """Cached records for every image (scores drawn per class); returns the threshold."""
    det = PatchCore.load(model)
    t = float(det.threshold_)
    cache = Cache(model)
    digest = file_digest(model)
    entries = {}
    for it in items_of(load_data(data)):
        score = float(rng.normal(t * (1.15 if it.label else 0.85), 0.12 * t))
        small = rng.random((32, 32), dtype=np.float32) * score
        r = rec.inspection(it.name, it.index, score, threshold=t, anomaly_map=small, region_cut=t)
        cache.save_map(digest, it.digest, small)
        entries[it.digest] = entry_of(r, it)
    cache.save_entries(digest, entries)
    return t


def build(root: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    data = make_images(root, n, rng)
    model = root / "model.pt"
    if not model.exists():
        train = sorted((data / "good").iterdir())[:4]
        det = PatchCore(backbone="efficientnet-lite0", image_size=64, progress=False).fit(train)
        det.set_threshold(float(np.max(det.score_samples(train))))
        det.save(model)
        fill_cache(model, data, rng)
    return model, data


def reopen(model: Path, data: Path, repeats: int = 3) -> dict[str, float]:
    """Seconds to re-open the review (session + state JSON), best of ``repeats``."""
    best = {"session_s": np.inf, "state_s": np.inf}
    for _ in range(repeats):
        t0 = time.perf_counter()
        s = ReviewSession(model, data)
        t1 = time.perf_counter()
        text = json.dumps(view.state(s))
        t2 = time.perf_counter()
        assert s.missing() == 0, "the cache should hold every image"
        best = {"session_s": min(best["session_s"], t1 - t0),
                "state_s": min(best["state_s"], t2 - t1)}  # fmt: skip
    return {**best, "state_bytes": len(text)}


MOVES_JS = """
async ([moves, kind]) => {
  const R = window.Review;
  const range = document.getElementById('t-range');
  const hist = document.getElementById('hist');
  const box = hist.getBoundingClientRect();
  const out = [];
  let seed = 1;
  const rand = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
  for (let k = 0; k < moves; k++) {
    const t0 = performance.now();
    if (kind === 'slider') {
      range.value = String(Math.floor(rand() * (Number(range.max) + 1)));
      range.dispatchEvent(new Event('input', { bubbles: true }));
    } else {
      const x = box.left + 45 + rand() * (box.width - 60);
      const at = { clientX: x, clientY: box.top + 50, pointerId: 1, bubbles: true };
      hist.dispatchEvent(new PointerEvent('pointerdown', at));
      hist.dispatchEvent(new PointerEvent('pointerup', at));
    }
    void document.body.offsetHeight;  // force the layout of what changed
    out.push(performance.now() - t0);
    if (k % 20 === 0) await new Promise((r) => requestAnimationFrame(() => r()));
  }
  return out;
}
"""


def browser(model: Path, data: Path, moves: int) -> dict[str, float]:
    import uvicorn
    from playwright.sync_api import sync_playwright

    app = create_app(model, data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    out: dict[str, float] = {}
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#tiles .tile")
        out["page_load_s"] = time.perf_counter() - t0
        out["images_on_page"] = page.evaluate("window.Review.S.items.score.length")
        for kind in ("slider", "histogram"):
            ms = page.evaluate(MOVES_JS, [moves, kind])
            ms = sorted(ms)
            out[f"{kind}_median_ms"] = statistics.median(ms)
            out[f"{kind}_p95_ms"] = ms[int(0.95 * (len(ms) - 1))]
            out[f"{kind}_max_ms"] = ms[-1]
        b.close()
    srv.should_exit = True
    return out


RESULTS = Path(__file__).parent / "results" / "review.jsonl"

SECTION = """## Review page (`benchmarks/bench_review.py`, issue #22)

`patchcore review` with N images in its cache: re-open = a new session (every file listed and
SHA-256-digested, the cached entries read) plus the page's state JSON; page load = navigation to
the first gallery tiles in Debian's chromium (headless); a threshold move = from the input event
(slider, or a pointer event on the histogram) to the metrics table, confusion matrix, per-type
recall, histogram, ROC point and the four galleries updated, layout included, over random
positions. Timings on a shared machine: the load average is beside each row.

"""
HEADER = (
    "| date | machine | load | images | re-open (s) | state JSON (s) | page load (s) | slider "
    "move median / p95 / max (ms) | histogram move median / p95 / max (ms) |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)


def write_section() -> None:
    """Rewrite the "Review page" section of RESULTS.md from every row measured so far."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    lines = [
        f"| {r['date']} | {r['machine']} | {r['load']} | {r['images']}{r.get('set', '')} | "
        f"{r['session_s']:.2f} | "
        f"{r['state_s']:.3f} | {r['page_load_s']:.2f} | {r['slider_median_ms']:.1f} / "
        f"{r['slider_p95_ms']:.1f} / {r['slider_max_ms']:.1f} | {r['histogram_median_ms']:.1f} / "
        f"{r['histogram_p95_ms']:.1f} / {r['histogram_max_ms']:.1f} |"
        for r in rows
    ]
    write_results_section("review", SECTION + HEADER + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--moves", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bench_review")
    p.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    p.add_argument("--model", type=Path, help="a model already reviewed on --data (its cache full)")
    p.add_argument("--data", type=Path, help="the labelled images of --model (real images)")
    a = p.parse_args()
    if a.model is not None:
        model, data = a.model, a.data
        a.images = len(load_data(data))
    else:
        root = a.out / f"n{a.images}"
        root.mkdir(parents=True, exist_ok=True)
        model, data = build(root, a.images)
    which = f" ({a.data.name})" if a.model is not None else " (generated)"
    result = {"images": a.images, "moves": a.moves, "set": which, "machine": machine(),
              **reopen(model, data), **browser(model, data, a.moves)}  # fmt: skip
    row = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    if a.no_write:
        print(json.dumps(row))
        return
    print(json.dumps(append_row(RESULTS, row)))
    write_section()


if __name__ == "__main__":
    main()
