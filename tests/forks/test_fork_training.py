"""Training on a real Forge / reForge over HTTP (the rest of the trainer's behaviour: the tests of
tests/integration/test_training.py marked `forks`, run against the fork too)."""

from __future__ import annotations

from tests.forks.conftest import SITES
from tests.integration import webui_client as client
from tests.integration.webui_client import mean_diff, txt2img


def test_train_from_one_image_leaves_the_fork_as_it_was(fork, webui):
    before = txt2img()
    reference = txt2img("a red fox", seed=3).png_b64[0]
    r = client.post("/anima/v1/train", {"name": "itest_fork_trained", "images": [reference], "prompt": "a red fox",
                                        "steps": 6, "resolution": 64, "overwrite": True, "seed": 5,
                                        "learning_rate": "0.02:2, 0.01", "init_text": "a fox"})
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["steps"] == 6 and not summary["interrupted"] and summary["final_loss"] > 0
    info = client.get("/anima/v1/contexts/itest_fork_trained").json()
    assert (info["architecture"], info["sites"], info["n_tokens"], info["context_dim"]) == ("sd1", SITES, 4, 768)
    record = info["training"]
    assert record["steps"] == 6 and record["prompt"] == "a red fox" and record["base_model"] == "tiny"
    after = txt2img()
    assert after.png_b64 == before.png_b64, "training must leave the fork's model exactly as it was"
    assert mean_diff(txt2img("a photo of a dog <anima:itest_fork_trained:2>").pixels(), after.pixels()) > 0.5
    assert client.status()["hooks_installed"] == 0
    assert "subject_filewords.txt" in client.get("/anima/v1/train/templates").json()
