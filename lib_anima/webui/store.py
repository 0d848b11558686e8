"""Where contexts live in the WebUI, and the one library instance that serves every front end."""

from __future__ import annotations

import os

from modules import paths, shared

from lib_anima.library import ContextLibrary
from lib_anima.webui import host

_library: ContextLibrary | None = None


def contexts_dir() -> str:
    configured = getattr(shared.cmd_opts, "anima_dir", None)
    return os.path.abspath(configured or os.path.join(paths.models_path, "anima"))


def library() -> ContextLibrary:
    global _library
    if _library is None or _library.directory != contexts_dir():
        _library = ContextLibrary(contexts_dir())
        _library.refresh()
    return _library


def current_unet():
    """The UNet (diffusion model) of the loaded checkpoint, or None when no model is loaded."""
    return host.current_unet()


def model_arch() -> str:
    model = shared.sd_model
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    return "sd1"
