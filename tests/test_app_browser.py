"""A real-browser test of the Streamlit app: `streamlit run app/main.py` driven by headless Chromium.

    OMP_NUM_THREADS=1 python -m pytest tests/test_app_browser.py -q -s     # -s shows the screenshot path

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`; CI installs it) and
Playwright's Python package; a missing browser fails the test rather than skipping it. The server
runs on a free loopback port against the tiny bundle (tests/conftest.py), or the bundle named by
$MARS_SCREENSHOT_CHECKPOINT, through $MARS_CHECKPOINT. The screenshot, app.png, goes to
$MARS_SCREENSHOT_DIR when set, else to the test's tmp directory. docs/app.png is made by

    MARS_SCREENSHOT_CHECKPOINT=checkpoints/mars-shapes MARS_SCREENSHOT_DIR=docs python -m pytest tests/test_app_browser.py
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars.errors import first_line

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle to the left of a blue square"
SERVER_START_S, PAGE_S, GENERATE_S = 60, 30, 60

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not answer on {url} within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def app_server(tiny_bundle, tmp_path):
    """`streamlit run app/main.py` on a free loopback port; killed (whole process group) afterwards."""
    port = free_port()
    log = tmp_path / "streamlit.log"
    bundle = (REPO / os.environ["MARS_SCREENSHOT_CHECKPOINT"]) if os.environ.get("MARS_SCREENSHOT_CHECKPOINT") else tiny_bundle
    command = [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.headless", "true",
               "--server.fileWatcherType", "none"]
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=os.environ | {"MARS_CHECKPOINT": str(bundle), "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, log)
        yield url, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_browser_generates_an_image(app_server, tmp_path):
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`"
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    url, server_log = app_server
    shots = Path(os.environ.get("MARS_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    screenshot = shots / "app.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=PAGE_S * 1000)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(PAGE_S * 1000)
        try:
            page.goto(url, wait_until="domcontentloaded")
            prompt = page.get_by_label("Prompt, in English or Chinese")
            prompt.fill(PROMPT)
            prompt.press("Control+Enter")  # commit the text area's value before the click
            page.get_by_role("button", name="Generate").click()
            image = page.locator(f'img[alt="{PROMPT}"]').first
            image.wait_for(state="visible", timeout=GENERATE_S * 1000)
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            page.get_by_text("Download PNG").first.wait_for(state="visible")
            page.mouse.move(0, 0)  # no hover highlight in the picture
            page.screenshot(path=str(screenshot), full_page=True)
            frame = page.evaluate("(img) => getComputedStyle(img).borderTopWidth", image.element_handle())
            deploy_buttons = page.get_by_role("button", name="Deploy").count()
            pixels = np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("RGB"))
            natural = page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", image.element_handle())
        except PlaywrightError as error:
            page.screenshot(path=str(screenshot), full_page=True)
            pytest.fail(f"{first_line(error)}\nscreenshot: {screenshot}\nserver log:\n{server_log.read_text()[-3000:]}")
        finally:
            browser.close()
    print(f"\nscreenshot: {screenshot}")
    assert natural == [256, 256]  # the tiny bundle samples 128 px and super-resolves to 256
    assert frame == "1px"  # white shapes on a white page need an edge
    assert deploy_buttons == 0  # a local model has nothing to deploy
    assert pixels.shape[0] >= 128 and pixels.shape[1] >= 128
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, "the generated image is a single colour"
