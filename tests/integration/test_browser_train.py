"""The Train form in a real browser: send a txt2img result to the Anima tab, train from it, see the result."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration import webui_client as client

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NAME = "itest_ui_trained"


@pytest.fixture(scope="module")
def page(webui):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (tests/run.sh installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(webui + "/?__theme=light")
        page.wait_for_selector("#txt2img_prompt textarea")
        yield page
        browser.close()


def _fill(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.dispatch_event("input")


def test_send_to_anima_then_train(page):
    # a txt2img result, made in the browser as a user would
    _fill(page, "#txt2img_prompt textarea", "a lighthouse at dusk")
    for elem, value in (("txt2img_steps", "2"), ("txt2img_width", "64"), ("txt2img_height", "64")):
        _fill(page, f"#{elem} input[type=number]", value)
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for(state="visible")
    page.locator("#anima_send_from_txt2img").click()
    # the Anima tab shows the image and the prompt it was made with
    page.locator("#anima_tab_image img").first.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#anima_tab_prompt textarea').value.includes('lighthouse')")
    _fill(page, "#anima_tab_name textarea", NAME)
    _fill(page, "#anima_tab_steps input[type=number]", "3")
    _fill(page, "#anima_tab_resolution input[type=number]", "64")
    page.locator("#anima_tab_overwrite input").check()
    page.locator("#anima_tab_train").click()
    page.wait_for_function("document.querySelector('#anima_tab_output').innerText.includes('finished')")
    info = client.get(f"/anima/v1/contexts/{NAME}").json()
    assert info["training"]["steps"] == 3 and info["training"]["prompt"].startswith("a lighthouse at dusk")
    assert client.status()["hooks_installed"] == 0
