"""Extra Networks cards of contexts whose files carry markup: shown as text, never run (the host puts card
values into its HTML as they are).

Through the host's own card route (``/sd_extra_networks/get-single-card``, what its Extra Networks pane uses to
redraw one card); the ✎ editor and a card that cannot be built are checked in the browser (test_browser.py).
"""

from __future__ import annotations

import pytest

from tests.integration import webui_client as client

XSS = "itest_xss"
PAYLOADS = {"prompt": "<img src=x onerror=alert('prompt')> a fox <lora:x:1>",
            "base_model": "<script>alert('base')</script>", "created": "<svg onload=alert('created')>"}
RAW = ("<img src=x", "<script>", "<svg onload", "<lora:x:1>")


@pytest.fixture(scope="module")
def hostile(ctx) -> str:
    """A context whose training record holds script payloads and a prompt with <lora:...> syntax."""
    data = client.get(f"/anima/v1/contexts/{ctx['name']}/file").content
    client.upload_context(XSS, client.with_training(data, {**PAYLOADS, "steps": 3}))
    yield XSS
    client.delete_context(XSS)


def card(name: str) -> str:
    r = client.get("/sd_extra_networks/get-single-card", params={"page": "anima", "tabname": "txt2img", "name": name})
    assert r.status_code == 200, r.text[:500]
    return r.json()["html"]


def set_option(key: str, value) -> None:
    assert client.post("/sdapi/v1/options", {key: value}).status_code == 200


def test_card_shows_file_values_as_text(hostile):
    html = card(hostile)
    assert not [raw for raw in RAW if raw in html], html
    assert "&lt;img src=x onerror=alert(" in html and "&lt;lora:x:1&gt;" in html  # searchable, shown as written


def test_description_from_the_file_is_escaped_when_descriptions_are_html(hostile):
    """The host's "Treat card description as HTML" is for descriptions users write, not for a file's prompt."""
    set_option("extra_networks_card_description_is_html", True)
    try:
        html = card(hostile)
    finally:
        set_option("extra_networks_card_description_is_html", False)
    assert not [raw for raw in RAW if raw in html], html
    assert "&lt;img src=x onerror=alert(" in html
