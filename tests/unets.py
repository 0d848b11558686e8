"""Small random-weight UNets with the real SD1.x / SD2.x / SDXL block layouts, built from the host's own
ldm and sgm modules (the A1111 v1.10.1 `repositories/`), for core tests that need real attention modules.

The repositories are found in $WEBUI_HOST_DIR, else unpacked once from ../shared/host's tarball into
tests/.cache (only the ldm and sgm packages).
"""

from __future__ import annotations

import os
import sys
import tarfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TARBALL = os.path.join(REPO, "..", "shared", "host", "webui-host-v1.10.1.tar.gz")
LDM = "repositories/stable-diffusion-stability-ai"
SGM = "repositories/generative-models"


def _host_root() -> str:
    host = os.environ.get("WEBUI_HOST_DIR")
    if host and os.path.isdir(os.path.join(host, LDM, "ldm")):
        return host
    cache = os.path.join(HERE, ".cache", "host")
    if not os.path.isdir(os.path.join(cache, LDM, "ldm")):
        extract_host_sources(cache, (f"{LDM}/ldm/", f"{SGM}/sgm/"))
    return cache


def extract_host_sources(dest: str, paths: tuple[str, ...]) -> None:
    """Unpack the host tarball's files under `paths` (relative to the A1111 root; folders end in /) into `dest`."""
    if not os.path.isfile(TARBALL):
        raise RuntimeError("no A1111 host sources: set WEBUI_HOST_DIR or provide ../shared/host")
    wanted = tuple("/" + p for p in paths)
    with tarfile.open(TARBALL) as tar:
        members = []
        for m in tar.getmembers():
            if any(w in m.name + ("/" if m.isdir() else "") for w in wanted):
                m.name = m.name.split("/", 1)[1]  # drop the tarball's top folder
                members.append(m)
        tar.extractall(dest, members=members, filter="data")


def _import_paths() -> None:
    root = _host_root()
    for sub in (LDM, SGM):
        path = os.path.join(root, sub)
        if path not in sys.path:
            sys.path.insert(0, path)


def sd1_unet(context_dim: int = 64, seed: int = 0) -> torch.nn.Module:
    """SD1.x layout (16 attn2 sites), narrow; ldm UNetModel."""
    _import_paths()
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=4, use_spatial_transformer=True,
        transformer_depth=1, context_dim=context_dim, use_checkpoint=False, legacy=False,
    )
    return _randomize(unet).eval()


def sdxl_unet(context_dim: int = 64, adm: int = 32, seed: int = 0) -> torch.nn.Module:
    """SDXL layout (70 attn2 sites, transformer depth [1, 2, 10]), narrow; sgm UNetModel."""
    _import_paths()
    from sgm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        adm_in_channels=adm, num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4,
        model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
        num_head_channels=16, use_spatial_transformer=True, use_linear_in_transformer=True,
        transformer_depth=[1, 2, 10], context_dim=context_dim, spatial_transformer_attn_type="softmax",
        legacy=False,
    )
    return _randomize(unet).eval()


def _randomize(unet: torch.nn.Module) -> torch.nn.Module:
    # SD zero-initialises output projections; random weights let every path carry signal, as in the host's tiny models
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                torch.nn.init.normal_(p, std=0.02)
    return unet
