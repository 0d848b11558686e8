"""Forge's page in a real browser (Gradio 4; Debian's chromium driven by Playwright): the Extra Networks card, the
panel, and training from the Anima tab with an uploaded mask (Gradio 4 has no sketch tool on an image input, so
the mask is an upload there). reForge (Gradio 3.41, like A1111) runs tests/integration/test_browser.py instead."""

from __future__ import annotations

import base64
import json
import os

import pytest
from PIL import Image

from tests.integration import webui_client as client
from tests.integration.browser import CHROMIUM, train_in_tab

TRAINED = "itest_forge_ui_trained"


@pytest.fixture(scope="module")
def page(fork, ctx):
    if fork != "forge":
        pytest.skip("Forge's Gradio 4 page; reForge runs tests/integration/test_browser.py")
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed (tests/run.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(client.URL + "/?__theme=light")
        page.wait_for_selector("#txt2img_prompt textarea")
        page.wait_for_function("() => typeof cardClicked === 'function'")
        page.errors = errors
        yield page
        browser.close()


def test_card_click_and_panel(page, ctx):
    page.locator("#txt2img_extra_tabs button", has_text="Anima").first.click()
    card = page.locator(f'#txt2img_anima_cards .card[data-name="{ctx["name"]}"]')
    card.wait_for(state="visible")
    card.click()
    expected = f"<anima:{ctx['name']}:1>"
    page.wait_for_function("t => document.querySelector('#txt2img_prompt textarea').value.includes(t)", arg=expected)
    page.locator("#txt2img_extra_tabs button", has_text="Generation").first.click()
    accordion = page.locator("#anima_txt2img_enabled")
    accordion.wait_for(state="visible")
    assert "Anima reference context" in accordion.inner_text() and not page.errors, page.errors


def _png(image: Image.Image, path: str) -> str:
    image.save(path, format="PNG")
    return path


def test_train_from_the_tab_with_an_uploaded_mask(page, tmp_path):
    reference = client.txt2img("a lighthouse at dusk", steps=2)
    ref_path = str(tmp_path / "reference.png")
    with open(ref_path, "wb") as f:
        f.write(base64.b64decode(reference.png_b64[0]))
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    mask_path = _png(half, str(tmp_path / "mask.png"))
    page.locator("#tabs button", has_text="Anima").first.click()
    page.locator("#anima_tab_image input[type=file]").set_input_files(ref_path)
    page.locator("#anima_tab_image img").first.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#anima_tab_prompt textarea').value.includes('lighthouse')")
    page.locator("#anima_tab_mask input[type=file]").set_input_files(mask_path)
    page.locator("#anima_tab_mask img").first.wait_for(state="visible")
    assert "finished" in train_in_tab(page, TRAINED, steps=2)
    info = client.get(f"/anima/v1/contexts/{TRAINED}").json()
    assert info["training"]["steps"] == 2 and info["training"]["prompt"].startswith("a lighthouse at dusk")
    log_dir = page.locator("#anima_tab_output").inner_text().split("checkpoints:")[-1].strip().splitlines()[0]
    with open(os.path.join(log_dir, "anima_request.json"), encoding="utf-8") as f:
        assert json.load(f)["masks"] == 1, "the uploaded mask reached the training"
    assert client.status()["hooks_installed"] == 0 and not page.errors, page.errors
