"""Registers everything with the host; called once by scripts/anima.py."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from modules import extra_networks, script_callbacks, ui_extra_networks

from lib_anima.webui import api, debug, generation, settings, ui_train, xyz
from lib_anima.webui.network import ExtraNetworkAnima
from lib_anima.webui.page import ExtraNetworksPageAnima


def _before_ui() -> None:
    ui_extra_networks.register_page(ExtraNetworksPageAnima())
    extra_networks.register_extra_network(ExtraNetworkAnima())
    xyz.register()  # every script is loaded by now, and the plot's ui() (which lists the axes) has not run yet


def host_serves_api() -> bool:
    """Whether the host itself serves its HTTP API: ``--api``, or ``--nowebui`` (API only), as its webui.py decides.

    Our routes can delete, upload, rename and train, so they exist only where the host's own ``/sdapi`` does (and
    are then under its ``--api-auth``); without it, e.g. ``--listen --gradio-auth`` alone, they are not there.
    The UI never calls them.
    """
    from modules import shared

    return bool(getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False))


def _app_started(_demo, app) -> None:
    if host_serves_api():
        api.add_routes(app)
        debug.add_routes(app)


def _register(add: Callable, callback: Callable) -> None:
    """Register `callback` with the host; older hosts (the 2024 Forge) take no ``name=``."""
    try:
        named = "name" in inspect.signature(add).parameters
    except (TypeError, ValueError):
        named = False
    if named:
        add(callback, name="anima")
    else:
        add(callback)


def register() -> None:
    _register(script_callbacks.on_before_ui, _before_ui)
    _register(script_callbacks.on_cfg_denoiser, generation.on_cfg_denoiser)
    _register(script_callbacks.on_ui_settings, settings.on_ui_settings)
    _register(script_callbacks.on_app_started, _app_started)
    _register(script_callbacks.on_after_component, ui_train.on_after_component)
    _register(script_callbacks.on_ui_train_tabs, ui_train.on_ui_train_tabs)
    _register(script_callbacks.on_ui_tabs, ui_train.on_ui_tabs)
