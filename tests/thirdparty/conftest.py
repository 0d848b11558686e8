"""Tests next to third-party extensions (../shared/host/thirdparty): tests/run.sh installs them into the host,
starts it with --anima-debug-rows and names the installed ones in ANIMA_THIRDPARTY."""

import os

import pytest

from tests.integration.conftest import ctx, webui  # noqa: F401  (the same fixtures)


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def installed() -> set[str]:
    names = os.environ.get("ANIMA_THIRDPARTY")
    if names is None:
        if os.environ.get("CI"):
            pytest.fail("ANIMA_THIRDPARTY is not set: tests/run.sh installs the third-party extensions and sets it")
        pytest.skip("no third-party extensions installed (run tests/run.sh, which installs them)")
    return set(names.split())
