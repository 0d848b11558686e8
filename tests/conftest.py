import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTED = tuple(os.path.join(HERE, suite) + os.sep for suite in ("integration", "thirdparty"))  # need a running host
NO_HOST = (
    "{n} integration test(s) were selected but ANIMA_WEBUI_URL is not set, so no WebUI host would answer them. "
    "Run `bash tests/run.sh` (it starts the host), point ANIMA_WEBUI_URL at a running A1111 v1.10.1 with the "
    "extension, or ask for the core tests only: `pytest tests/core`."
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A bare `pytest` without a host must not pass by skipping every integration test: it stops, saying why."""
    wanted = [item for item in session.items if str(item.fspath).startswith(HOSTED)]
    if wanted and not os.environ.get("ANIMA_WEBUI_URL"):
        raise pytest.UsageError(NO_HOST.format(n=len(wanted)))
