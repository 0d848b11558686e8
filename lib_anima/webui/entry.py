"""Registers everything with the host; called once by scripts/anima.py."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from modules import extra_networks, script_callbacks, ui_extra_networks

from lib_anima.webui import api, debug, generation, settings, ui_train
from lib_anima.webui.network import ExtraNetworkAnima
from lib_anima.webui.page import ExtraNetworksPageAnima


def _before_ui() -> None:
    ui_extra_networks.register_page(ExtraNetworksPageAnima())
    extra_networks.register_extra_network(ExtraNetworkAnima())


def _app_started(_demo, app) -> None:
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
