"""The web page in a real browser: Playwright for Python driving Debian's Chromium (never a
browser downloaded by Playwright). Skipped when either is missing.

Set ``PNEUMOSCOPE_SCREENSHOT_DIR`` to keep a screenshot of the page after a prediction.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

pytest.importorskip("fastapi", reason="the web service needs the serve extra")
uvicorn = pytest.importorskip("uvicorn", reason="the web service needs the serve extra")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser test needs `pip install playwright`")
if not CHROMIUM.is_file():
    pytest.skip(f"browser test needs Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

from test_predict import make_checkpoint  # noqa: E402

from pneumoscope.data.synthetic import make_phantom  # noqa: E402
from pneumoscope.serve.app import create_app  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("page-ckpt") / "model.safetensors")
    port = _free_port()
    config = uvicorn.Config(create_app(ckpt), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _phantom_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_phantom(np.random.default_rng(7), 256, pneumonia=True)).save(buf, format="PNG")
    return buf.getvalue()


def test_page_predicts_and_toggles_heatmap(server_url: str, browser: object, tmp_path: Path) -> None:
    import httpx

    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(server_url + "/")
        expect(page.locator("#model-name")).to_have_text("resnet18")
        expect(page.get_by_text("Research use only — not a medical device")).to_be_visible()

        png = _phantom_png()
        page.get_by_label("Choose a chest X-ray").set_input_files(
            files=[{"name": "phantom.png", "mimeType": "image/png", "buffer": png}])
        prob = page.locator("#probability")
        expect(prob).to_have_text(re.compile(r"^\d\.\d{3}$"), timeout=30_000)
        expected = httpx.post(server_url + "/v1/predict", files={"file": ("p.png", png)}).json()
        assert float(prob.inner_text()) == pytest.approx(expected["probability"], abs=6e-4)
        expect(page.locator("#label")).to_have_text(expected["label"])
        assert page.locator("#bar").get_attribute("aria-valuenow") == prob.inner_text()
        expect(page.locator("#threshold-text")).to_have_text("threshold 0.40")
        expect(page.locator("#preview")).to_be_visible()

        overlay = page.locator("#overlay")
        toggle = page.get_by_label("Show heatmap")
        expect(overlay).to_be_visible(timeout=30_000)
        expect(toggle).to_be_enabled()
        assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0
        # The overlay lies exactly over the image: same box, same pixel size (so same aspect).
        box, under = overlay.bounding_box(), page.locator("#preview").bounding_box()
        assert box is not None and under is not None
        assert all(abs(box[k] - under[k]) < 1.5 for k in ("x", "y", "width", "height")), (box, under)
        sizes = page.evaluate("['overlay', 'preview'].map((id) => [document.getElementById(id).naturalWidth,"
                              " document.getElementById(id).naturalHeight])")
        assert sizes[0] == sizes[1], sizes
        toggle.uncheck()
        expect(overlay).to_be_hidden()
        toggle.check()
        expect(overlay).to_be_visible()
        expect(page.locator("#status")).to_have_text("Done.")

        shot = tmp_path / "serve_page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).size[0] == 1366
        if os.environ.get("PNEUMOSCOPE_SCREENSHOT_DIR"):
            out = Path(os.environ["PNEUMOSCOPE_SCREENSHOT_DIR"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / shot.name)
        assert errors == []

        # A file that is not an image: the page says why, nothing breaks.
        page.get_by_label("Choose a chest X-ray").set_input_files(
            files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"just some text\n"}])
        expect(page.locator("#error")).to_contain_text("unsupported file type", timeout=30_000)
        expect(page.locator("#outcome")).to_be_hidden()
        # Chromium logs each failed fetch ("Failed to load resource ... 415"); nothing else may appear.
        assert [e for e in errors if "Failed to load resource" not in e] == []
    finally:
        page.close()


def test_page_shows_a_notice_instead_of_a_label_for_a_photo(server_url: str, browser: object,
                                                            tmp_path: Path) -> None:
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    try:
        page.goto(server_url + "/")
        expect(page.locator("#model-name")).to_have_text("resnet18")
        yy, xx = np.mgrid[0:128, 0:128] / 128
        photo = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 255
        buf = io.BytesIO()
        Image.fromarray(photo.astype(np.uint8), mode="RGB").save(buf, format="JPEG", quality=90)
        page.get_by_label("Choose a chest X-ray").set_input_files(
            files=[{"name": "photo.jpeg", "mimeType": "image/jpeg", "buffer": buf.getvalue()}])
        notice = page.locator("#gate-notice")
        expect(notice).to_be_visible(timeout=30_000)
        expect(notice).to_contain_text("Not a chest X-ray")
        expect(notice).to_contain_text("in colour")
        expect(page.locator("#outcome")).to_be_hidden()  # no probability, no label
        expect(page.locator("#status")).to_have_text("Done.")
        if os.environ.get("PNEUMOSCOPE_SCREENSHOT_DIR"):
            page.screenshot(path=str(Path(os.environ["PNEUMOSCOPE_SCREENSHOT_DIR"]) / "serve_refused.png"),
                            full_page=True)
    finally:
        page.close()
