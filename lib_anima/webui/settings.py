"""The extension's section in the host's Settings."""

from __future__ import annotations

import gradio as gr
from modules import shared

from lib_anima.context import MODES, SCALE_MAX

SECTION = ("anima", "Anima")


def on_ui_settings() -> None:
    options = {
        "anima_default_scale": shared.OptionInfo(
            1.0, "Default scale for new contexts in the panel and for <anima:name> without a scale",
            gr.Slider, {"minimum": 0.0, "maximum": SCALE_MAX, "step": 0.05},
        ),
        "anima_default_mode": shared.OptionInfo(
            "positive", "Default mode", gr.Radio, {"choices": list(MODES)},
        ).info("positive: toward the reference (conditional rows); negative: away from it (unconditional rows)"),
    }
    for key, info in options.items():
        info.section = SECTION
        shared.opts.add_option(key, info)
