"""A context together with the host's Lora, which writes merged weights into the attention layers in place.

The test writes a small random LoRA for the tiny SD1 model (every attn2 ``to_k`` / ``to_v``, rank 4, alpha = rank
so the host merges ``W + up @ down`` exactly) and a checkpoint with that LoRA merged offline; the context used
with ``<lora:…>`` must give the same image as the context on the merged checkpoint.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.integration import webui_client as client
from tests.integration.webui_client import mean_diff, txt2img

LORA = "anima_itest_lora"
MERGED = "anima_itest_merged"
RANK = 4


def attn2_kv_keys(state: dict) -> list[str]:
    return sorted(k for k in state if k.startswith("model.diffusion_model.") and ".attn2.to_" in k
                  and k.endswith(("to_k.weight", "to_v.weight")))


def write_lora_and_merged(host: str) -> None:
    ckpt_dir = os.path.join(host, "models", "Stable-diffusion")
    state = load_file(os.path.join(ckpt_dir, "tiny.safetensors"))
    g = torch.Generator().manual_seed(5)
    lora = {}
    for key in attn2_kv_keys(state):
        out_dim, in_dim = state[key].shape
        down = torch.randn(RANK, in_dim, generator=g) * in_dim**-0.5
        up = torch.randn(out_dim, RANK, generator=g) * 0.5
        name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = down, up
        lora[f"{name}.alpha"] = torch.tensor(float(RANK))  # scale alpha / rank = 1
        state[key] = state[key] + up @ down  # what the host's Lora does with multiplier 1
    os.makedirs(os.path.join(host, "models", "Lora"), exist_ok=True)
    save_file(lora, os.path.join(host, "models", "Lora", f"{LORA}.safetensors"))
    save_file(state, os.path.join(ckpt_dir, f"{MERGED}.safetensors"))
    shutil.copyfile(os.path.join(ckpt_dir, "tiny.yaml"), os.path.join(ckpt_dir, f"{MERGED}.yaml"))


@pytest.fixture(scope="module")
def lora_files(webui):
    host = client.HOST_DIR
    assert host and os.path.isdir(host), "WEBUI_HOST_DIR must name the running host's folder"
    write_lora_and_merged(host)
    for route in ("/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-checkpoints"):
        assert client.post(route).status_code == 200
    yield
    client.set_checkpoint("tiny")
    ckpt_dir = os.path.join(host, "models", "Stable-diffusion")
    for path in (os.path.join(host, "models", "Lora", f"{LORA}.safetensors"),
                 os.path.join(ckpt_dir, f"{MERGED}.safetensors"), os.path.join(ckpt_dir, f"{MERGED}.yaml")):
        os.remove(path)
    client.post("/sdapi/v1/refresh-checkpoints")


def test_context_with_lora_equals_context_on_the_merged_model(lora_files, ctx):
    panel = [True, ctx["name"], 1.0, "positive", 0.0, 1.0, ""]
    context_only = txt2img(anima_args=panel)
    lora_only = txt2img(f"a photo of a dog <lora:{LORA}:1>")
    with_lora = txt2img(f"a photo of a dog <lora:{LORA}:1>", anima_args=panel)
    assert "Anima 1:" in with_lora.infotext and "Anima warnings" not in with_lora.infotext
    assert mean_diff(with_lora.pixels(), context_only.pixels()) > 1.0  # the LoRA acts
    assert mean_diff(with_lora.pixels(), lora_only.pixels()) > 1.0  # and so does the context
    client.set_checkpoint(MERGED)
    try:
        merged = txt2img(anima_args=panel)
    finally:
        client.set_checkpoint("tiny")
    assert mean_diff(merged.pixels(), with_lora.pixels()) < 0.05, mean_diff(merged.pixels(), with_lora.pixels())
    assert client.status()["hooks_installed"] == 0
