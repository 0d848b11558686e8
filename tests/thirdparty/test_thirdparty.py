"""A context next to the extensions people run beside it, on the real A1111 host, over HTTP.

For each payload verified by ../shared/host/thirdparty (Tiled Diffusion, Tiled VAE, ControlNet reference,
Regional Prompter, Dynamic Thresholding, SAG, NegPiP, ADetailer, Kohya Hires.fix / Deep Shrink):
- the extension ran (its infotext marker), and a disabled panel or scale 0 gives the very same bytes as the
  request without the context;
- positive and negative mode each change the image, the context reaches the UNet (its infotext entry), no
  `Anima warnings`, and every row of every UNet call was placed (``--anima-debug-rows``);
- no hook is left afterwards.
Per extension, what its extra passes get is checked too (tiles, SAG's degraded pass, ControlNet's reference pass).
"""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest

from tests.integration import webui_client as client
from tests.integration.webui_client import Result, mean_diff

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_HOST = os.environ.get("ANIMA_SHARED_HOST", os.path.join(ROOT, "..", "shared", "host"))


def _smoke():
    path = os.path.join(SHARED_HOST, "thirdparty", "smoke_thirdparty.py")
    spec = importlib.util.spec_from_file_location("smoke_thirdparty", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _smoke()
CHECKS = {f"{c[0]}: {c[1].split(',')[0]}" if c[0] != "multidiffusion" else f"{c[0]}: {c[1][:40]}": c for c in smoke.CHECKS}


def generate(body: dict) -> Result:
    r = client.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text[:2000]
    return Result(r.json())


def settled(body: dict) -> Result:
    """The request's result once the extension's own state has settled: Kohya Hires.fix registers one more
    callback per enabled call until a call without it, so its first enabled calls differ from the later ones
    (../shared/host/thirdparty/README.md); every other extension gives the same bytes the first time."""
    previous = generate(body)
    for _ in range(3):
        current = generate(body)
        if current.png_b64[0] == previous.png_b64[0]:
            return current
        previous = current
    raise AssertionError("the same request gives a different image each time")


def with_anima(body: dict, args: list) -> dict:
    body = copy.deepcopy(body)
    body.setdefault("alwayson_scripts", {})["anima"] = {"args": args}
    return body


def panel(name: str, scale: float = 1.0, mode: str = "positive") -> list:
    return [True, name, scale, mode, 0.0, 1.0, ""]


def last_rows() -> dict:
    r = client.get("/anima/v1/debug/rows")
    assert r.status_code == 200, "the host must run with --anima-debug-rows (tests/run.sh starts it so)"
    return r.json()


def request_for(check, installed: set[str]) -> dict:
    extension, _, titles, payload, markers, _ = check
    if extension not in installed:
        pytest.skip(f"THIRD-PARTY SOURCE MISSING: {extension} is not installed (see ../shared/host/thirdparty/README.md)")
    scripts = client.get("/sdapi/v1/scripts").json()["txt2img"]
    assert all(t in scripts for t in titles), f"{titles} not loaded: {scripts}"
    return smoke.with_image(payload, smoke.png_b64())


@pytest.fixture(scope="module", params=list(CHECKS), ids=list(CHECKS))
def case(request, webui, ctx, installed) -> dict:
    """The plain request's result and the same request with the context in each mode (one set per check)."""
    check = CHECKS[request.param]
    body = request_for(check, installed)
    plain = settled(body)
    results = {"check": check, "body": body, "plain": plain}
    for mode in ("positive", "negative"):
        results[mode] = generate(with_anima(body, panel(ctx["name"], 1.0, mode)))
        results[f"{mode}_rows"] = last_rows()
    return results


def test_the_extension_ran(case):
    markers = case["check"][4]
    assert all(m in case["plain"].infotext for m in markers), case["plain"].infotext


def test_disabled_and_scale_zero_are_the_same_bytes(case, ctx):
    plain = case["plain"].png_b64[0]
    assert generate(with_anima(case["body"], [False, ctx["name"], 1.0, "positive", 0.0, 1.0, ""])).png_b64[0] == plain
    assert generate(with_anima(case["body"], panel(ctx["name"], 0.0))).png_b64[0] == plain


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_context_applies_and_every_row_is_placed(case, ctx, mode):
    result, rows = case[mode], case[f"{mode}_rows"]
    assert "Anima warnings" not in result.infotext, result.infotext
    assert f"name: {ctx['name']}" in result.infotext and f"mode: {mode}" in result.infotext
    assert rows["reached"] == {ctx["name"]: True}
    assert rows["calls"], "no UNet call was seen"
    assert all(not call["unplaced"] for call in rows["calls"]), [c for c in rows["calls"] if c["unplaced"]][:3]
    kinds = {"cond": any(c["cond"] for c in rows["calls"]), "uncond": any(c["uncond"] for c in rows["calls"])}
    assert kinds == {"cond": True, "uncond": True}
    assert mean_diff(result.pixels(), case["plain"].pixels()) > 0.5
    assert client.status()["hooks_installed"] == 0


def regions(pixels: np.ndarray, n: int = 3) -> list[np.ndarray]:
    h, w = pixels.shape[:2]
    return [pixels[i * h // n:(i + 1) * h // n, j * w // n:(j + 1) * w // n] for i in range(n) for j in range(n)]


@pytest.mark.parametrize("name", [n for n in CHECKS if n.startswith("multidiffusion: Tiled Diffusion")])
def test_tiled_diffusion_every_tile_gets_the_context(name, webui, ctx, installed):
    """9 tiles in tile batches: every tile region differs from the same tiled run without a context, by amounts
    of the same order (the old row counting reached the first tile batch only)."""
    body = request_for(CHECKS[name], installed)
    plain = generate(body).pixels()
    with_ctx = generate(with_anima(body, panel(ctx["name"]))).pixels()
    diffs = [mean_diff(a, b) for a, b in zip(regions(with_ctx), regions(plain), strict=True)]
    assert min(diffs) > 0.5, diffs
    assert max(diffs) / min(diffs) < 10, diffs
    calls = last_rows()["calls"]
    steps = {c["step"] for c in calls}
    assert len(calls) >= 3 * len(steps), "several tile batches per step"
    assert all(c["cond"] and c["uncond"] for c in calls)


def test_sag_degraded_pass_is_an_uncond_row(webui, ctx, installed):
    """SAG's extra batch-1 pass on the unconditional text is placed as an uncond row (negative mode reaches it)."""
    name = next(n for n in CHECKS if n.startswith("sag"))
    body = request_for(CHECKS[name], installed)
    generate(with_anima(body, panel(ctx["name"], 1.0, "negative")))
    calls = last_rows()["calls"]
    degraded = [c for c in calls if c["batch"] == 1]
    assert degraded, calls[:4]
    assert all(c["uncond"] == [0] and not c["cond"] for c in degraded)


def test_controlnet_reference_pass_gets_its_own_rows(webui, ctx, installed):
    """ControlNet marks each conditioning with a ±1024 token and its reference pass calls the UNet's blocks
    directly (no UNet pre-hook): every cross-attention call is placed from its own (stripped) conditioning."""
    name = next(n for n in CHECKS if n.startswith("controlnet: reference_only"))
    body = request_for(CHECKS[name], installed)
    generate(with_anima(body, panel(ctx["name"])))
    calls = last_rows()["calls"]
    assert calls and all(c["cond"] == [0] and c["uncond"] == [1] for c in calls), calls[:4]
