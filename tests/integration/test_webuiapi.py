"""The extension through the `webuiapi` client package (PyPI), as scripts and bots use the WebUI: prompt
syntax, alwayson_scripts in both forms, img2img, a bad argument's 422, and the /anima/v1 routes on its session."""

from __future__ import annotations

import io
import json
import urllib.parse

import numpy as np
import pytest

from tests.integration import webui_client as client

webuiapi = pytest.importorskip("webuiapi")
COMMON = {"steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler a", "cfg_scale": 7}


@pytest.fixture(scope="module")
def api(webui):
    url = urllib.parse.urlparse(client.URL)
    return webuiapi.WebUIApi(host=url.hostname, port=url.port)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.float64)


def test_prompt_syntax_through_webuiapi(api, ctx):
    prompt = f"a photo of a dog <anima:{ctx['name']}:1>"
    result = api.txt2img(prompt=prompt, **COMMON)
    assert f'Anima 1: "name: {ctx["name"]}, hash: {ctx["hash"]}, scale: 1, mode: positive, source: prompt"' \
        in result.info["infotexts"][0]
    same = client.txt2img(prompt)  # the plain HTTP client with the same settings
    assert (_pixels(result.image) == same.pixels()).all()
    plain = api.txt2img(prompt="a photo of a dog", **COMMON)
    assert client.mean_diff(_pixels(result.image), _pixels(plain.image)) > 1.0


def test_alwayson_scripts_positional_and_named(api, ctx):
    positional = api.txt2img(prompt="a photo of a dog", **COMMON, alwayson_scripts={
        "anima": {"args": [True, ctx["name"], 0.8, "negative", 0.0, 1.0, "coarse"]}})
    named = api.txt2img(prompt="a photo of a dog", **COMMON, alwayson_scripts={
        "anima": {"args": [{"units": [{"name": ctx["name"], "scale": 0.8, "mode": "negative", "preset": "coarse"}]}]}})
    assert (_pixels(positional.image) == _pixels(named.image)).all()
    assert "mode: negative" in named.info["infotexts"][0] and "weights: coarse" in named.info["infotexts"][0]


def test_img2img_through_webuiapi(api, ctx):
    init = api.txt2img(prompt="a house", **COMMON).image
    plain = api.img2img(images=[init], prompt="a cat", denoising_strength=0.6, **COMMON)
    with_ctx = api.img2img(images=[init], prompt=f"a cat <anima:{ctx['name']}:1>", denoising_strength=0.6, **COMMON)
    assert client.mean_diff(_pixels(plain.image), _pixels(with_ctx.image)) > 1.0
    assert "Anima 1" in with_ctx.info["infotexts"][0]


def test_bad_argument_is_a_clear_error_for_webuiapi(api, ctx):
    with pytest.raises(RuntimeError) as raised:
        api.txt2img(prompt="a dog", **COMMON, alwayson_scripts={"anima": {"args": [True, ctx["name"], 9]}})
    status, text = raised.value.args
    assert status == 422 and "scale must be from 0 to 4, got 9" in json.loads(text)["detail"]
    assert api.txt2img(prompt="a dog", **COMMON).image is not None  # and the server goes on


def test_anima_routes_on_the_client_session(api, ctx):
    base = api.baseurl.replace("/sdapi/v1", "/anima/v1")
    listing = api.session.get(f"{base}/contexts", timeout=60).json()
    assert ctx["name"] in [c["name"] for c in listing["contexts"]]
    data = api.session.get(f"{base}/contexts/{ctx['name']}/file", timeout=60).content
    r = api.session.post(f"{base}/contexts/itest_webuiapi/file?overwrite=true", files={"file": ("x.safetensors", io.BytesIO(data))},
                         timeout=60)
    assert r.status_code == 201 and r.json()["hash"] == ctx["hash"]
    assert api.session.delete(f"{base}/contexts/itest_webuiapi", timeout=60).status_code == 200
