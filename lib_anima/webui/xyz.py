"""Anima axes for the host's X/Y/Z plot script (txt2img and img2img).

Each axis sets one field of the panel's first unit on the plot's per-cell copy of the processing object; the
script's ``process`` reads them (:func:`axis_fields`) and applies them to its arguments. Values are checked in
the axis's ``confirm``, which the host calls for every axis before the first cell: a bad value stops the plot
with the host's own error (in the UI, a message; over HTTP, its error answer) before anything is generated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lib_anima.context import MODES
from lib_anima.errors import AnimaError
from lib_anima.layout import PRESETS
from lib_anima.units import check_axis_value
from lib_anima.webui import store

log = logging.getLogger("anima")

ATTRIBUTE = "_anima_axes"  # on the plot's per-cell copy of p: {field: value}
MODULE_NAMES = ("xyz_grid.py", "scripts.xyz_grid")
# (label, field, value type, choices): the order they appear in the plot's type list
AXES: tuple[tuple[str, str, type, Callable[[], list[str]] | None], ...] = (
    ("Anima context", "name", str, lambda: ["None", *store.library().names()]),
    ("Anima scale", "scale", float, None),
    ("Anima mode", "mode", str, lambda: list(MODES)),
    ("Anima start", "start", float, None),
    ("Anima end", "end", float, None),
    ("Anima sites", "weights", str, lambda: list(PRESETS)),
)


def axis_fields(p) -> dict[str, Any]:
    """What the plot's Anima axes set for this cell ({} outside a plot)."""
    return dict(getattr(p, ATTRIBUTE, None) or {})


def _apply(field: str) -> Callable[[Any, Any, list], None]:
    def apply(p, value, _values) -> None:
        fields = getattr(p, ATTRIBUTE, None)
        if fields is None:
            # The host's cell is a shallow copy of p: without its own dict, one cell's Anima infotext entries
            # (and warnings) would stay in the next cell's, e.g. in a scale-0 cell that applies nothing.
            p.extra_generation_params = dict(p.extra_generation_params)
        setattr(p, ATTRIBUTE, {**(fields or {}), field: value})
    return apply


def _confirm(label: str, field: str) -> Callable[[Any, list], None]:
    def confirm(_p, values: list) -> None:
        for value in values:
            try:
                checked = check_axis_value(field, value)
            except AnimaError as e:
                raise RuntimeError(f"{label}: {e}") from None
            if field == "name" and checked != "None":
                _check_exists(label, str(checked))
    return confirm


def _check_exists(label: str, name: str) -> None:
    library = store.library()
    if name not in library.names():
        library.refresh()  # a context added since the last scan
    if name not in library.names():
        raise RuntimeError(f"{label}: unknown context {name!r}; the folder has: {', '.join(library.names()) or 'none'}")


def find_module():
    """The host's X/Y/Z plot module among the loaded scripts, or None (another host, or the script removed)."""
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in MODULE_NAMES and hasattr(data, "module"):
            return data.module
    return None


def register() -> bool:
    """Append the Anima axes to the plot's axis list (once); False when there is no X/Y/Z plot."""
    xyz = find_module()
    if xyz is None:
        log.info("anima: no X/Y/Z plot script found; its Anima axes are not added")
        return False
    if any(getattr(option, "anima_field", None) for option in xyz.axis_options):
        return True  # the UI was rebuilt (reload): the module and its list are the same
    for label, field, kind, choices in AXES:
        option = xyz.AxisOption(label, kind, _apply(field), confirm=_confirm(label, field), choices=choices)
        option.anima_field = field
        xyz.axis_options.append(option)
    return True
