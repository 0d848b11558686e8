"""The WebUI in a real browser (Debian's chromium driven by Playwright): the card, the prompt, the panel."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration import webui_client as client

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


# What the card's onclick needs from the host: its javascript (cardClicked, in javascript/extraNetworks.js) and
# its settings object (opts, filled from the page once the UI has rendered).
HOST_SCRIPTS_READY = "() => typeof cardClicked === 'function' && 'extra_networks_add_text_separator' in opts"


@pytest.fixture(scope="module")
def js_errors() -> list[str]:
    """Uncaught page errors and failed host-file responses, for failure messages."""
    return []


@pytest.fixture(scope="module")
def page(webui, ctx, js_errors):
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
        page.on("pageerror", lambda e: js_errors.append(f"page error: {e}"))
        page.on("response", lambda r: js_errors.append(f"HTTP {r.status} {r.url}")
                if "/file=" in r.url and r.status >= 400 else None)
        page.goto(webui + "/?__theme=light")
        page.wait_for_selector("#txt2img_prompt textarea")
        _wait_for_host_scripts(page, js_errors)
        yield page
        browser.close()


def _wait_for_host_scripts(page, js_errors: list[str]) -> None:
    # The host's <script> tags are synchronous, in <head>: after page load they have run or never will.
    if not page.evaluate("() => typeof cardClicked === 'function'"):
        pytest.fail(
            "the WebUI's own javascript did not load, so no Extra Networks card can work. Gradio 3.41 answers 403 "
            "to /file= paths with a dot-directory in them: is the host installed under one (e.g. .webui-host)? "
            + "; ".join(js_errors[:5]))
    page.wait_for_function(HOST_SCRIPTS_READY, timeout=30_000)


@pytest.mark.forks
def test_card_click_inserts_prompt(page, ctx, js_errors):
    page.locator("#txt2img_extra_tabs > div > button", has_text="Anima").first.click()
    card = page.locator(f'#txt2img_anima_cards .card[data-name="{ctx["name"]}"]')
    card.wait_for(state="visible")
    expected = f"<anima:{ctx['name']}:1>"
    card.click()
    try:  # cardClicked sets the value synchronously; the wait only absorbs the browser round trip
        page.wait_for_function("t => document.querySelector('#txt2img_prompt textarea').value.includes(t)",
                               arg=expected, timeout=10_000)
    except Exception:  # noqa: BLE001 - reported by the assert below, with the value and page errors
        pass
    prompt = page.locator("#txt2img_prompt textarea").input_value()
    assert expected in prompt, f"prompt is {prompt!r}; {js_errors}"


@pytest.mark.forks
def test_panel_is_shown_in_txt2img(page):
    page.locator("#txt2img_extra_tabs > div > button", has_text="Generation").first.click()
    accordion = page.locator("#anima_txt2img_enabled")
    accordion.wait_for(state="visible")
    assert "Anima reference context" in accordion.inner_text()


@pytest.mark.forks
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


# ---- the Train form: send a txt2img result to the Anima tab, train from it -------------------------------------

TRAINED = "itest_ui_trained"


def _fill(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.dispatch_event("input")


@pytest.mark.forks
def test_send_to_anima_then_train(page):
    # a txt2img result, made in the browser as a user would
    _fill(page, "#txt2img_prompt textarea", "a lighthouse at dusk")
    for elem, value in (("txt2img_steps", "2"), ("txt2img_width", "64"), ("txt2img_height", "64")):
        _fill(page, f"#{elem} input[type=number]", value)
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for(state="visible", timeout=300_000)
    page.locator("#anima_send_from_txt2img").click()
    # the Anima tab shows the image and the prompt it was made with
    page.locator("#anima_tab_image img").first.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#anima_tab_prompt textarea').value.includes('lighthouse')")
    _fill(page, "#anima_tab_name textarea", TRAINED)
    _fill(page, "#anima_tab_steps input[type=number]", "3")
    _fill(page, "#anima_tab_resolution input[type=number]", "64")
    page.locator("#anima_tab_overwrite input").check()
    page.locator("#anima_tab_train").click()
    page.wait_for_function("document.querySelector('#anima_tab_output').innerText.includes('finished')",
                           timeout=600_000)
    info = client.get(f"/anima/v1/contexts/{TRAINED}").json()
    assert info["training"]["steps"] == 3 and info["training"]["prompt"].startswith("a lighthouse at dusk")
    assert client.status()["hooks_installed"] == 0
