"""Which WebUI this is, decided once at start-up from what is importable, and the few things that differ.

* ``a1111``: AUTOMATIC1111's WebUI. Contexts through torch hooks (:class:`lib_anima.inject.InjectionSession`).
* ``forge``: lllyasviel's Forge (``backend/``: its own UNet, patcher, memory manager; Gradio 4).
* ``reforge``: the ``ldm_patched`` forks: Panchovix's reForge and the older Forge (2024).

Both forks sample the ComfyUI way (cond and uncond as chunks of one UNet call, attention replaced by patches), so
there contexts go through the fork's own patch API (:class:`lib_anima.patching.PatchSession`) on a clone of
``forge_objects.unet``, made in ``process_before_every_sampling``. Everything else (the arithmetic, the rows,
the files) is shared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator

import torch
from modules import shared

from lib_anima.inject import WeightReader

A1111, FORGE, REFORGE = "a1111", "forge", "reforge"


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that does not exist
        return False


def _detect() -> str:
    if not _importable("modules_forge"):  # both forks have it; A1111 does not (so nothing else is imported there)
        return A1111
    if _importable("backend.patcher.unet") and _importable("backend.operations"):
        return FORGE
    if _importable("ldm_patched.modules.model_patcher"):
        return REFORGE
    return A1111


KIND = _detect()


def is_fork() -> bool:
    return KIND != A1111


def unet_patcher(model=None):
    """The fork's UNet patcher (``forge_objects.unet``), or None."""
    model = shared.sd_model if model is None else model
    return getattr(getattr(model, "forge_objects", None), "unet", None)


def current_unet():
    """The diffusion model (the module holding the ``attn2`` sites) of the loaded checkpoint, or None."""
    model = shared.sd_model
    if is_fork():
        return getattr(getattr(unet_patcher(model), "model", None), "diffusion_model", None)
    return getattr(getattr(model, "model", None), "diffusion_model", None)


def weight_reader(device: torch.device, dtype: torch.dtype) -> WeightReader:
    """The fork's accessor for a linear layer's effective weight and bias, cast to `device`/`dtype`."""
    if KIND == FORGE:
        from backend.operations import get_weight_and_bias

        args = {"device": device, "dtype": dtype}
        return lambda layer: get_weight_and_bias(layer, weight_args=args, bias_args=args)
    from ldm_patched.modules.ops import cast_bias_weight

    like = torch.empty(0, device=device, dtype=dtype)  # the accessor takes where and how from an input

    def read(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hasattr(layer, "weight_function"):  # ldm_patched's ops (weight functions: LoRA, casts)
            return cast_bias_weight(layer, like)
        bias = None if layer.bias is None else layer.bias.to(device, dtype)
        return layer.weight.to(device, dtype), bias

    return read


# ---- training ------------------------------------------------------------------------------------------------


def schedule_source() -> tuple[torch.Tensor, str]:
    """The loaded model's ``alphas_cumprod`` and what it predicts (``eps`` or ``v``)."""
    model = shared.sd_model
    if KIND == FORGE:
        predictor = unet_patcher(model).model.predictor
        kind = "v" if getattr(predictor, "prediction_type", "epsilon") == "v_prediction" else "eps"
        return predictor.alphas_cumprod, kind
    return model.alphas_cumprod, model.parameterization


def encode_latents(x: torch.Tensor) -> torch.Tensor:
    """VAE latents (scaled, as the UNet sees them) of images ``[B, 3, H, W]`` in [-1, 1]: the distribution's mean,
    so the same image always gives the same latent (resume and the data fingerprint rely on it)."""
    model = shared.sd_model
    if KIND == FORGE:
        patcher = model.forge_objects.vae.patcher
        options = patcher.model_options
        saved = options.get("model_vae_regulation")
        options["model_vae_regulation"] = lambda posterior: posterior.mean  # Forge samples the posterior otherwise
        try:
            return model.encode_first_stage(x)
        finally:
            if saved is None:
                options.pop("model_vae_regulation", None)
            else:
                options["model_vae_regulation"] = saved
    dist = model.encode_first_stage(x)
    if hasattr(dist, "std"):  # ldm's DiagonalGaussianDistribution: sample() = mean + std·ε
        dist.std = 0
    return model.get_first_stage_encoding(dist)


def unet_apply(x: torch.Tensor, t: torch.Tensor, cond, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The model's raw prediction (eps or v) for noisy latents `x` at integer timesteps `t`."""
    model = shared.sd_model
    if isinstance(cond, dict):
        cond = {k: v.to(device, dtype) for k, v in cond.items()}
    else:
        cond = cond.to(device, dtype)
    if KIND == FORGE:  # no apply_model on Forge's engine: the UNet itself, as its own sampler calls it
        unet = current_unet()
        text, vector = (cond["crossattn"], cond.get("vector")) if isinstance(cond, dict) else (cond, None)
        extra = {} if vector is None else {"y": vector}
        return unet(x.to(device, dtype), t.to(device), context=text, transformer_options={}, **extra).float()
    return model.apply_model(x.to(device, dtype), t.to(device), cond).float()


def unet_dtype() -> torch.dtype:
    if KIND == FORGE:
        return unet_patcher().model.computation_dtype
    from modules import devices

    return devices.dtype_unet


@contextlib.contextmanager
def trainable_unet(unet: torch.nn.Module) -> Iterator[None]:
    """For one training run: the UNet usable with autograd, exactly as it was afterwards.

    * Weights made under ``torch.inference_mode`` (Forge loads the model that way) cannot be saved for backward:
      they are replaced by plain copies for the run, and the originals put back after.
    * Forge's transformer blocks add into their input in place (``x += n``) after a LayerNorm saved it for
      backward; the block's LayerNorms get an input copy of their own during the run (same values).
    """
    with contextlib.ExitStack() as stack:
        if KIND == FORGE:
            memory_management = sys.modules.get("backend.memory_management")
            if memory_management is not None:  # the UNet on its compute device for the whole run
                memory_management.load_model_gpu(unet_patcher())
        stack.enter_context(_plain_tensors(unet))
        if KIND == FORGE:
            stack.enter_context(_layernorm_inputs_copied(unet))
        yield


@contextlib.contextmanager
def _plain_tensors(module: torch.nn.Module) -> Iterator[None]:
    swapped: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
    try:
        with torch.inference_mode(False):
            for owner in module.modules():
                for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
                    for name, tensor in list(table.items()):
                        if tensor is not None and tensor.is_inference():
                            copy = tensor.clone()
                            table[name] = torch.nn.Parameter(copy, requires_grad=False) if is_param else copy
                            swapped.append((owner, name, is_param, tensor))
        yield
    finally:
        for owner, name, is_param, tensor in reversed(swapped):
            (owner._parameters if is_param else owner._buffers)[name] = tensor


@contextlib.contextmanager
def _layernorm_inputs_copied(module: torch.nn.Module) -> Iterator[None]:
    handles = []
    try:
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.LayerNorm) and ".transformer_blocks." in f".{name}":
                handles.append(sub.register_forward_pre_hook(lambda _m, args: (args[0].clone(), *args[1:])))
        yield
    finally:
        for handle in handles:
            handle.remove()
