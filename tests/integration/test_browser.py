"""The WebUI in a real browser (Debian's chromium driven by Playwright): the card, the prompt, the panel."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration import webui_client as client

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page(webui, ctx):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (tests/run.sh installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(webui + "/?__theme=light")
        page.wait_for_selector("#txt2img_prompt textarea")
        yield page
        browser.close()


@pytest.mark.xfail(reason="passes against a long-running host, fails on a fresh one (prompt stays empty); under investigation", strict=False)
def test_card_click_inserts_prompt(page, ctx):
    page.locator("#txt2img_extra_tabs > div > button", has_text="Anima").first.click()
    card = page.locator(f'#txt2img_anima_cards .card[data-name="{ctx["name"]}"]')
    card.wait_for(state="visible")
    expected = f"<anima:{ctx['name']}:1>"
    for _ in range(3):  # the page's card handlers may still be initialising right after load
        card.click()
        try:
            page.wait_for_function("t => document.querySelector('#txt2img_prompt textarea').value.includes(t)",
                                   arg=expected, timeout=5_000)
            break
        except Exception:  # noqa: BLE001 - retried, then asserted below
            page.wait_for_timeout(1_000)
    prompt = page.locator("#txt2img_prompt textarea").input_value()
    assert expected in prompt


def test_panel_is_shown_in_txt2img(page):
    page.locator("#txt2img_extra_tabs > div > button", has_text="Generation").first.click()
    accordion = page.locator("#anima_txt2img_enabled")
    accordion.wait_for(state="visible")
    assert "Anima reference context" in accordion.inner_text()


def test_paste_infotext_restores_panel(page, ctx):
    result = client.txt2img(anima_args=[True, ctx["name"], 0.65, "negative", 0.0, 1.0, ""])
    page.locator("#txt2img_prompt textarea").fill(result.infotext)
    page.locator("#txt2img_tools #paste").click()
    page.wait_for_function(
        "() => document.querySelector('#anima_txt2img_enabled-checkbox input').checked === true", timeout=30_000)
    name_value = page.locator("#anima_txt2img_name_0 input").input_value()
    scale_value = page.locator("#anima_txt2img_scale_0 input[type=number]").input_value()
    mode_checked = page.locator("#anima_txt2img_mode_0 input[value=negative]").is_checked()
    assert (name_value, float(scale_value), mode_checked) == (ctx["name"], 0.65, True)
