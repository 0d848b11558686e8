"""The WebUI in a real browser (Debian's chromium driven by Playwright): the card, the prompt, the panel, the
Anima tab (upload, mask, train, the Contexts list with delete and rename), cards of hostile or broken files."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.integration import webui_client as client
from tests.integration.browser import (
    Dialogs,
    fill,
    host_log_offset,
    host_log_since,
    open_page,
    png_with_infotext,
    show_anima_tab,
    train_in_tab,
    wait_for_host_scripts,
)


@pytest.fixture(scope="module")
def js_errors() -> list[str]:
    """Uncaught page errors and failed host-file responses, for failure messages."""
    return []


@pytest.fixture(scope="module")
def dialogs() -> Dialogs:
    return Dialogs()


@pytest.fixture(scope="module")
def page(webui, ctx, js_errors, dialogs):
    with open_page(webui, js_errors, dialogs) as page:
        yield page


IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "images")


def screenshot(locator, name: str) -> None:
    """The README's pictures: `ANIMA_SCREENSHOTS=1 bash tests/run.sh -k browser` writes them to docs/images/."""
    if os.environ.get("ANIMA_SCREENSHOTS"):
        os.makedirs(IMAGES, exist_ok=True)
        locator.screenshot(path=os.path.join(IMAGES, name))


@pytest.mark.forks
def test_card_click_inserts_prompt(page, ctx, js_errors):
    page.locator("#txt2img_extra_tabs > div > button", has_text="Anima").first.click()
    card = page.locator(f'#txt2img_anima_cards .card[data-name="{ctx["name"]}"]')
    card.wait_for(state="visible")
    screenshot(page.locator("#txt2img_anima_cards"), "cards.png")
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
    if os.environ.get("ANIMA_SCREENSHOTS"):  # open, with its first unit filled, for the picture
        page.evaluate("inputAccordionChecked('anima_txt2img_enabled', true)")
        screenshot(accordion, "panel.png")
        page.evaluate("inputAccordionChecked('anima_txt2img_enabled', false)")


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


@pytest.fixture(scope="module")
def ui_trained(page) -> int:
    """A context trained in the Anima tab from a txt2img result sent there (with the form's defaults: the sweep on);
    the host log's offset before it."""
    log_start = host_log_offset()
    # a txt2img result, made in the browser as a user would
    fill(page, "#txt2img_prompt textarea", "a lighthouse at dusk")
    for elem, value in (("txt2img_steps", "2"), ("txt2img_width", "64"), ("txt2img_height", "64")):
        fill(page, f"#{elem} input[type=number]", value)
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for(state="visible", timeout=300_000)
    page.locator("#anima_send_from_txt2img").click()
    # the Anima tab shows the image and the prompt it was made with
    page.locator("#anima_tab_image img").first.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#anima_tab_prompt textarea').value.includes('lighthouse')")
    assert "finished" in train_in_tab(page, TRAINED, steps=3)
    return log_start


@pytest.mark.forks
def test_send_to_anima_then_train(page, ui_trained):
    log_start = ui_trained
    info = client.get(f"/anima/v1/contexts/{TRAINED}").json()
    assert info["training"]["steps"] == 3 and info["training"]["prompt"].startswith("a lighthouse at dusk")
    assert client.status()["hooks_installed"] == 0
    logged = host_log_since(log_start)
    assert not [bad for bad in ("Traceback", "*** Error", "AttributeError") if bad in logged], logged[-3000:]


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
    screenshot(page.locator("#tab_anima"), "train.png")


# ---- the Anima tab: upload, drag and drop, a drawn mask; the Contexts list -------------------------------------

DROP_FILE = """async ([selector, b64]) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const files = new DataTransfer();
    files.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
    const target = document.querySelector(selector + ' [data-testid="image"]');
    target.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
}"""
UPLOADED = "itest_ui_uploaded"


def _prompt_is(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('#anima_tab_prompt textarea').value === t", arg=text,
                           timeout=30_000)


def _no_error_shown(page, form: str) -> None:
    shown = page.locator(f"#{form} .error, #{form}_prompt .error").all_inner_texts()
    assert not shown, f"the form shows an error: {shown}"


def test_upload_drop_and_drawn_mask_then_train(page, tmp_path, js_errors):
    """The reference through the file chooser and by drag and drop (the host's dragdrop.js; pasting ends in the
    same upload), each filling the prompt from its infotext; a mask drawn on it is used; nothing in the log."""
    log_start, errors_before = host_log_offset(), len(js_errors)
    show_anima_tab(page, "Train")
    remove = page.locator("#anima_tab_image button[aria-label='Remove Image']")
    if remove.count():  # an image from an earlier test
        remove.click()
    dropped = png_with_infotext(str(tmp_path / "dropped.png"), "a brass owl", (40, 90, 160))
    with open(dropped, "rb") as f:
        page.evaluate(DROP_FILE, ["#anima_tab_image", base64.b64encode(f.read()).decode()])
    _prompt_is(page, "a brass owl")
    remove.click()
    chosen = png_with_infotext(str(tmp_path / "chosen.png"), "a tin robot on a beach")
    page.locator("#anima_tab_image input[type=file]").set_input_files(chosen)
    _prompt_is(page, "a tin robot on a beach")
    box = page.locator("#anima_tab_image canvas[key=interface]").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    output = train_in_tab(page, UPLOADED, steps=2)
    assert "finished" in output, output
    _no_error_shown(page, "anima_tab_image")
    log_dir = output.split("checkpoints: ", 1)[1].splitlines()[0].strip()
    with open(os.path.join(log_dir, "anima_request.json"), encoding="utf-8") as f:
        request = json.load(f)
    assert (request["images"], request["masks"], request["prompt"]) == (1, 1, "a tin robot on a beach"), request
    # the Contexts list followed the training (no Refresh pressed)
    page.wait_for_function("n => document.querySelector('#anima_contexts_table').textContent.includes(n)",
                           arg=UPLOADED, timeout=30_000)
    logged = host_log_since(log_start)
    assert not [bad for bad in ("Traceback", "*** Error", "AttributeError") if bad in logged], logged[-3000:]
    # (the host's own txt2img page raises "reading 'props'" in Gradio's frontend: not counted, it is before this test)
    assert not [e for e in js_errors[errors_before:] if e.startswith("page error")], js_errors


def test_form_shows_the_options_models_defaults_and_names_a_refused_value(page):
    """The form is built and read by the options model's field names: its inputs show the defaults the API's
    schema shows, and a value the model refuses is named in the form's output (nothing runs)."""
    show_anima_tab(page, "Train")
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TrainBody"]["properties"]
    for name in ("n_tokens", "batch_size", "grad_accumulation", "save_every", "preview_every"):
        shown = page.locator(f"#anima_tab_{name} input[type=number]").input_value()
        assert float(shown) == schema[name]["default"], (name, shown)
    shown = page.locator("#anima_tab_learning_rate textarea").input_value()
    assert float(shown) == float(schema["learning_rate"]["default"]), shown  # "5e-2" or "0.05"
    fill(page, "#anima_tab_name textarea", "itest_ui_refused")
    fill(page, "#anima_tab_steps input[type=number]", "0")
    page.locator("#anima_tab_train").click()
    page.wait_for_function("document.querySelector('#anima_tab_output').innerText.includes('Training failed')",
                           timeout=120_000)
    output = page.locator("#anima_tab_output").last.inner_text()
    assert "steps:" in output and "1" in output, output
    fill(page, "#anima_tab_steps input[type=number]", "2")
    assert client.get("/anima/v1/contexts/itest_ui_refused").status_code == 404


def _choose(page, name: str) -> None:
    page.locator("#anima_contexts_chosen input").click()
    page.locator("#anima_contexts_chosen li", has_text=name).first.click()


def _table_has(page, name: str, present: bool = True) -> None:
    page.wait_for_function("([n, p]) => document.querySelector('#anima_contexts_table').textContent.includes(n) === p",
                           arg=[name, present], timeout=30_000)


def test_contexts_list_is_current_and_deletes_and_renames(page, ctx, js_errors, dialogs):
    folder = client.get("/anima/v1/contexts").json()["directory"]
    data = client.get(f"/anima/v1/contexts/{ctx['name']}/file").content

    def drop_in(name: str) -> None:  # as a user copies a file into the folder
        with open(os.path.join(folder, f".{name}.tmp"), "wb") as f:
            f.write(data)
        os.replace(os.path.join(folder, f".{name}.tmp"), os.path.join(folder, f"{name}.safetensors"))

    drop_in("itest_dropped_a")
    page.reload()
    page.wait_for_selector("#txt2img_prompt textarea")
    wait_for_host_scripts(page, js_errors)
    _table_has(page, "itest_dropped_a")  # filled when the page loads, the tab not even open
    drop_in("itest_dropped_b")
    show_anima_tab(page, "Contexts")
    _table_has(page, "itest_dropped_b")  # and when the tab is selected

    dialogs.answers[:] = [False]  # Delete, then Cancel in the confirmation: nothing happens
    _choose(page, "itest_dropped_a")
    page.locator("#anima_contexts_delete").click()
    page.wait_for_function("document.querySelector('#anima_contexts_status').innerText.includes('Nothing deleted')")
    assert os.path.exists(os.path.join(folder, "itest_dropped_a.safetensors"))
    assert dialogs.seen[-1].startswith("confirm: Delete the context itest_dropped_a")

    dialogs.answers[:] = [True]
    page.locator("#anima_contexts_delete").click()
    page.wait_for_function("document.querySelector('#anima_contexts_status').innerText.includes('Deleted itest_dropped_a')")
    assert not os.path.exists(os.path.join(folder, "itest_dropped_a.safetensors"))
    _table_has(page, "itest_dropped_a", present=False)

    dialogs.answers[:] = [True]
    _choose(page, "itest_dropped_b")
    fill(page, "#anima_contexts_new_name textarea", "itest_renamed_b")
    page.locator("#anima_contexts_rename").click()
    page.wait_for_function("document.querySelector('#anima_contexts_status').innerText.includes('Renamed')")
    assert dialogs.seen[-1].startswith("confirm: Rename the context itest_dropped_b to itest_renamed_b")
    names = [c["name"] for c in client.post("/anima/v1/refresh").json()["contexts"]]
    assert "itest_renamed_b" in names and "itest_dropped_b" not in names
    _table_has(page, "itest_renamed_b")

    dialogs.answers[:] = [True]  # a bad new name: told why, nothing changes
    fill(page, "#anima_contexts_new_name textarea", "../escape")
    _choose(page, "itest_renamed_b")
    page.locator("#anima_contexts_rename").click()
    page.wait_for_function("document.querySelector('#anima_contexts_status').innerText.includes('invalid context name')")
    assert os.path.exists(os.path.join(folder, "itest_renamed_b.safetensors"))
    client.delete_context("itest_renamed_b")


# ---- cards of files that carry markup, and cards that cannot be built -------------------------------------------

HOSTILE = "itest_xss_editor"
BROKEN = "itest_broken_card"


def _pane_card(page, name: str, timeout: float = 60_000):
    """The card of `name` in txt2img's Extra Networks Anima pane after its refresh (which rebuilds every card)."""
    page.locator("#tabs > .tab-nav > button", has_text="txt2img").click()
    page.locator("#txt2img_extra_tabs > div > button", has_text="Anima").first.click()
    page.locator("#txt2img_anima_extra_refresh >> visible=true").first.click()
    card = page.locator(f'#txt2img_anima_cards .card[data-name="{name}"]')
    card.wait_for(state="visible", timeout=timeout)
    return card


def test_card_editor_shows_file_markup_as_text(page, ctx, dialogs):
    training = {"prompt": "<img src=x onerror=\"window.animaXss=1;alert('prompt')\"> a fox <lora:x:1>",
                "base_model": "<script>window.animaXss=2</script>", "created": "<svg onload=\"alert('created')\">",
                "steps": 3}
    data = client.get(f"/anima/v1/contexts/{ctx['name']}/file").content
    client.upload_context(HOSTILE, client.with_training(data, training))
    seen_before = len(dialogs.seen)
    try:
        card = _pane_card(page, HOSTILE)
        card.hover()
        card.locator(".edit-button").click()
        table = page.locator("#txt2img_anima_edit_user_metadata .file-metadata")
        table.wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('#txt2img_anima_edit_user_metadata .file-metadata')"
                               ".innerText.includes('Training prompt')")
        page.wait_for_timeout(1000)  # an injected <img onerror> or <svg onload> fires as soon as it is parsed
        text = table.inner_text()
        assert "<img src=x onerror=" in text and "<lora:x:1>" in text and "<script>" in text, text
        assert page.evaluate("() => window.animaXss") is None
        assert dialogs.seen[seen_before:] == [], "a script from the file ran in the page"
    finally:
        page.evaluate("() => typeof closePopup === 'function' && closePopup()")
        client.delete_context(HOSTILE)


def test_card_that_cannot_be_built_is_shown_broken(page, ctx):
    data = client.get(f"/anima/v1/contexts/{ctx['name']}/file").content
    client.upload_context(BROKEN, data)
    folder = client.get("/anima/v1/contexts").json()["directory"]
    sidecar = os.path.join(folder, f"{BROKEN}.json")
    with open(sidecar, "w", encoding="utf-8") as f:  # the editor's file, hand-edited (or shared) with a bad value
        json.dump({"preferred weight": "abc"}, f)
    log_start = host_log_offset()
    try:
        card = _pane_card(page, BROKEN, timeout=30_000)
        text = card.inner_text()
        assert "broken card" in text and "'preferred weight'" in text and f"{BROKEN}.json" in text, text
        assert page.locator(f'#txt2img_anima_cards .card[data-name="{ctx["name"]}"]').is_visible()
        logged = host_log_since(log_start)
        assert f"the Extra Networks card for {os.path.join(folder, BROKEN)}.safetensors could not be built" in logged
    finally:
        os.remove(sidecar)
        client.delete_context(BROKEN)


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
    fill(page, "#anima_compare_prompt textarea", "a photo of a cat")
    fill(page, "#anima_compare_seed input[type=number]", "5")
    fill(page, "#anima_compare_steps input[type=number]", "4")
    fill(page, "#anima_compare_size input[type=number]", "64")
    page.locator("#anima_compare").click()
    width, height = _natural_size(page, "#anima_compare_preview img")
    output = page.evaluate("document.querySelector('#anima_compare_output').innerText")
    assert width == 5 * 64 and height > 64, (width, height, output)
    grid = _image_pixels(page, "#anima_compare_preview img")
    plain = client.txt2img("a photo of a cat", seed=5, steps=4, width=64, height=64).pixels()
    assert np.array_equal(grid[-64:, :64], plain), "Compare's scale-0 cell is the plain image"
    assert not np.array_equal(grid[-64:, 64:128], plain)
    assert f"{ctx['name']}: Scale sweep (scale 0" in output, output


def _pick(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.locator("ul.options li", has_text=option).first.click()


def _fill_settled(page, selector: str, value: str, tries: int = 10) -> None:
    """Fill a box the page may still overwrite: each change of an axis type or of the text-input switch sends
    the plot's values back from the server, and an answer that arrives after the fill would empty it."""
    for _ in range(tries):
        fill(page, selector, value)
        page.wait_for_timeout(1000)
        if page.locator(selector).input_value() == value:
            return
    raise AssertionError(f"{selector} did not keep the value {value!r}")


def test_xyz_plot_with_anima_axes_in_the_ui(page, ctx):
    """The Anima axes in the plot's type list, and a plot made with them: scale across, mode down."""
    page.locator("#tabs > .tab-nav > button", has_text="txt2img").first.click()
    page.locator("#txt2img_extra_tabs > div > button", has_text="Generation").first.click()
    _pick(page, "#txt2img_script_container #script_list", "X/Y/Z plot")
    try:
        page.locator("#script_txt2img_xyz_plot_x_type input").click()
        labels = [o.replace("✓", "").strip() for o in page.locator("ul.options li").all_inner_texts()]
        for axis in ("Anima context", "Anima scale", "Anima mode", "Anima start", "Anima end", "Anima sites"):
            assert axis in labels, labels
        page.locator("ul.options li", has_text="Anima scale").first.click()
        page.locator("#script_txt2img_xyz_plot_csv_mode input").check()  # typed values for the mode axis too
        _pick(page, "#script_txt2img_xyz_plot_y_type", "Anima mode")
        _fill_settled(page, "#script_txt2img_xyz_plot_x_values textarea", "0, 0.5, 1, 1.5")
        _fill_settled(page, "#script_txt2img_xyz_plot_y_values textarea", "positive, negative")
        # the context: the panel's first unit
        page.evaluate("inputAccordionChecked('anima_txt2img_enabled', true)")  # the host's own accordion switch
        page.wait_for_function("document.querySelector('#anima_txt2img_enabled-checkbox input').checked")
        name = page.locator("#anima_txt2img_name_0 input")
        name.fill(ctx["name"])
        name.press("Enter")
        fill(page, "#txt2img_prompt textarea", "a lighthouse at dusk")
        for elem, value in (("txt2img_steps", "4"), ("txt2img_width", "128"), ("txt2img_height", "128"),
                            ("txt2img_seed", "1234")):
            fill(page, f"#{elem} input[type=number]", value)
        page.locator("#txt2img_generate").click()
        # the grid's infotext (the page shows the first cell's; the generation info holds the grid's)
        grid_info = "JSON.parse(document.querySelector('#generation_info_txt2img textarea').value || '{}')"
        page.wait_for_function(f"(({grid_info}).infotexts || [''])[0].includes('X Type: Anima scale')", timeout=120_000)
        info = page.evaluate(f"({grid_info}).infotexts[0]")
        assert "Y Type: Anima mode" in info and 'X Values: "0, 0.5, 1, 1.5"' in info, info
        width, height = _natural_size(page, "#txt2img_gallery img")
        assert width > 4 * 128 and height > 2 * 128, (width, height)  # the 4 x 2 cells and the legend
        screenshot(page.locator("#txt2img_gallery img").first, "xyz.png")
    finally:  # leave txt2img without a script for whatever runs next
        _pick(page, "#txt2img_script_container #script_list", "None")
