"""The Forge / reForge suite (tests/run.sh runs it against each fork whose source is present).

``ANIMA_FORK`` names the fork the server at ``ANIMA_WEBUI_URL`` is (``forge`` or ``reforge``); the fixtures are
the integration suite's own (same context, same client).
"""

from __future__ import annotations

import os

import pytest

from tests.integration.conftest import ctx, webui  # noqa: F401 - the integration suite's fixtures, shared

FORK = os.environ.get("ANIMA_FORK", "")
SITES = 7  # the forks' test checkpoint: SD1.5-shaped, 2 attention levels (../shared/forge-host/README.md)


@pytest.fixture(scope="session")
def fork(webui) -> str:  # noqa: F811 - the fixture above
    if FORK not in ("forge", "reforge"):
        pytest.fail(f"ANIMA_FORK must be forge or reforge, got {FORK!r} (tests/run.sh sets it)")
    return FORK


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{os.sep}forks{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.forks)
