"""The AlwaysOn script: the panel under txt2img/img2img, and ``alwayson_scripts: {"anima": {"args": ...}}``."""

from __future__ import annotations

import gradio as gr
from modules import scripts, shared
from modules.ui_components import InputAccordion

from lib_anima import infotext
from lib_anima.context import MODES, SCALE_MAX, SCALE_MIN
from lib_anima.errors import AnimaError
from lib_anima.layout import PRESETS
from lib_anima.units import MAX_PANEL_UNITS, UNIT_FIELDS, units_with_axes
from lib_anima.webui import generation, store, xyz


def _choices() -> list[str]:
    return ["None", *store.library().names()]


class AnimaScript(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return "Anima"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        default_scale = float(getattr(shared.opts, "anima_default_scale", 1.0))
        default_mode = str(getattr(shared.opts, "anima_default_mode", "positive"))
        components = []
        self.infotext_fields = []
        with InputAccordion(False, label="Anima reference context", elem_id=f"anima_{tab}_enabled") as enabled:
            components.append(enabled)
            for i in range(MAX_PANEL_UNITS):
                with gr.Row(elem_id=f"anima_{tab}_unit_{i}"):
                    name = gr.Dropdown(_choices(), value="None", label=f"Context {i + 1}", allow_custom_value=True,
                                       elem_id=f"anima_{tab}_name_{i}")
                    refresh = gr.Button("\U0001f504", elem_classes=["tool"], elem_id=f"anima_{tab}_refresh_{i}")
                    scale = gr.Slider(SCALE_MIN, SCALE_MAX, value=default_scale, step=0.05, label="Scale",
                                      elem_id=f"anima_{tab}_scale_{i}")
                    mode = gr.Radio(list(MODES), value=default_mode, label="Mode", elem_id=f"anima_{tab}_mode_{i}")
                with gr.Row():
                    start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Start", elem_id=f"anima_{tab}_start_{i}")
                    end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="End", elem_id=f"anima_{tab}_end_{i}")
                    weights = gr.Dropdown(["", *PRESETS], value="", label="Sites (preset or weights list)",
                                          allow_custom_value=True, elem_id=f"anima_{tab}_weights_{i}")

                def refresh_choices():
                    store.library().refresh()
                    return gr.update(choices=_choices())

                refresh.click(fn=refresh_choices, inputs=[], outputs=[name])
                unit = [name, scale, mode, start, end, weights]
                components.extend(unit)
                self._register_paste(i, unit)
        self.infotext_fields.append((enabled, lambda d: bool(infotext.panel_entries(d))))
        return components

    def _register_paste(self, index: int, unit_components: list) -> None:
        defaults = {"name": "None", "scale": 1.0, "mode": "positive", "start": 0.0, "end": 1.0, "weights": ""}

        def getter(field: str):
            def get(d: dict):
                entries = infotext.panel_entries(d)
                if index >= len(entries):
                    return gr.update(value=defaults[field]) if field == "name" else gr.update()
                value = entries[index].get(field, defaults[field])
                if field == "mode" and value not in MODES:
                    return gr.update()
                if field == "weights":
                    value = str(value).replace(" ", ",")
                elif field in ("scale", "start", "end"):
                    try:
                        value = float(value)
                    except ValueError:  # a hand-edited infotext (also the API's "infotext" field): keep the panel
                        return gr.update()
                return value
            return get

        for component, field in zip(unit_components, UNIT_FIELDS, strict=False):
            self.infotext_fields.append((component, getter(field)))

    def process_before_every_sampling(self, p, *args, **kwargs):
        generation.before_sampling(p)  # the forks' patch point (a no-op on A1111, where hooks do the work)

    def process(self, p, *args):
        axes = xyz.axis_fields(p)  # set by the X/Y/Z plot's Anima axes for this cell
        try:
            units = units_with_axes(args, axes)
        except AnimaError as e:
            # The host would only log an exception raised here; a warning reaches the user (UI and infotext).
            # API requests with bad args are refused with 422 before this point (see api.guard_generation_routes).
            generation.run_state(p).warn(p, f"panel/API arguments ignored: {e}")
            return
        if axes and not units and axes.get("name") != "None":
            generation.run_state(p).warn(p, "the X/Y/Z plot's Anima axes have no context to act on: name one in the "
                                            "panel's first unit or add an Anima context axis")
        if not units and getattr(p, "_anima_run", None) is None:
            return  # disabled: leave p exactly as the host made it
        generation.run_state(p).panel = units
