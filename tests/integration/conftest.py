import os

import pytest

from tests.integration import webui_client as client


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def webui() -> str:
    """The running WebUI's URL. In CI its absence is a failure; locally, a visible skip."""
    if not client.URL:
        if os.environ.get("CI"):
            pytest.fail("ANIMA_WEBUI_URL is not set: the WebUI host was not started (tests/run.sh starts it)")
        pytest.skip("no WebUI running (set ANIMA_WEBUI_URL, or run tests/run.sh)")
    try:
        client.get("/anima/v1/status").raise_for_status()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the WebUI at {client.URL} does not answer /anima/v1/status: {e}")
    return client.URL


@pytest.fixture(scope="session")
def ctx(webui) -> dict:
    """A deterministic random context for the SD1 tiny model."""
    return client.create_context("itest_ctx")
