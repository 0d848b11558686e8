"""Generation with reference contexts on the real A1111 v1.10.1 host, over HTTP."""

from __future__ import annotations

import os
import time

import pytest

from lib_anima import infotext
from tests.integration import webui_client as client
from tests.integration.webui_client import mean_diff, txt2img

PANEL_OFF = [False, "None", 1.0, "positive", 0.0, 1.0, ""]


def panel(name: str, scale: float = 1.0, mode: str = "positive", start: float = 0.0, end: float = 1.0, weights: str = ""):
    return [True, name, scale, mode, start, end, weights]


def test_extension_loaded_without_errors(webui):
    scripts = client.get("/sdapi/v1/scripts").json()
    assert "anima" in scripts["txt2img"] and "anima" in scripts["img2img"]
    log_path = os.path.join(client.HOST_DIR, ".host", "webui.log")
    if not os.path.isfile(log_path):
        pytest.skip(f"no host log at {log_path}")
    text = open(log_path, encoding="utf8", errors="replace").read()
    # loading ends with the host's "Startup time" line; later lines belong to tests that break things on purpose
    lines = text.split("Startup time:", 1)[0].splitlines()
    assert "Startup time:" in text, "the host log has no end of start-up"
    bad = [
        line for i, line in enumerate(lines)
        if ("anima" in line.lower() or "lib_anima" in line)
        and ("Error" in line or "Traceback" in line or "Failed" in line)
        and "Failed reading extension data from Git repository" not in line  # a checkout without a remote
    ]
    assert not bad, bad


def test_context_changes_image_deterministically(ctx):
    base = txt2img()
    first = txt2img(f"a photo of a dog <anima:{ctx['name']}:1>")
    second = txt2img(f"a photo of a dog <anima:{ctx['name']}:1>")
    assert first.png_b64 == second.png_b64, "same seed and context must give the same image"
    assert mean_diff(first.pixels(), base.pixels()) > 1.0


def test_more_scale_changes_more(ctx):
    base = txt2img().pixels()
    diffs = [mean_diff(txt2img(f"a photo of a dog <anima:{ctx['name']}:{s}>").pixels(), base) for s in (0.25, 1.0, 3.0)]
    assert diffs[0] < diffs[1] < diffs[2], diffs


def test_scale_zero_and_disabled_are_identical_to_plain(ctx):
    plain = txt2img()
    disabled = txt2img(anima_args=[False, ctx["name"], 1.0, "positive", 0.0, 1.0, ""])
    zero = txt2img(anima_args=panel(ctx["name"], 0.0))
    assert disabled.png_b64 == plain.png_b64
    assert zero.png_b64 == plain.png_b64
    prompt_zero = txt2img(f"a photo of a dog <anima:{ctx['name']}:0>")
    assert (prompt_zero.pixels() == plain.pixels()).all()


def test_identical_to_a_webui_without_the_extension(webui):
    """tests/run.sh renders baseline images with the extension not installed; they must match byte for byte."""
    baseline_dir = os.environ.get("ANIMA_BASELINE_DIR")
    if not baseline_dir or not os.path.isdir(baseline_dir):
        pytest.skip("no baseline images from an extension-less run (tests/run.sh makes them)")
    from tests.integration.baseline import CASES, load

    for name, body in CASES.items():
        r = client.post("/sdapi/v1/txt2img", body)
        assert r.status_code == 200, r.text
        assert r.json()["images"] == load(baseline_dir, name), f"case {name} differs from the extension-less host"


def test_infotext_has_entry_and_parses_back(ctx):
    result = txt2img(anima_args=panel(ctx["name"], 0.8, "negative", 0.1, 0.9, "fine"))
    assert f'Anima 1: "name: {ctx["name"]}, hash: {ctx["hash"]}, scale: 0.8, mode: negative' in result.infotext
    params = client.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + result.png_b64[0]}).json()
    entries = infotext.panel_entries(params["parameters"])
    assert entries == [{"name": ctx["name"], "hash": ctx["hash"], "scale": "0.8", "mode": "negative",
                        "start": "0.1", "end": "0.9", "weights": "fine"}]
    prompt_result = txt2img(f"a dog <anima:{ctx['name']}:0.5>")
    assert "source: prompt" in prompt_result.infotext


def test_positive_and_negative_modes_differ(ctx):
    base = txt2img().pixels()
    positive = txt2img(anima_args=panel(ctx["name"], 1.0, "positive")).pixels()
    negative = txt2img(anima_args=panel(ctx["name"], 1.0, "negative")).pixels()
    assert mean_diff(positive, base) > 1.0 and mean_diff(negative, base) > 1.0
    assert mean_diff(positive, negative) > 1.0


@pytest.mark.forks
def test_panel_prompt_positional_and_dict_args_agree(ctx):
    name = ctx["name"]
    by_prompt = txt2img(f"a photo of a dog <anima:{name}:0.7:mode=negative>").pixels()
    by_panel = txt2img(anima_args=panel(name, 0.7, "negative")).pixels()
    by_dict = txt2img(anima_args=[{"units": [{"name": name, "scale": 0.7, "mode": "negative"}]}]).pixels()
    assert (by_panel == by_dict).all()
    assert (by_prompt == by_panel).all()


@pytest.mark.forks
def test_unknown_name_warns_and_generates(webui):
    result = txt2img("a photo of a dog <anima:no_such_context:1>")
    assert "Anima warnings" in result.infotext and "no_such_context" in result.infotext
    assert (result.pixels() == txt2img().pixels()).all()


def test_corrupt_file_is_reported_and_server_keeps_serving(ctx):
    folder = client.get("/anima/v1/contexts").json()["directory"]
    bad_path = os.path.join(folder, "itest_corrupt.safetensors")
    with open(bad_path, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}garbage")
    try:
        listing = client.post("/anima/v1/refresh").json()
        assert "itest_corrupt" in listing["errors"]
        assert "itest_corrupt.safetensors" in listing["errors"]["itest_corrupt"]
        assert "not a safetensors file" in listing["errors"]["itest_corrupt"]
        assert ctx["name"] in [c["name"] for c in listing["contexts"]]
        result = txt2img("a photo of a dog <anima:itest_corrupt:1>")
        assert "itest_corrupt" in result.infotext and "Anima warnings" in result.infotext
        assert mean_diff(txt2img(f"a dog <anima:{ctx['name']}:1>").pixels(), txt2img("a dog").pixels()) > 1.0
    finally:
        os.remove(bad_path)
        client.post("/anima/v1/refresh")


def test_hooks_present_during_sampling_and_gone_after(ctx):
    seen = client.hooks_seen_during(lambda: txt2img(f"a photo of a dog <anima:{ctx['name']}:1>", steps=60))
    assert max(seen) == 17, f"16 attn2 hooks + 1 UNet pre-hook expected while sampling, saw {sorted(set(seen))}"
    assert client.status()["hooks_installed"] == 0


def test_interrupt_leaves_no_hooks(ctx):
    name = ctx["name"]
    plain_before, ctx_before = txt2img(), txt2img(f"a photo of a dog <anima:{name}:1>")  # before any interrupt
    worker, result = client.generation_in_flight(f"x <anima:{name}:1>", steps=400)
    assert client.status()["hooks_installed"] == 17, "16 attn2 hooks + 1 UNet pre-hook expected while sampling"
    started = time.time()
    client.post("/sdapi/v1/interrupt")
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert time.time() - started < 8, "the interrupt did not stop the 400-step run early"
    assert result["r"].status_code == 200
    assert client.status()["hooks_installed"] == 0
    assert txt2img().png_b64 == plain_before.png_b64, "a plain image after the interrupt differs from one before"
    assert txt2img(f"a photo of a dog <anima:{name}:1>").png_b64 == ctx_before.png_b64


def test_batching_layouts_give_the_same_image(ctx):
    """Cond/uncond in one UNet call or in separate calls: the context must land on the same rows."""
    name = ctx["name"]
    for mode in ("positive", "negative"):
        together = txt2img(anima_args=panel(name, 1.0, mode), batch_size=2,
                           override_settings={"batch_cond_uncond": True})
        apart = txt2img(anima_args=panel(name, 1.0, mode), batch_size=2,
                        override_settings={"batch_cond_uncond": False})
        plain_together = txt2img(batch_size=2, override_settings={"batch_cond_uncond": True})
        plain_apart = txt2img(batch_size=2, override_settings={"batch_cond_uncond": False})
        noise = max(mean_diff(plain_together.pixels(i), plain_apart.pixels(i)) for i in range(2))
        for i in range(2):
            assert mean_diff(together.pixels(i), apart.pixels(i)) <= noise + 0.5, (mode, i)
            assert mean_diff(together.pixels(i), plain_together.pixels(i)) > 1.0


def test_and_prompts_hires_skip_uncond_and_img2img(ctx):
    """Each layout changes the image, and the term lands on the right rows of every UNet call."""
    name = ctx["name"]
    plain_and = txt2img("a dog AND a cat")
    with_and = txt2img(f"a dog AND a cat <anima:{name}:1>")
    assert mean_diff(with_and.pixels(), plain_and.pixels()) > 1.0
    client.assert_rows({3: ([0, 1], [2])})  # two sub-prompts, then the negative
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3)
    plain_hr = txt2img(**hires)
    ctx_hr = txt2img(f"a photo of a dog <anima:{name}:1>", **hires)
    assert plain_hr.pixels().shape == (96, 96, 3)
    assert mean_diff(ctx_hr.pixels(), plain_hr.pixels()) > 1.0
    assert len(client.assert_rows({2: ([0], [1])})) == 4 + 3  # one UNet call per step of both passes
    plain_ngms = txt2img(s_min_uncond=100.0, steps=6)
    ngms = txt2img(f"a photo of a dog <anima:{name}:1>", s_min_uncond=100.0, steps=6)  # uncond skipped on odd steps
    assert mean_diff(ngms.pixels(), plain_ngms.pixels()) > 1.0
    calls = client.assert_rows({2: ([0], [1]), 1: ([0], [])})
    assert {c["batch"] for c in calls} == {1, 2}, "some steps skip the uncond row"
    init = plain_and.png_b64[0]
    plain_i2i = client.img2img(init, "a cat")
    ctx_i2i = client.img2img(init, f"a cat <anima:{name}:1>")
    assert mean_diff(ctx_i2i.pixels(), plain_i2i.pixels()) > 1.0
    client.assert_rows({2: ([0], [1])})
    assert client.status()["hooks_installed"] == 0


@pytest.mark.parametrize("checkpoint, arch, sites, dim", [("tiny_xl", "sdxl", 70, 1024), ("tiny_v2", "sd2", 16, 1024)])
def test_other_architectures_and_mismatch(ctx, checkpoint, arch, sites, dim):
    models = [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    if checkpoint not in models:
        pytest.skip(f"{checkpoint} not installed in the host")
    client.set_checkpoint(checkpoint)
    try:
        assert client.status()["model_architecture"] == arch
        other = client.create_context(f"itest_{arch}")
        assert (other["architecture"], other["sites"], other["context_dim"]) == (arch, sites, dim)
        plain = txt2img(width=64, height=64)
        changed = txt2img(f"a photo of a dog <anima:itest_{arch}:1>")
        assert mean_diff(changed.pixels(), plain.pixels()) > 1.0
        mismatched = txt2img(f"a photo of a dog <anima:{ctx['name']}:1>")  # the SD1 context
        assert (mismatched.pixels() == plain.pixels()).all()
        assert "Anima warnings" in mismatched.infotext and "another model architecture" in mismatched.infotext
        assert client.status()["hooks_installed"] == 0
    finally:
        client.set_checkpoint("tiny")
