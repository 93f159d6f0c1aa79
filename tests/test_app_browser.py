"""The explorer app in a real browser: headless Chromium (Debian's) driven by Playwright, offline."""
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from main import main

from conftest import write_image_folder
from test_app import free_port, serve

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):  # CI installs it (.ci/run): there it must run
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
LOCAL = {"127.0.0.1", "localhost"}


def classes_in(label) -> set:
    """The class names the prediction shows, each on a line of its own."""
    return {line.strip() for line in label.inner_text().splitlines()} & {"blue", "green", "red"}


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    data = write_image_folder(root / "data", test_per_class=6)
    out = root / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "1",
                 "--batch-size", "12", "--lr", "2e-4", "--workers", "0", "--gallery-size", "0"]) == 0
    port = free_port()
    proc = serve([sys.executable, "app.py", "--checkpoint", str(out / "best.pt"), "--port", str(port)],
                 REPO, port)
    yield {"url": f"http://127.0.0.1:{port}/", "image": str(data / "test" / "red" / "000.png"), "root": root}
    proc.terminate()
    proc.wait(timeout=30)


def test_the_page_end_to_end(page_url):
    from playwright.sync_api import expect, sync_playwright

    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_url["url"])
        expect(page.get_by_text("3 classes: blue, green, red")).to_be_visible(timeout=60_000)

        page.locator("#image input[type=file]").set_input_files(page_url["image"])
        prediction = page.locator("#prediction")
        expect(prediction).to_contain_text("%", timeout=60_000)
        expect(page.locator("#cam img")).to_be_visible(timeout=60_000)
        assert classes_in(prediction) == {"blue", "green", "red"}  # k = 3 of 3

        k = page.locator("#k input[type=number]")
        k.fill("1")
        k.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('#prediction *').length > 0")
        for _ in range(100):  # the label redraws once the server answers
            if len(classes_in(prediction)) == 1:
                break
            page.wait_for_timeout(100)
        assert len(classes_in(prediction)) == 1, prediction.inner_text()

        before = page.locator("#cam img").get_attribute("src")
        page.locator("#layer input").click()
        page.get_by_role("option", name="layer1 (128x16x16, map 16x16)").click()
        expect(page.locator("#cam img")).not_to_have_attribute("src", before, timeout=60_000)
        before = page.locator("#cam img").get_attribute("src")
        opacity = page.locator("#opacity input[type=number]")
        opacity.fill("0.9")
        opacity.press("Enter")
        expect(page.locator("#cam img")).not_to_have_attribute("src", before, timeout=60_000)

        page.get_by_role("tab", name="mistakes").click()
        n = page.locator("#n-mistakes input[type=number]")
        n.fill("3")
        n.press("Enter")
        page.locator("#show-mistakes").click()
        expect(page.locator("#mistakes img").first).to_be_visible(timeout=60_000)
        assert 1 <= page.locator("#mistakes img").count() <= 3
        page.get_by_role("tab", name="the run").click()
        expect(page.locator("#per-class")).to_contain_text("blue", timeout=30_000)
        page.screenshot(path=str(page_url["root"] / "page.png"), full_page=True)
        browser.close()
    outside = sorted({urlparse(u).hostname for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")}
                     - LOCAL)
    assert outside == [], f"the page asked for {outside}"
