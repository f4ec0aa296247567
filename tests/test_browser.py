"""A real browser (Debian's chromium driven by Playwright) uses the inspection page.

Needs ``/usr/bin/chromium`` (``.ci/run`` installs it with apt-get) and the ``playwright`` Python
package; no browser is downloaded. The page is loaded from a uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import data_set

CHROMIUM = Path(os.environ.get("PATCHCORE_CHROMIUM", "/usr/bin/chromium"))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "casting"
SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "service-page.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a live service with a tiny real model; stopped after the module."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does it)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    data_set("casting")
    import uvicorn

    from patchcore.apps.service import create_app
    from patchcore.core.detector import PatchCore

    train = sorted((DATA / "train" / "good").iterdir())[:4]
    det = PatchCore(
        backbone="efficientnet-lite0", image_size=128, coreset_ratio=0.1, progress=False
    ).fit(train)
    det.set_threshold(float(np.max(det.score_samples(train))), method="max of training scores")
    path = det.save(tmp_path_factory.mktemp("model") / "tiny.pt")

    port = free_port()
    config = uvicorn.Config(
        create_app(path), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    import httpx

    end = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < end, "service did not get ready"
        time.sleep(0.1)
    yield base
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        # The page must not need the internet: refuse every request that leaves this service.
        context.route(
            "**/*",
            lambda route: (
                route.continue_() if route.request.url.startswith(server) else route.abort()
            ),
        )
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(server + "/")
        yield pg
        assert not errors, errors
        browser.close()


def test_upload_shows_verdict_overlay_and_history(page, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_contain_text("efficientnet-lite0", timeout=20_000)
    defective = sorted((DATA / "test" / "defective").iterdir())[0]
    page.set_input_files("#file", str(defective))

    verdict = page.locator("#verdict")
    expect(verdict).to_have_text(re.compile(r"^(ANOMALOUS|NORMAL)$"), timeout=30_000)
    expect(page.locator("#result")).to_have_class(re.compile(r"\b(anomalous|normal)\b"))
    expect(page.locator("#name")).to_have_text(defective.name)
    score = float(page.locator("#score").inner_text())
    threshold = float(page.locator("#threshold").inner_text())
    assert score > 0 and threshold > 0
    assert verdict.inner_text() == ("ANOMALOUS" if score >= threshold else "NORMAL")

    # both panels show decoded pixels: the image and the heatmap layer over it
    for sel in ("#image", "#overlay-base", "#overlay"):
        page.wait_for_function(
            f"document.querySelector('{sel}').complete && "
            f"document.querySelector('{sel}').naturalWidth === 300"
        )
    page.locator("#opacity").fill("70")
    assert page.eval_on_selector("#overlay", "e => getComputedStyle(e).opacity") == "0.7"
    expect(page.locator("#recent li")).to_have_count(1)

    # a second, normal image joins the history, newest first
    good = sorted((DATA / "test" / "good").iterdir())[0]
    page.set_input_files("#file", str(good))
    expect(page.locator("#recent li")).to_have_count(2, timeout=30_000)
    expect(page.locator("#recent li").first).to_contain_text(good.name)
    expect(page.locator("#name")).to_have_text(good.name)

    # a file that is not an image gets a clear error, not a verdict
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    page.set_input_files("#file", str(fake))
    expect(verdict).to_have_text("ERROR 400", timeout=30_000)
    expect(page.locator("#error")).to_contain_text("not an image")
    expect(page.locator("#recent li")).to_have_count(3)

    # back to the defective one for the screenshot
    page.locator("#recent li").nth(2).click()
    expect(page.locator("#name")).to_have_text(defective.name)
    page.locator("#opacity").fill("50")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_page_draws_the_defect_regions_of_the_answer(page, server):
    """The boxes on the page are the regions the API returns for the same image."""
    import httpx
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_contain_text("efficientnet-lite0", timeout=20_000)
    defective = sorted((DATA / "test" / "defective").iterdir())[1]
    with defective.open("rb") as fh:
        answer = httpx.post(f"{server}/v1/inspect", files={"file": fh}, timeout=60).json()
    page.set_input_files("#file", str(defective))
    expect(page.locator("#name")).to_have_text(defective.name, timeout=30_000)
    regions = answer["regions"]
    boxes = page.locator("#regions .region")
    expect(boxes).to_have_count(len(regions), timeout=30_000)
    expect(page.locator("#region-count")).to_contain_text(f"{len(regions)} defect region")
    assert regions, "the tiny model flags no region on this defective casting"
    style = boxes.first.get_attribute("style")
    left = float(re.search(r"left: ([0-9.]+)%", style).group(1))
    assert left == pytest.approx(100 * regions[0]["x0"] / answer["width"], abs=0.01)
    expect(page.locator("#region-list li")).to_have_count(len(regions))


def test_docs_is_an_interactive_api_page_that_needs_no_internet(page, server):
    """/docs: Swagger UI from the swagger-ui-bundle package's files, every request to this
    service (any other is refused and recorded), and "Try it out" really calls the API."""
    from playwright.sync_api import expect

    outside: list[str] = []

    def route(r):  # noqa: ANN001, ANN202
        if r.request.url.startswith(server) or r.request.url.startswith("data:"):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    pg = page.context.new_page()
    pg.route("**/*", route)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server + "/docs")
    expect(pg.locator(".swagger-ui .info .title")).to_contain_text(
        "patchcore inspection service", timeout=30_000
    )
    expect(pg.locator(".opblock-summary-path", has_text="/v1/inspect/batch")).to_have_count(1)
    expect(pg.locator(".btn.authorize")).to_be_visible()  # takes the bearer token
    path = pg.locator(".opblock-summary-path", has_text="/healthz")
    health = pg.locator(".opblock", has=path)
    health.locator(".opblock-summary").click()
    if not health.locator(".execute").count():
        health.locator(".try-out__btn").click()
    health.locator(".execute").click()
    live = health.locator(".live-responses-table")
    expect(live.locator("tbody .response-col_status")).to_contain_text("200", timeout=20_000)
    expect(live).to_contain_text('"status": "ok"')
    pg.close()
    assert not errors, errors
    assert outside == [], outside
