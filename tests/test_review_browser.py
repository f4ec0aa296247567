"""A real browser (Debian's chromium driven by Playwright) runs the whole review loop on real
magnetic_tile images: open, drag the threshold, keyboard, a method, save it, open a tile, mark a
false positive as normal, compare a second model, export. Launch flags as tests/test_browser.py.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _review_data import review_set, tiny_model
from test_browser import CHROMIUM, CHROMIUM_ARGS

from patchcore.core import metrics
from patchcore.core.detector import PatchCore
from patchcore.lean import record as rec

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "out"

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, session, model B path) of a live review of a tiny model on real images."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does it)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    import uvicorn

    from patchcore.apps.review import create_app

    root = tmp_path_factory.mktemp("review-browser")
    data = review_set(root, normal=8, per_defect=3)
    model = tiny_model(root / "a.pt")
    other = tiny_model(root / "b.pt", image_size=64)
    app = create_app(model, data)
    session = app.state.review
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < end, "review server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", session, other
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    base = served[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        # offline: every request that leaves this server is refused
        context.route(
            "**/*",
            lambda r: r.continue_() if r.request.url.startswith(base) else r.abort(),
        )
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(base + "/")
        yield pg
        assert not errors, errors
        browser.close()


def page_threshold(page) -> float:
    return float(page.evaluate("window.Review.S.t"))


def check_tables(page, session) -> None:
    """The page's tables are the library's metrics at the page's threshold."""
    t = page_threshold(page)
    skip = session.excluded()
    rows = [(it.label, session.record(it)["score"]) for it in session.items
            if session.record(it)["score"] is not None and it.digest not in skip]  # fmt: skip
    y = np.array([lab for lab, _ in rows])
    s = np.array([v for _, v in rows])
    ev = metrics.evaluate(rec.judge(s, t) == "anomalous", y)
    cells = page.locator("#metrics tbody td").all_inner_texts()
    assert [float(c) for c in cells] == pytest.approx(
        [ev[k] for k in metrics.MATLAB_METRICS], abs=6e-5
    )
    (tn, fp), (fn, tp) = ev["ConfusionMatrix"]
    assert page.locator("#confusion td").all_inner_texts() == [str(v) for v in (tn, fp, fn, tp)]
    assert page.locator('#tabs [data-group="fp"] b').inner_text() == str(fp)
    assert page.locator('#tabs [data-group="tp"] b').inner_text() == str(tp)


def wait_job(page, session) -> None:
    end = time.monotonic() + 300
    time.sleep(0.3)
    while session.job.running:
        assert time.monotonic() < end, "job did not end"
        time.sleep(0.2)
    page.wait_for_function("!window.Review.S.polling && !window.Review.S.state.job.running")


def test_the_whole_review_loop(page, served):
    from playwright.sync_api import expect

    base, session, other = served
    expect(page.locator("#counts")).to_contain_text("1 error", timeout=60_000)
    expect(page.locator("#tiles .tile").first).to_be_visible()
    check_tables(page, session)

    # drag the threshold on the histogram: the tables follow
    box = page.locator("#hist").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.8, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.up()
    assert page.evaluate("window.Review.S.method") == "manual"
    check_tables(page, session)

    # keyboard: one arrow key = one image's verdict changes
    before = page.evaluate("window.Review.S.ev.TruePositives + window.Review.S.ev.FalsePositives")
    page.locator("#t-range").focus()
    page.keyboard.press("ArrowRight")
    after = page.evaluate("window.Review.S.ev.TruePositives + window.Review.S.ev.FalsePositives")
    assert after < before  # the next distinct score is no longer flagged
    check_tables(page, session)

    # a method, then save it into the model file
    page.get_by_role("button", name="Youden").click()
    expect(page.locator("#message")).to_contain_text("youden: threshold")
    t = page_threshold(page)
    page.locator("#save").click()
    expect(page.locator("#message")).to_contain_text("Saved threshold", timeout=30_000)
    det = PatchCore.load(session.model_path)
    assert det.threshold_ == t and det.threshold_method_ == "youden"
    check_tables(page, session)

    # open a tile with the keyboard: image, heatmap with colour bar, explanation; Esc closes
    page.locator('#tabs [data-group="tp"]').click()
    if page.locator("#tiles .tile").count() == 0:
        page.locator('#tabs [data-group="fn"]').click()
    page.locator("#tiles .tile").first.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#viewer")
    expect(dialog).to_be_visible()
    for sel in ("#v-image", "#v-heat", "#v-mask2"):
        page.wait_for_function(
            f"document.querySelector('{sel}').complete && "
            f"document.querySelector('{sel}').naturalWidth > 0",
            timeout=30_000,
        )
    expect(page.locator("#v-lo")).to_have_text(re.compile(r"^[0-9.]+$"))
    expect(page.locator("#v-explain-text")).to_contain_text("nearest normal patch", timeout=60_000)
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "review-viewer.png"))
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # lowest threshold: every normal image is a false positive; mark one as normal
    page.locator("#t-range").focus()
    page.keyboard.press("Home")
    page.locator('#tabs [data-group="fp"]').click()
    first = page.locator("#tiles .tile").first
    name = first.locator(".cap div").first.get_attribute("title")
    first.locator("input[type=checkbox]").check()
    page.locator("#mark").click()
    wait_job(page, session)
    expect(page.locator("#update-panel")).to_be_visible(timeout=60_000)
    expect(page.locator("#update")).to_contain_text("False positives that went away")
    expect(page.locator("#update")).to_contain_text("left out of the metrics")
    expect(page.locator("#counts")).to_contain_text("1 marked as normal")
    expect(page.locator('#tabs [data-group="marked"] b')).to_have_text("1")
    assert PatchCore.load(session.model_path).metadata_["review_marked_normal"][0]["name"] == name
    check_tables(page, session)

    # compare a second model on the same images
    page.locator("#other").fill(str(other))
    page.locator("#compare").click()
    wait_job(page, session)
    expect(page.locator("#compare-out")).to_contain_text("The models disagree on", timeout=60_000)
    expect(page.locator("#compare-out")).to_contain_text("image AUROC")

    # export the view as the HTML report
    page.locator("#export").click()
    expect(page.locator("#report-link")).to_be_visible(timeout=120_000)
    href = page.locator("#report-link").get_attribute("href")
    assert page.request.get(f"{base}/{href}").ok
    page.screenshot(path=str(OUT / "review-page.png"), full_page=True)
