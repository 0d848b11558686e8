"""Training from one reference image through /anima/v1/train on the real host."""

from __future__ import annotations

from tests.integration import webui_client as client
from tests.integration.webui_client import mean_diff, txt2img


def test_train_from_one_image(webui):
    before = txt2img()
    reference = txt2img("a red fox", seed=3).png_b64[0]
    r = client.post("/anima/v1/train", {"name": "itest_trained", "images": [reference], "prompt": "a red fox",
                                        "steps": 12, "resolution": 64, "overwrite": True, "seed": 5})
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["steps"] == 12 and not summary["interrupted"]
    info = client.get("/anima/v1/contexts/itest_trained").json()
    assert (info["architecture"], info["sites"], info["n_tokens"], info["context_dim"]) == ("sd1", 16, 4, 768)
    record = info["training"]
    assert record["steps"] == 12 and record["prompt"] == "a red fox" and record["references"] == 1
    assert record["base_model"] == "tiny"
    after = txt2img()
    assert after.png_b64 == before.png_b64, "training must leave the model exactly as it was"
    assert mean_diff(txt2img("a photo of a dog <anima:itest_trained:2>").pixels(), after.pixels()) > 0.5
    assert client.status()["hooks_installed"] == 0


def test_train_refuses_overwrite_and_bad_input(webui):
    reference = txt2img("a red fox", seed=3).png_b64[0]
    body = {"name": "itest_trained_once", "images": [reference], "steps": 2, "resolution": 64, "overwrite": True}
    assert client.post("/anima/v1/train", body).status_code == 200
    listing_before = client.get("/anima/v1/contexts/itest_trained_once").json()
    again = client.post("/anima/v1/train", {**body, "overwrite": False})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    assert client.get("/anima/v1/contexts/itest_trained_once").json()["hash"] == listing_before["hash"]
    assert client.post("/anima/v1/train", {**body, "images": ["not base64!"]}).status_code == 400
    assert client.post("/anima/v1/train", {**body, "name": "../escape"}).status_code == 400
