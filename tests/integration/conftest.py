import os

import pytest

from tests.integration import webui_client as client

# Which kind of host tests/run.sh started for this pytest run: "api" (the usual, with --api), "no-api" (started
# without --api: tests/host_without_api.sh) or "api-auth" (--api-auth). Each test runs against one kind (marker
# `host`, default "api"); the others are deselected, and pytest's summary counts them.
HOST_KIND = os.environ.get("ANIMA_HOST_KIND", "api")
HOST_KINDS = ("api", "no-api", "api-auth")


def pytest_configure(config):
    if HOST_KIND not in HOST_KINDS:
        raise pytest.UsageError(f"ANIMA_HOST_KIND={HOST_KIND!r}: expected one of {', '.join(HOST_KINDS)}")


def pytest_collection_modifyitems(config, items):
    keep, other_hosts = [], []
    for item in items:
        if "integration" not in str(item.fspath):
            keep.append(item)
            continue
        item.add_marker(pytest.mark.integration)
        marker = item.get_closest_marker("host")
        (keep if (marker.args[0] if marker else "api") == HOST_KIND else other_hosts).append(item)
    if other_hosts:
        config.hook.pytest_deselected(items=other_hosts)
        items[:] = keep


@pytest.fixture(scope="session")
def webui() -> str:
    """The running WebUI's URL (tests/conftest.py stops a run that has none)."""
    try:
        client.get("/anima/v1/status").raise_for_status()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the WebUI at {client.URL} does not answer /anima/v1/status: {e}")
    return client.URL


@pytest.fixture(scope="session")
def ctx(webui) -> dict:
    """A deterministic random context for the SD1 tiny model."""
    return client.create_context("itest_ctx")
