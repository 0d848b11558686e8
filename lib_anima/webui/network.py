"""The ``anima`` extra network: ``<anima:name[:scale[:mode]][:start=..][:end=..][:preset=..]>`` in prompts."""

from __future__ import annotations

from modules import extra_networks, shared

from lib_anima.errors import AnimaError
from lib_anima.units import MAX_UNITS, unit_from_prompt_items
from lib_anima.webui import generation, store


class ExtraNetworkAnima(extra_networks.ExtraNetwork):
    def __init__(self) -> None:
        super().__init__("anima")

    def activate(self, p, params_list) -> None:
        if not params_list and getattr(p, "_anima_run", None) is None:
            return  # nothing asked and nothing to undo: leave p untouched
        run = generation.run_state(p)
        units = []
        library = store.library()
        default_scale = float(getattr(shared.opts, "anima_default_scale", 1.0))
        if len(params_list) > MAX_UNITS:
            run.warn(p, f"{len(params_list)} <anima:...> tags; only the first {MAX_UNITS} are used")
            params_list = params_list[:MAX_UNITS]
        for params in params_list:
            try:
                unit = unit_from_prompt_items(list(params.positional), dict(params.named), default_scale)
                if library.find(unit.name) is None:
                    library.refresh()  # a file added since the last look
                    if library.find(unit.name) is None:
                        raise AnimaError(f"unknown context {unit.name!r} (not in {library.directory})")
                unit.name = library.find(unit.name) or unit.name
                units.append(unit)
            except AnimaError as e:
                run.warn(p, f"<anima:{_shown(params.items)}> ignored: {e}")
        generation.set_prompt_units(p, units)

    def deactivate(self, p) -> None:
        pass


def _shown(items: list, limit: int = 120) -> str:
    text = ":".join(map(str, items))
    return text if len(text) <= limit else text[:limit] + "..."
