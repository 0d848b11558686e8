"""Training from reference images in the WebUI: encode once with the host's model, train with the core loop.

Holds the host's queue lock (generation and training never interleave), reports through ``shared.state``
(progress bar, Interrupt button) and saves the context (and the reference as its preview) atomically.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import time
from dataclasses import dataclass

import torch
from modules import call_queue, devices, prompt_parser, sd_samplers_common, shared
from PIL import Image, ImageOps, UnidentifiedImageError

from lib_anima.errors import AnimaError, ArgumentError
from lib_anima.train import DiffusionSchedule, TrainConfig, TrainExample, train_context
from lib_anima.webui import manage, store

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGES = 64


@dataclass
class TrainRequest:
    name: str
    images: list[Image.Image]
    prompt: str = ""
    steps: int = 300
    learning_rate: float = 5e-3
    n_tokens: int = 4
    resolution: int = 0  # 0: the model's native size (512; SDXL 1024)
    flip: bool = True
    seed: int = 0
    overwrite: bool = False


def decode_image(data: str) -> Image.Image:
    """A base64 (optionally data-URL) image, checked for size; a clear error for anything else."""
    if "," in data and data.strip().startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ArgumentError("an image is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ArgumentError(f"an image is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise ArgumentError("an image could not be decoded (PNG, JPEG or WebP expected)") from None


def _square(image: Image.Image, size: int) -> torch.Tensor:
    """Centre crop to a square, resize, as a [3, size, size] tensor in [0, 1]."""
    image = ImageOps.fit(image, (size, size), Image.LANCZOS)
    return torch.from_numpy(__import__("numpy").asarray(image, dtype="float32") / 255.0).permute(2, 0, 1)


def _check_model() -> None:
    unet = store.current_unet()
    if unet is None:
        raise AnimaError("no model is loaded")
    if int(getattr(unet, "in_channels", 4)) != 4:
        raise AnimaError("this checkpoint is an inpainting/edit model (UNet input is not 4 channels); "
                         "training a context needs a plain SD1.x, SD2.x or SDXL checkpoint")


def _examples(req: TrainRequest, size: int) -> list[TrainExample]:
    model = shared.sd_model
    pixels = [_square(img, size) for img in req.images]
    if req.flip:
        pixels += [torch.flip(p, dims=[2]) for p in pixels]
    with torch.no_grad(), devices.autocast():
        cond = model.get_learned_conditioning(prompt_parser.SdConditioning([req.prompt], width=size, height=size))
        batch = torch.stack(pixels).to(devices.device, devices.dtype_vae)
        latents = sd_samplers_common.images_tensor_to_samples(batch, None, model).float().cpu()
    if isinstance(cond, dict):
        single = {k: v[0].detach().float().cpu() for k, v in cond.items()}
    else:
        single = cond[0].detach().float().cpu()
    return [TrainExample(latent=lat, cond=single) for lat in latents]


def _unet_apply(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    model = shared.sd_model
    dtype = devices.dtype_unet
    if isinstance(cond, dict):
        cond = {k: v.to(devices.device, dtype) for k, v in cond.items()}
    else:
        cond = cond.to(devices.device, dtype)
    return model.apply_model(x.to(devices.device, dtype), t.to(devices.device), cond).float()


def train(req: TrainRequest) -> dict:
    """Train and save; returns a summary. Refuses to replace an existing context unless overwrite."""
    path = store.library().path(req.name)
    if os.path.exists(path) and not req.overwrite:
        raise ArgumentError(f"a context named {req.name!r} already exists; choose another name or allow overwrite")
    if not 1 <= len(req.images) <= MAX_IMAGES:
        raise ArgumentError(f"give 1 to {MAX_IMAGES} reference images, got {len(req.images)}")
    with call_queue.queue_lock:
        shared.state.begin(job="anima-train")
        started = time.perf_counter()
        try:
            _check_model()
            size = req.resolution or (1024 if store.model_arch() == "sdxl" else 512)
            examples = _examples(req, size)
            model = shared.sd_model
            schedule = DiffusionSchedule(model.alphas_cumprod.detach().float().cpu(), model.parameterization)
            config = TrainConfig(steps=req.steps, lr=req.learning_rate, n_tokens=req.n_tokens, seed=req.seed,
                                 record={"prompt": req.prompt, "references": len(req.images), "resolution": size,
                                         **manage.model_record()})
            shared.state.job_count = 1
            shared.state.sampling_steps = req.steps

            def on_step(done: int, loss: float, lr: float) -> None:
                shared.state.sampling_step = done
                shared.state.textinfo = f"Anima training {req.name}: step {done}/{req.steps}, loss {loss:.5f}"

            with torch.enable_grad():
                result = train_context(_unet_apply, store.current_unet(), examples, config, schedule,
                                       arch=store.model_arch(), on_step=on_step,
                                       should_stop=lambda: bool(shared.state.interrupted))
            context = result.context
            manage.save_new(context, req.name, overwrite=True)
            req.images[0].save(os.path.splitext(path)[0] + ".png")
            seconds = time.perf_counter() - started
            return {"name": req.name, "hash": context.shorthash, "steps": result.state.step,
                    "interrupted": result.interrupted, "seconds": round(seconds, 2),
                    "final_loss": result.losses[-1] if result.losses else None}
        finally:
            shared.state.end()
