"""Faults during generation: an exception from another AlwaysOn script inside a sampling step (at the UNet, in
the middle of a UNet call at one cross-attention module, in the hires pass, in img2img), in the VAE, in its
``process``; an interrupt and a skip mid-generation. After each: no hook left installed, and the next images
are byte-identical to those made before any fault.

The failing script is tests/fixtures/anima_fault_ext (tests/run.sh links it into the host); its markers in the
prompt say where to fail. A fault that fired is checked from the response, so a fault that silently did not
happen fails the test.
"""

from __future__ import annotations

import time

import pytest

from tests.integration import webui_client as client


def _scripts() -> list[str]:
    return client.get("/sdapi/v1/scripts").json()["txt2img"]


@pytest.fixture(scope="module")
def clean(ctx) -> dict:
    if "fault injection (tests)" not in _scripts():
        pytest.skip("the fault-injection fixture is not linked into the host (tests/run.sh links it)")
    name = ctx["name"]
    return {
        "plain": client.txt2img().png_b64,
        "ctx": client.txt2img(f"a photo of a dog <anima:{name}:1>").png_b64,
        "panel": client.txt2img(anima_args=[True, name, 0.8, "negative", 0.0, 1.0, "coarse"]).png_b64,
    }


def _assert_clean_after(fault: str, clean: dict, name: str) -> None:
    assert client.status()["hooks_installed"] == 0, f"{fault}: hooks left installed"
    assert client.txt2img().png_b64 == clean["plain"], f"{fault}: plain image changed"
    after = client.txt2img(f"a photo of a dog <anima:{name}:1>")
    assert after.png_b64 == clean["ctx"], f"{fault}: context image changed: {after.infotext} / {_infotext(clean['ctx'])}"
    panel = client.txt2img(anima_args=[True, name, 0.8, "negative", 0.0, 1.0, "coarse"]).png_b64
    assert panel == clean["panel"], f"{fault}: panel image changed"


def _failing(body: dict, route: str = "/sdapi/v1/txt2img") -> str:
    base = {"steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler a"}
    r = client.post(route, {**base, **body})
    assert r.status_code == 500, f"the injected fault did not fire: {r.status_code} {r.text[:300]}"
    assert "injected fault" in r.text and "Traceback" not in r.text
    return r.json()["errors"]


FAULTS = {  # name: (request, the message the fault must have raised)
    "unet call 1": ({"prompt": "a photo of a dog XFAULT_UNET_1 <anima:{n}:1>"}, "unet call 1"),
    "unet call 3": ({"prompt": "a dog XFAULT_UNET_3",
                     "alwayson_scripts": {"anima": {"args": [True, "{n}", 1.0, "positive", 0, 1, ""]}}}, "unet call 3"),
    "mid UNet call, at one cross-attention": ({"prompt": "a dog XFAULT_ATTN_2 <anima:{n}:1.5:negative>"},
                                              "cross-attention call 2"),
    # a prompt over 75 tokens against an empty negative: the host calls the UNet for cond and uncond apart
    # (override_settings would do it too, but the host keeps an override of an unset option afterwards)
    "batch 2, separate cond/uncond calls": ({"prompt": "a dog " * 40 + "XFAULT_UNET_5 <anima:{n}:1>", "batch_size": 2},
                                            "unet call 5"),
    "hires pass": ({"prompt": "a dog XFAULT_UNET_6 <anima:{n}:1>", "enable_hr": True, "hr_scale": 1.5,
                    "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 3}, "unet call 6"),
    "vae decode": ({"prompt": "a dog XFAULT_VAE <anima:{n}:1>"}, "vae call 1"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_exception_in_another_script_leaves_nothing_behind(ctx, clean, fault):
    body, expected = FAULTS[fault]
    assert _failing(_fill(body, ctx["name"])) == f"injected fault: {expected}"
    _assert_clean_after(f"exception: {fault}", clean, ctx["name"])


def test_exception_in_img2img_sampling(ctx, clean):
    init = clean["plain"][0]
    _failing({"prompt": f"a cat XFAULT_UNET_2 <anima:{ctx['name']}:1>", "init_images": [init],
              "denoising_strength": 0.6}, route="/sdapi/v1/img2img")
    _assert_clean_after("exception: img2img sampling", clean, ctx["name"])


def test_exception_in_process_is_logged_and_generation_goes_on(ctx, clean):
    """The host catches what a script's process() raises: the image is made, with the context applied."""
    result = client.txt2img(f"a photo of a dog <anima:{ctx['name']}:1> XFAULT_PROCESS")
    assert f"name: {ctx['name']}" in result.infotext
    _assert_clean_after("exception: another script's process()", clean, ctx["name"])


ACTIONS = ["interrupt", "skip"]


@pytest.mark.parametrize("action", ACTIONS)
def test_interrupt_and_skip_mid_generation(ctx, clean, action):
    worker, result = client.generation_in_flight(f"x XFAULT_SLOW_50 <anima:{ctx['name']}:1>", steps=200)
    started = time.time()
    client.post(f"/sdapi/v1/{action}")
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert time.time() - started < 8, f"{action} did not stop the 200-step run early"
    assert result["r"].status_code == 200, result["r"].text[:300]
    _assert_clean_after(action, clean, ctx["name"])


def test_report_fault_count():
    """The faults this file injects, counted from its definitions (not from which tests ran before, or in what
    order); each test checks its own fault fired."""
    others = {"img2img sampling": test_exception_in_img2img_sampling,
              "another script's process()": test_exception_in_process_is_logged_and_generation_goes_on}
    faults = [*(f"exception: {name}" for name in [*FAULTS, *others]), *ACTIONS]
    print(f"\nreliability: faults injected during generation: {len(faults)} ({', '.join(faults)})")
    assert len(faults) >= 10


def _fill(body: dict, name: str) -> dict:
    import json

    return json.loads(json.dumps(body).replace("{n}", name))


def _infotext(images: list[str]) -> str:
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(images[0]))).info.get("parameters", "")
