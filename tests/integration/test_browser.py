"""The WebUI in a real browser (Debian's chromium driven by Playwright): the card, the prompt, the panel."""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

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


# ---- the Train form: send a txt2img result to the Anima tab, train from it -------------------------------------

TRAINED = "itest_ui_trained"


def _fill(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.dispatch_event("input")


@pytest.fixture(scope="module")
def ui_trained(page) -> None:
    """A context trained in the Anima tab from a txt2img result sent there (with the form's defaults: the sweep on)."""
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


def test_send_to_anima_then_train(page, ui_trained):
    info = client.get(f"/anima/v1/contexts/{TRAINED}").json()
    assert info["training"]["steps"] == 3 and info["training"]["prompt"].startswith("a lighthouse at dusk")
    assert client.status()["hooks_installed"] == 0


def _natural_size(page, selector: str) -> tuple[int, int]:
    image = page.locator(selector).first
    image.wait_for(state="visible", timeout=60_000)
    page.wait_for_function("s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
                           arg=selector)
    return tuple(image.evaluate("i => [i.naturalWidth, i.naturalHeight]"))


def test_sweep_grid_shown_after_training(page, ui_trained):
    width, height = _natural_size(page, "#anima_tab_sweep_image img")
    assert width == 5 * 64 and height > 64, (width, height)
    text = page.evaluate("document.querySelector('#anima_tab_output').innerText")
    assert "Scale sweep (scale 0, scale 0.5, scale 1, scale 1.5, scale 1 negative" in text, text


def _image_pixels(page, selector: str) -> np.ndarray:
    """The pixels an <img> shows, fetched from its own source (a /file= URL or a data URL)."""
    src = page.locator(selector).first.get_attribute("src")
    if src.startswith("data:"):
        raw = base64.b64decode(src.split(",", 1)[1])
    else:
        response = page.request.get(src)
        assert response.ok, f"{src}: HTTP {response.status}"
        raw = response.body()
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(np.float64)


def test_compare_in_contexts_list(page, ctx):
    page.locator("#tabs > .tab-nav > button", has_text="Anima").first.click()
    page.locator("#anima_tabs > .tab-nav > button", has_text="Contexts").first.click()
    page.locator("#anima_contexts_refresh").click()  # the context was made after the page was built
    page.wait_for_function("n => document.querySelector('#anima_contexts_table').innerText.includes(n)",
                           arg=ctx["name"])
    page.locator("#anima_compare_name input").click()
    page.locator("ul.options li", has_text=ctx["name"]).first.click()
    _fill(page, "#anima_compare_prompt textarea", "a photo of a cat")
    _fill(page, "#anima_compare_seed input[type=number]", "5")
    _fill(page, "#anima_compare_steps input[type=number]", "4")
    _fill(page, "#anima_compare_size input[type=number]", "64")
    page.locator("#anima_compare").click()
    width, height = _natural_size(page, "#anima_compare_preview img")
    output = page.evaluate("document.querySelector('#anima_compare_output').innerText")
    assert width == 5 * 64 and height > 64, (width, height, output)
    grid = _image_pixels(page, "#anima_compare_preview img")
    plain = client.txt2img("a photo of a cat", seed=5, steps=4, width=64, height=64).pixels()
    assert np.array_equal(grid[-64:, :64], plain), "Compare's scale-0 cell is the plain image"
    assert not np.array_equal(grid[-64:, 64:128], plain)
    assert f"{ctx['name']}: Scale sweep (scale 0" in output, output


SCREENSHOT = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "images", "xyz.png")


def _choose(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.locator("ul.options li", has_text=option).first.click()


def _fill_settled(page, selector: str, value: str, tries: int = 10) -> None:
    """Fill a box the page may still overwrite: each change of an axis type or of the text-input switch sends
    the plot's values back from the server, and an answer that arrives after the fill would empty it."""
    for _ in range(tries):
        _fill(page, selector, value)
        page.wait_for_timeout(1000)
        if page.locator(selector).input_value() == value:
            return
    raise AssertionError(f"{selector} did not keep the value {value!r}")


def test_xyz_plot_with_anima_axes_in_the_ui(page, ctx):
    """The Anima axes in the plot's type list, and a plot made with them: scale across, mode down."""
    page.locator("#tabs > .tab-nav > button", has_text="txt2img").first.click()
    page.locator("#txt2img_extra_tabs > div > button", has_text="Generation").first.click()
    _choose(page, "#txt2img_script_container #script_list", "X/Y/Z plot")
    try:
        page.locator("#script_txt2img_xyz_plot_x_type input").click()
        labels = [o.replace("✓", "").strip() for o in page.locator("ul.options li").all_inner_texts()]
        for axis in ("Anima context", "Anima scale", "Anima mode", "Anima start", "Anima end", "Anima sites"):
            assert axis in labels, labels
        page.locator("ul.options li", has_text="Anima scale").first.click()
        page.locator("#script_txt2img_xyz_plot_csv_mode input").check()  # typed values for the mode axis too
        _choose(page, "#script_txt2img_xyz_plot_y_type", "Anima mode")
        _fill_settled(page, "#script_txt2img_xyz_plot_x_values textarea", "0, 0.5, 1, 1.5")
        _fill_settled(page, "#script_txt2img_xyz_plot_y_values textarea", "positive, negative")
        # the context: the panel's first unit
        page.evaluate("inputAccordionChecked('anima_txt2img_enabled', true)")  # the host's own accordion switch
        page.wait_for_function("document.querySelector('#anima_txt2img_enabled-checkbox input').checked")
        name = page.locator("#anima_txt2img_name_0 input")
        name.fill(ctx["name"])
        name.press("Enter")
        _fill(page, "#txt2img_prompt textarea", "a lighthouse at dusk")
        for elem, value in (("txt2img_steps", "4"), ("txt2img_width", "128"), ("txt2img_height", "128"),
                            ("txt2img_seed", "1234")):
            _fill(page, f"#{elem} input[type=number]", value)
        page.locator("#txt2img_generate").click()
        # the grid's infotext (the page shows the first cell's; the generation info holds the grid's)
        grid_info = "JSON.parse(document.querySelector('#generation_info_txt2img textarea').value || '{}')"
        page.wait_for_function(f"(({grid_info}).infotexts || [''])[0].includes('X Type: Anima scale')", timeout=120_000)
        info = page.evaluate(f"({grid_info}).infotexts[0]")
        assert "Y Type: Anima mode" in info and 'X Values: "0, 0.5, 1, 1.5"' in info, info
        width, height = _natural_size(page, "#txt2img_gallery img")
        assert width > 4 * 128 and height > 2 * 128, (width, height)  # the 4 x 2 cells and the legend
        if os.environ.get("ANIMA_SCREENSHOTS"):  # the README's picture: ANIMA_SCREENSHOTS=1 bash tests/run.sh -k xyz
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            page.locator("#txt2img_gallery img").first.screenshot(path=SCREENSHOT)
    finally:  # leave txt2img without a script for whatever runs next
        _choose(page, "#txt2img_script_container #script_list", "None")
