"""Contexts at generation on a real Forge / reForge, over HTTP: what the A1111 suite checks, with the fork's
own batching (cond and uncond as chunks of one UNet call) and patch machinery."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from lib_anima import infotext
from tests.forks.conftest import SITES
from tests.integration import webui_client as client
from tests.integration.webui_client import mean_diff, txt2img

# (Forge's hires pass runs at CFG 1 unless told, and its API fails without hr_additional_modules)
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
         "hr_second_pass_steps": 3, "hr_additional_modules": ["Use same choices"], "hr_cfg": 7}


def panel(name: str, scale: float = 1.0, mode: str = "positive", start: float = 0.0, end: float = 1.0,
          weights: str = "") -> list:
    return [True, name, scale, mode, start, end, weights]


def rows() -> dict:
    """Which rows of each UNet call of the last generation got which kind (--anima-debug-rows)."""
    r = client.get("/anima/v1/debug/rows")
    assert r.status_code == 200, "the fork must run with --anima-debug-rows (tests/run.sh starts it so)"
    return r.json()


def test_loaded_and_detected_as_the_fork(fork, ctx):
    status = client.status()
    assert status["host"] == fork and status["model_architecture"] == "sd1" and status["hooks_installed"] == 0
    assert ctx["sites"] == SITES and ctx["context_dim"] == 768
    scripts = client.get("/sdapi/v1/scripts").json()
    assert "anima" in scripts["txt2img"] and "anima" in scripts["img2img"]
    log_path = os.path.join(client.HOST_DIR, ".host", "webui.log")
    lines = open(log_path, encoding="utf8", errors="replace").read().splitlines()
    bad = [line for line in lines if ("anima" in line.lower()) and ("Error" in line or "Traceback" in line)
           and "Failed reading extension data from Git repository" not in line]
    assert not bad, bad


def test_identical_to_the_fork_without_the_extension(fork):
    baseline_dir = os.environ.get("ANIMA_BASELINE_DIR", "")
    assert os.path.isdir(baseline_dir), "tests/run.sh renders the baseline with the extension not installed"
    from tests.forks.cases import CASES
    from tests.integration.baseline import load

    for name, body in CASES.items():
        r = client.post("/sdapi/v1/txt2img", body)
        assert r.status_code == 200, r.text
        assert r.json()["images"] == load(baseline_dir, name), f"case {name} differs from the extension-less fork"


@pytest.fixture(scope="module")
def plain() -> client.Result:
    return txt2img()


def test_context_changes_the_image_and_zero_or_disabled_do_not(ctx, plain):
    first = txt2img(f"a photo of a dog <anima:{ctx['name']}:1>")
    assert first.png_b64 == txt2img(f"a photo of a dog <anima:{ctx['name']}:1>").png_b64, "deterministic"
    assert mean_diff(first.pixels(), plain.pixels()) > 1.0
    assert f'Anima 1: "name: {ctx["name"]}, hash: {ctx["hash"]}, scale: 1, mode: positive, source: prompt"' \
        in first.infotext
    assert txt2img(anima_args=[False, ctx["name"], 1.0, "positive", 0.0, 1.0, ""]).png_b64 == plain.png_b64
    zero = txt2img(anima_args=panel(ctx["name"], 0.0))
    assert zero.png_b64 == plain.png_b64 and "Anima" not in zero.infotext
    assert (txt2img(f"a photo of a dog <anima:{ctx['name']}:0>").pixels() == plain.pixels()).all()
    low, high = (mean_diff(txt2img(anima_args=panel(ctx["name"], s)).pixels(), plain.pixels()) for s in (0.25, 3.0))
    assert low < mean_diff(first.pixels(), plain.pixels()) < high


def test_modes_land_on_their_rows(ctx):
    """Positive on the conditional chunks only, negative on the unconditional ones; every row placed."""
    plain = txt2img("a cat AND a hat", batch_size=2, negative_prompt="blurry")
    for mode in ("positive", "negative"):
        result = txt2img("a cat AND a hat", batch_size=2, negative_prompt="blurry",
                         anima_args=panel(ctx["name"], 1.0, mode))
        record = rows()
        assert record["reached"] == {ctx["name"]: True}
        calls = record["calls"]
        assert len(calls) == 4, calls  # one UNet call per step: uncond + two AND conds, batch 2 each
        for call in calls:
            assert call["batch"] == 6 and len(call["cond"]) == 4 and len(call["uncond"]) == 2 and not call["unplaced"]
        assert f"mode: {mode}" in result.infotext and "Anima warnings" not in result.infotext
        for i in range(2):
            assert mean_diff(result.pixels(i), plain.pixels(i)) > 1.0, (mode, i)
    # (prompt, panel and named API arguments agree: tests/integration/test_generation.py, run here too)


def test_window_presets_and_several_contexts(ctx, plain):
    name = ctx["name"]
    other = client.create_context("itest_fork_other", seed=99)
    plain = plain.pixels()
    full = txt2img(anima_args=panel(name)).pixels()
    late = txt2img(anima_args=panel(name, start=0.5)).pixels()  # the last of 4 steps only
    early = txt2img(anima_args=panel(name, end=0.5)).pixels()
    assert mean_diff(late, plain) > 0 and mean_diff(late, full) > 1.0
    assert mean_diff(early, plain) > 1.0 and mean_diff(early, full) > 0
    never = txt2img(anima_args=panel(name, start=0.99))  # 4 steps: progress 0, .25, .5, .75 never reaches .99
    assert (never.pixels() == plain).all()
    assert "Anima 1" not in never.infotext and "reached no UNet call" in never.infotext
    parts = {part: txt2img(anima_args=panel(name, weights=part)).pixels() for part in ("in", "mid", "out")}
    for part, image in parts.items():  # every block of the fork's UNet is reached (the middle one has 1 site)
        assert mean_diff(image, plain) > 0.1 and mean_diff(image, full) > 0.1, part
    both = txt2img(f"a photo of a dog <anima:{name}:1> <anima:{other['name']}:1>")
    alone = txt2img(f"a photo of a dog <anima:{other['name']}:1>").pixels()
    assert "Anima 1" in both.infotext and "Anima 2" in both.infotext
    assert mean_diff(both.pixels(), alone) > 0.5 and mean_diff(both.pixels(), full) > 0.5
    result = txt2img(anima_args=panel(name, 0.8, "negative", 0.1, 0.9, "fine"))
    params = client.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + result.png_b64[0]}).json()
    assert infotext.panel_entries(params["parameters"]) == [{
        "name": name, "hash": ctx["hash"], "scale": "0.8", "mode": "negative", "start": "0.1", "end": "0.9",
        "weights": "fine"}]


def test_hires_and_img2img(fork, ctx):
    name = ctx["name"]
    plain_hr = txt2img(**HIRES)
    ctx_hr = txt2img(f"a photo of a dog <anima:{name}:1>", **HIRES)
    assert plain_hr.pixels().shape == (96, 96, 3)
    assert mean_diff(ctx_hr.pixels(), plain_hr.pixels()) > 1.0
    calls = rows()["calls"]  # 4 first-pass steps of cond+uncond, 3 hires steps
    assert len(calls) == 4 + 3 and all(not call["unplaced"] for call in calls), calls
    only_hr = txt2img(**HIRES, hr_prompt=f"a photo of a dog <anima:{name}:2>")  # the hires pass's own prompt
    assert mean_diff(only_hr.pixels(), plain_hr.pixels()) > 0.5 and "Anima 1" in only_hr.infotext
    init = plain_hr.png_b64[0]
    plain_i2i, again = client.img2img(init, "a cat"), client.img2img(init, "a cat")
    # Forge encodes the init image by sampling the VAE posterior with the global RNG: its img2img is not
    # repeatable, with or without the extension; reForge's is
    noise = mean_diff(plain_i2i.pixels(), again.pixels())
    assert (noise > 0) if fork == "forge" else (noise == 0), noise
    ctx_i2i = client.img2img(init, f"a cat <anima:{name}:1>")
    assert mean_diff(ctx_i2i.pixels(), plain_i2i.pixels()) > noise + 1.0 and "Anima 1" in ctx_i2i.infotext
    zero_i2i = client.img2img(init, f"a cat <anima:{name}:0>")
    assert mean_diff(zero_i2i.pixels(), plain_i2i.pixels()) <= noise and "Anima 1" not in zero_i2i.infotext
    assert client.status()["hooks_installed"] == 0


def test_patches_live_only_while_sampling(ctx, plain):
    seen = client.hooks_seen_during(lambda: txt2img(f"a photo of a dog <anima:{ctx['name']}:1>", steps=25))
    assert max(seen) == 2, f"the attn2 and attn2-output patches while sampling, saw {sorted(set(seen))}"
    assert client.status()["hooks_installed"] == 0
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=client.post("/sdapi/v1/txt2img", {
        "prompt": f"x <anima:{ctx['name']}:1>", "steps": 400, "width": 64, "height": 64, "seed": 1})))
    worker.start()
    deadline = time.time() + 60
    while client.status()["hooks_installed"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    client.post("/sdapi/v1/interrupt")
    worker.join()
    assert result["r"].status_code == 200 and client.status()["hooks_installed"] == 0
    assert txt2img().png_b64 == plain.png_b64


def _script_key(fragment: str) -> str:
    names = client.get("/sdapi/v1/scripts").json()["txt2img"]
    found = [n for n in names if fragment in n]
    assert found, f"no script matching {fragment!r} in {names}"
    return found[0]


def test_stacks_with_the_forks_own_patches(fork, ctx):
    """The fork's Self-Attention Guidance (attn1 replace + an extra degraded pass) and an attn2 replace patch on
    every block (as Forge's IP-Adapter installs; tests/fixtures/anima_attn2_replace_ext): the context still
    applies, and at scale 0 the image is that of the other patches alone."""
    name = ctx["name"]
    sag_args = [True, 0.5, 2.0, 1.0] if fork == "forge" else [True, 0.5, 2.0]
    sag = {_script_key("selfattentionguidance"): {"args": sag_args}}
    replace = {_script_key("attn2 replace"): {"args": [True]}}
    for others in (replace, {**sag, **replace}):
        alone = client.post("/sdapi/v1/txt2img", _body("a photo of a dog", others)).json()
        zero = client.post("/sdapi/v1/txt2img", _body("a photo of a dog", others, panel(name, 0.0))).json()
        applied = client.post("/sdapi/v1/txt2img", _body("a photo of a dog", others, panel(name))).json()
        with_ctx, without = client.Result(applied), client.Result(alone)
        assert (client.Result(zero).pixels() == without.pixels()).all(), others  # (the fixture's infotext counts)
        assert mean_diff(with_ctx.pixels(), without.pixels()) > 1.0, others
        assert "Anima 1" in with_ctx.infotext and "Anima warnings" not in with_ctx.infotext
        if replace.keys() <= others.keys():
            calls = re.search(r"Attn2 replace calls: (\d+)", with_ctx.infotext)
            assert calls and int(calls.group(1)) > 0, "the attn2 replace patch ran"
    assert client.status()["hooks_installed"] == 0


def _body(prompt: str, scripts: dict, anima: list | None = None) -> dict:
    body = {"prompt": prompt, "steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler a",
            "cfg_scale": 7, "alwayson_scripts": dict(scripts)}
    if anima is not None:
        body["alwayson_scripts"]["anima"] = {"args": anima}
    return body


def test_settings_give_the_defaults(ctx):
    """Settings → Anima on the fork: the default scale set over the API is that of ``<anima:name>``. (The host's
    GET /sdapi/v1/options lists only the options known when its API module loaded, not extensions' ones.)"""
    try:
        assert client.post("/sdapi/v1/options", {"anima_default_scale": 0.5}).ok
        assert "scale: 0.5, mode: positive" in txt2img(f"a photo of a dog <anima:{ctx['name']}>").infotext
    finally:
        client.post("/sdapi/v1/options", {"anima_default_scale": 1.0})
    assert "scale: 1, mode: positive" in txt2img(f"a photo of a dog <anima:{ctx['name']}>").infotext
