"""--api-auth: every /anima/v1 route, and the 422 check on txt2img/img2img, behave as the host's own routes.

Needs a host started with ``--api-auth USER:PASSWORD`` and ``ANIMA_API_AUTH=USER:PASSWORD`` set for the tests
(skipped otherwise; the default run has auth off, where every other test shows the routes open like the host's).
"""

from __future__ import annotations

import os

import pytest
import requests

from tests.integration import webui_client as client

AUTH = os.environ.get("ANIMA_API_AUTH", "")
pytestmark = pytest.mark.skipif(":" not in AUTH, reason="set ANIMA_API_AUTH=user:password for a host run with --api-auth")
ROUTES = [
    ("GET", "/anima/v1/contexts", None), ("POST", "/anima/v1/contexts", {"name": "itest_auth", "overwrite": True}),
    ("GET", "/anima/v1/contexts/itest_auth", None), ("POST", "/anima/v1/refresh", None),
    ("GET", "/anima/v1/contexts/itest_auth/file", None), ("POST", "/anima/v1/contexts/itest_auth/rename", {"new_name": "itest_auth2"}),
    ("DELETE", "/anima/v1/contexts/itest_auth2", None), ("GET", "/anima/v1/status", None),
    ("GET", "/anima/v1/train/jobs", None),
]


def _call(method: str, path: str, body, auth) -> requests.Response:
    return requests.request(method, client.URL + path, json=body, auth=auth, timeout=120)


def test_routes_need_the_hosts_credentials():
    user, password = AUTH.split(":", 1)
    assert _call("GET", "/sdapi/v1/sd-models", None, None).status_code == 401  # the host's own rule
    for method, path, body in ROUTES:
        assert _call(method, path, body, None).status_code == 401, (method, path)
        assert _call(method, path, body, (user, password + "x")).status_code == 401, (method, path)
        r = _call(method, path, body, (user, password))
        assert r.status_code == 200, (method, path, r.text[:300])


def test_generation_check_answers_only_authenticated_clients():
    user, password = AUTH.split(":", 1)
    bad = {"prompt": "a dog", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"anima": 5}}
    assert _call("POST", "/sdapi/v1/txt2img", bad, None).status_code == 401  # not a 422 that tells a stranger why
    r = _call("POST", "/sdapi/v1/txt2img", bad, (user, password))
    assert r.status_code == 422 and "alwayson_scripts.anima" in r.json()["detail"]
