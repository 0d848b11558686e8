"""--api-auth: every /anima/v1 route, and the 422 check on txt2img/img2img, behave as the host's own routes.

tests/run.sh runs this against a host started with ``WEBUI_API_AUTH=user:password`` (``--api-auth``), with
``ANIMA_HOST_KIND=api-auth ANIMA_API_AUTH=user:password``; everywhere else the routes are open like the host's.
"""

from __future__ import annotations

import os

import pytest
import requests

from tests.integration import webui_client as client

pytestmark = pytest.mark.host("api-auth")
AUTH = os.environ.get("ANIMA_API_AUTH", "")
FLOW = [  # a working sequence: each answers 200 with the right credentials
    ("GET", "/anima/v1/contexts", None), ("POST", "/anima/v1/contexts", {"name": "itest_auth", "overwrite": True}),
    ("GET", "/anima/v1/contexts/itest_auth", None), ("POST", "/anima/v1/refresh", None),
    ("GET", "/anima/v1/contexts/itest_auth/file", None), ("POST", "/anima/v1/contexts/itest_auth/rename", {"new_name": "itest_auth2"}),
    ("DELETE", "/anima/v1/contexts/itest_auth2", None), ("GET", "/anima/v1/status", None),
    ("GET", "/anima/v1/train/jobs", None), ("GET", "/anima/v1/train/templates", None),
]


@pytest.fixture(scope="module")
def credentials() -> tuple[str, str]:
    if ":" not in AUTH:
        pytest.fail("ANIMA_API_AUTH=user:password must name the credentials the host was started with (--api-auth)")
    user, password = AUTH.split(":", 1)
    return user, password


def _call(method: str, path: str, body, auth) -> requests.Response:
    return requests.request(method, client.URL + path, json=body, auth=auth, timeout=120)


def every_anima_route(auth) -> list[tuple[str, str]]:
    """(method, path) of every route under /anima/ in the app, path parameters filled in (from /openapi.json)."""
    spec = requests.get(client.URL + "/openapi.json", auth=auth, timeout=60).json()
    routes = [(method.upper(), path.replace("{name}", "itest_auth").replace("{job_id}", "no-such-job"))
              for path, operations in spec["paths"].items() if path.startswith("/anima/") for method in operations]
    assert len(routes) >= 17, f"the app lists only {len(routes)} anima routes: {routes}"
    return routes


def test_every_route_needs_the_hosts_credentials(credentials):
    user, password = credentials
    assert _call("GET", "/sdapi/v1/sd-models", None, None).status_code == 401  # the host's own rule
    for method, path in every_anima_route(credentials):
        assert _call(method, path, {}, None).status_code == 401, (method, path)
        assert _call(method, path, {}, (user, password + "x")).status_code == 401, (method, path)
        answered = _call(method, path, {}, (user, password))
        assert answered.status_code not in (401, 403) and answered.status_code < 500, (method, path, answered.text[:300])


def test_routes_work_with_the_credentials(credentials):
    for method, path, body in FLOW:
        assert _call(method, path, body, None).status_code == 401, (method, path)
        r = _call(method, path, body, credentials)
        assert r.status_code == 200, (method, path, r.text[:300])


def test_generation_check_answers_only_authenticated_clients(credentials):
    bad = {"prompt": "a dog", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"anima": 5}}
    assert _call("POST", "/sdapi/v1/txt2img", bad, None).status_code == 401  # not a 422 that tells a stranger why
    r = _call("POST", "/sdapi/v1/txt2img", bad, credentials)
    assert r.status_code == 422 and "alwayson_scripts.anima" in r.json()["detail"]
