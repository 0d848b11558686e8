"""A WebUI started without --api (tests/run.sh starts one with tests/host_without_api.sh): the extension's routes
do not exist there, as the host's own /sdapi does not, and the UI still trains and lists contexts without them.
"""

from __future__ import annotations

import pytest
import requests

from tests.integration import webui_client as client
from tests.integration.browser import open_page, png_with_infotext, show_anima_tab, train_in_tab

pytestmark = pytest.mark.host("no-api")
TRAINED = "itest_no_api_trained"
# every route the extension has, with a body a route would accept (so a 404 can only mean "no such route")
ROUTES = [
    ("GET", "/anima/v1/status", None), ("GET", "/anima/v1/contexts", None), ("POST", "/anima/v1/refresh", None),
    ("POST", "/anima/v1/contexts", {"name": "itest_no_api"}), ("GET", "/anima/v1/contexts/x", None),
    ("DELETE", "/anima/v1/contexts/x", None), ("POST", "/anima/v1/contexts/x/rename", {"new_name": "y"}),
    ("GET", "/anima/v1/contexts/x/file", None), ("POST", "/anima/v1/contexts/x/file", {"data": "AAAA"}),
    ("GET", "/anima/v1/contexts/x/preview", None), ("POST", "/anima/v1/contexts/x/preview", {"image": "AAAA"}),
    ("POST", "/anima/v1/train", {"name": "x"}), ("POST", "/anima/v1/train/jobs", {"name": "x"}),
    ("GET", "/anima/v1/train/jobs", None), ("GET", "/anima/v1/train/jobs/x", None),
    ("POST", "/anima/v1/train/jobs/x/interrupt", None), ("GET", "/anima/v1/train/templates", None),
]


@pytest.fixture(scope="module")
def host() -> str:
    if client.get("/").status_code != 200:
        pytest.fail(f"no WebUI page at {client.URL}")
    assert client.get("/sdapi/v1/sd-models").status_code == 404, "this host serves the API: started with --api?"
    return client.URL


def test_no_anima_route_without_the_hosts_api(host):
    answered = {f"{m} {p}": requests.request(m, host + p, json=b, timeout=60).status_code for m, p, b in ROUTES}
    assert set(answered.values()) == {404}, {k: v for k, v in answered.items() if v != 404}
    spec = client.get("/openapi.json").json()
    assert not [p for p in spec["paths"] if p.startswith("/anima/")], "anima routes are documented without --api"


def test_the_ui_trains_and_lists_without_the_routes(host, tmp_path):
    js_errors: list[str] = []
    with open_page(host, js_errors) as page:
        show_anima_tab(page, "Train")
        page.locator("#anima_tab_image input[type=file]").set_input_files(
            png_with_infotext(str(tmp_path / "ref.png"), "a paper boat"))
        page.wait_for_function("document.querySelector('#anima_tab_prompt textarea').value === 'a paper boat'")
        assert "finished" in train_in_tab(page, TRAINED, steps=2)
        show_anima_tab(page, "Contexts")
        page.wait_for_function("n => document.querySelector('#anima_contexts_table').textContent.includes(n)",
                               arg=TRAINED, timeout=30_000)
        # and its card in Extra Networks, with the host's thumbnail route (not ours) for the preview
        page.locator("#tabs > .tab-nav > button", has_text="txt2img").click()
        page.locator("#txt2img_extra_tabs > div > button", has_text="Anima").first.click()
        page.locator("#txt2img_anima_extra_refresh >> visible=true").first.click()
        card = page.locator(f'#txt2img_anima_cards .card[data-name="{TRAINED}"]')
        card.wait_for(state="visible", timeout=30_000)
        assert "/sd_extra_networks/thumb" in (card.locator("img").first.get_attribute("src") or "")
    assert not [e for e in js_errors if e.startswith("page error")], js_errors
