"""Shared by the browser tests: Debian's chromium through Playwright, the host's log, PNGs with infotext."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest
from PIL import Image, PngImagePlugin

from tests.integration import webui_client as client

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What the card's onclick needs from the host: its javascript (cardClicked, in javascript/extraNetworks.js) and
# its settings object (opts, filled from the page once the UI has rendered).
HOST_SCRIPTS_READY = "() => typeof cardClicked === 'function' && 'extra_networks_add_text_separator' in opts"


class Dialogs:
    """Every alert/confirm the page opens (a script payload that ran would open one); confirms are answered from
    `answers` (True: OK), anything else is dismissed."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.answers: list[bool] = []

    def handle(self, dialog) -> None:
        self.seen.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "confirm" and self.answers and self.answers.pop(0):
            dialog.accept()
        else:
            dialog.dismiss()


@contextlib.contextmanager
def open_page(url: str, js_errors: list[str], dialogs: Dialogs | None = None) -> Iterator:
    """A page on the WebUI with its scripts loaded; page errors, failed host files and dialogs are recorded."""
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
        if dialogs is not None:
            page.on("dialog", dialogs.handle)
        page.goto(url + "/?__theme=light")
        page.wait_for_selector("#txt2img_prompt textarea")
        wait_for_host_scripts(page, js_errors)
        yield page
        browser.close()


def wait_for_host_scripts(page, js_errors: list[str]) -> None:
    # The host's <script> tags are synchronous, in <head>: after page load they have run or never will.
    if not page.evaluate("() => typeof cardClicked === 'function'"):
        pytest.fail(
            "the WebUI's own javascript did not load, so no Extra Networks card can work. Gradio 3.41 answers 403 "
            "to /file= paths with a dot-directory in them: is the host installed under one (e.g. .webui-host)? "
            + "; ".join(js_errors[:5]))
    page.wait_for_function(HOST_SCRIPTS_READY, timeout=30_000)


def fill(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.dispatch_event("input")


def train_in_tab(page, name: str, steps: int) -> str:
    """The Anima tab's form (whatever reference it holds): name, steps, 64 px, overwrite on; press Train and wait
    until the output names the context (A1111 and both forks' pages). Returns the output's text."""
    fill(page, "#anima_tab_name textarea", name)
    fill(page, "#anima_tab_steps input[type=number]", str(steps))
    fill(page, "#anima_tab_resolution input[type=number]", "64")
    page.locator("#anima_tab_overwrite input").check()
    page.locator("#anima_tab_train").click()
    page.wait_for_function("n => document.querySelector('#anima_tab_output').innerText.includes('context ' + n)",
                           arg=name, timeout=600_000)
    return page.locator("#anima_tab_output").last.inner_text()


def show_anima_tab(page, inner: str) -> None:
    """The Anima tab, then its inner tab `inner` (Train or Contexts)."""
    page.locator("#tabs > .tab-nav > button", has_text="Anima").click()
    page.locator("#anima_tabs > .tab-nav > button", has_text=inner).click()


def png_with_infotext(path: str, prompt: str, color: tuple[int, int, int] = (200, 100, 50)) -> str:
    """A 64 px PNG carrying a WebUI infotext (the PNG text chunk ``parameters``), as the WebUI saves images."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64")
    Image.new("RGB", (64, 64), color).save(path, pnginfo=info)
    return path


def host_log_offset() -> int:
    return os.path.getsize(host_log())


def host_log_since(offset: int) -> str:
    with open(host_log(), encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


def host_log() -> str:
    path = os.path.join(client.HOST_DIR, ".host", "webui.log")
    if not os.path.isfile(path):
        pytest.fail(f"no host log at {path} (WEBUI_HOST_DIR={client.HOST_DIR!r}): the test reads the host's errors there")
    return path
