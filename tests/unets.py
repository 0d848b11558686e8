"""Small random-weight UNets with real cross-attention modules, for core tests and benchmarks.

Two module families:

* **diffusers** (a registry package, pinned in requirements-dev.txt): ``UNet2DConditionModel`` in an SD1-like
  layout (16 ``attn2`` sites) and an SDXL-like layout (70 sites, transformer depth [1, 2, 10]). Always
  available; :func:`sd1_unet` / :func:`sdxl_unet` return these, called like ldm's UNet (``x, timesteps,
  context, y``) through :class:`LdmSignature`.
* **the host's own ldm / sgm modules** (A1111 v1.10.1's ``repositories/``), for tests about the host's module
  layout (site names, presets, its CrossAttention, third-party call patterns). They are read from
  ``$WEBUI_SOURCES/stable-diffusion-webui/repositories`` (default ``$HOME/webui-sources``), never from this
  repository; :func:`require_host_modules` skips a test visibly when they are missing.
"""

from __future__ import annotations

import os
import sys

import torch

LDM = "repositories/stable-diffusion-stability-ai"
SGM = "repositories/generative-models"
SDXL_TIME_IDS = 6  # SDXL's size/crop conditioning: 6 numbers per row


# ---- the host's source ---------------------------------------------------------------------------------------


def webui_sources() -> str:
    return os.environ.get("WEBUI_SOURCES") or os.path.join(os.path.expanduser("~"), "webui-sources")


def host_root() -> str | None:
    """The A1111 v1.10.1 folder whose ``repositories/`` holds ldm and sgm, or None when there is none."""
    candidates = [os.path.join(webui_sources(), "stable-diffusion-webui"), os.environ.get("WEBUI_HOST_DIR", "")]
    for root in candidates:
        if root and os.path.isdir(os.path.join(root, LDM, "ldm")) and os.path.isdir(os.path.join(root, SGM, "sgm")):
            return root
    return None


MISSING_HOST = (
    "HOST SOURCE MISSING: no A1111 v1.10.1 ldm/sgm modules at "
    "$WEBUI_SOURCES/stable-diffusion-webui/repositories (WEBUI_SOURCES={sources}); "
    "point WEBUI_SOURCES at the folder that holds your stable-diffusion-webui (../shared/host/README.md, 'The host source')"
)


def require_host_modules() -> str:
    """Put the host's ldm and sgm packages on ``sys.path``; skip the calling test (visibly) when they are missing."""
    root = host_root()
    if root is None:
        import pytest

        pytest.skip(MISSING_HOST.format(sources=webui_sources()))
    import_host_modules(root)
    return root


def import_host_modules(root: str | None = None) -> None:
    """Make ``import ldm`` / ``import sgm`` find the host's packages (raises when the source is missing)."""
    root = root or host_root()
    if root is None:
        raise RuntimeError(MISSING_HOST.format(sources=webui_sources()))
    for sub in (LDM, SGM):
        path = os.path.join(root, sub)
        if path not in sys.path:
            sys.path.insert(0, path)


# ---- host (ldm / sgm) UNets ----------------------------------------------------------------------------------


TINY_LDM_SD1 = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=4, use_spatial_transformer=True,
    transformer_depth=1, use_checkpoint=False, legacy=False,
)


def ldm_sd1_unet(context_dim: int = 64, seed: int = 0) -> torch.nn.Module:
    """SD1.x layout (16 attn2 sites), narrow; the host's ldm UNetModel. Skips the test when the source is missing."""
    require_host_modules()
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    return randomize(UNetModel(context_dim=context_dim, **TINY_LDM_SD1)).eval()


def sgm_sdxl_unet(context_dim: int = 64, adm: int = 32, seed: int = 0) -> torch.nn.Module:
    """SDXL layout (70 attn2 sites, transformer depth [1, 2, 10]), narrow; the host's sgm UNetModel."""
    require_host_modules()
    from sgm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        adm_in_channels=adm, num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4,
        model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
        num_head_channels=16, use_spatial_transformer=True, use_linear_in_transformer=True,
        transformer_depth=[1, 2, 10], context_dim=context_dim, spatial_transformer_attn_type="softmax",
        legacy=False,
    )
    return randomize(unet).eval()


# ---- diffusers UNets -----------------------------------------------------------------------------------------


class LdmSignature(torch.nn.Module):
    """A diffusers ``UNet2DConditionModel`` called the way the host calls ldm's UNet: ``(x, timesteps, context, y)``.

    ``y`` (SDXL's vector conditioning) is split into diffusers' ``text_embeds`` and its 6 ``time_ids``.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.diffusion = unet

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        added = None
        if y is not None:
            added = {"text_embeds": y[:, :-SDXL_TIME_IDS], "time_ids": y[:, -SDXL_TIME_IDS:]}
        return self.diffusion(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample


def diffusers_sd1_unet(context_dim: int = 64, seed: int = 0) -> torch.nn.Module:
    """SD1.x-like layout: 3 cross-attention down blocks, a cross-attention middle, 3 up blocks → 16 attn2 sites."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim, attention_head_dim=4, norm_num_groups=32,
    )
    return LdmSignature(randomize(unet)).eval()


def diffusers_sdxl_unet(context_dim: int = 64, adm: int = 32, seed: int = 0) -> torch.nn.Module:
    """SDXL-like layout: transformer depth [1, 2, 10] on three levels, linear projections, text_time embedding →
    70 attn2 sites. ``y`` has `adm` numbers per row: ``adm - 6`` pooled text, 6 time ids."""
    from diffusers import UNet2DConditionModel

    time_embed_dim = 4
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=context_dim, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=adm - SDXL_TIME_IDS + SDXL_TIME_IDS * time_embed_dim,
        norm_num_groups=32,
    )
    return LdmSignature(randomize(unet)).eval()


sd1_unet = diffusers_sd1_unet
sdxl_unet = diffusers_sdxl_unet


def randomize(unet: torch.nn.Module) -> torch.nn.Module:
    # SD zero-initialises output projections; random weights let every path carry signal, as in the host's tiny models
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                torch.nn.init.normal_(p, std=0.02)
    return unet
