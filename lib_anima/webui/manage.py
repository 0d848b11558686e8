"""Creating, listing and removing contexts against the loaded model (shared by the tab and the API)."""

from __future__ import annotations

import os

import torch
from modules import call_queue, devices, shared

from lib_anima.context import ReferenceContext
from lib_anima.create import new_context
from lib_anima.errors import AnimaError, ContextExistsError
from lib_anima.layout import find_sites
from lib_anima.webui import store


def model_record() -> dict[str, str]:
    model = shared.sd_model
    info = getattr(model, "sd_checkpoint_info", None)
    return {"base_model": getattr(info, "name_for_extra", "") or "", "base_model_hash": getattr(model, "sd_model_hash", "") or ""}


def text_embedding(text: str) -> torch.Tensor:
    """The loaded model's text conditioning of `text` without the start token: ``[tokens, context_dim]``."""
    with torch.no_grad(), devices.autocast():
        cond = shared.sd_model.get_learned_conditioning([text])
    if isinstance(cond, dict):
        cond = cond["crossattn"]
    return cond[0, 1:].detach().float().cpu()


def save_new(context: ReferenceContext, name: str, overwrite: bool) -> str:
    """Save under `name`, refusing to replace an existing file unless `overwrite`."""
    library = store.library()
    path = library.path(name)
    if os.path.exists(path) and not overwrite:
        raise ContextExistsError(f"a context named {name!r} already exists; choose another name or allow overwrite")
    context.name = name
    context.save(path)
    library.refresh()
    return path


def create_context(name: str, n_tokens: int = 4, init_text: str = "", seed: int = 0, std: float = 0.02,
                   overwrite: bool = False) -> ReferenceContext:
    """An untrained context for the loaded model: tokens from `init_text`, else N(0, std)."""
    store.library().path(name)  # validates the name before any work
    with call_queue.queue_lock:
        unet = store.current_unet()
        if unet is None:
            raise AnimaError("no model is loaded")
        sites = find_sites(unet)
        embedding = text_embedding(init_text) if init_text.strip() else None
        record = {"init": init_text.strip() or f"random(seed={seed}, std={std:g})", **model_record()}
        context = new_context([s.name for s in sites], sites[0].context_dim, store.model_arch(), int(n_tokens),
                              text_embedding=embedding, seed=seed, std=std, record=record)
    save_new(context, name, overwrite)
    return context
