"""What the user asks for: a context by name with scale, mode, start/end and site weights.

One model of a request for all three front ends (prompt syntax, panel, API), parsed and validated here so
that each gives the same errors. Host-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lib_anima.context import check_mode, check_scale
from lib_anima.errors import ArgumentError
from lib_anima.inject import check_window
from lib_anima.layout import PRESETS, parse_weights
from lib_anima.names import check_name

UNIT_FIELDS = ("name", "scale", "mode", "start", "end", "weights")


@dataclass
class ContextUnit:
    """One context to apply. `weights`: "" (the file's default or all), a preset name or a custom list."""

    name: str
    scale: float = 1.0
    mode: str = "positive"
    start: float = 0.0
    end: float = 1.0
    weights: str = ""
    source: str = "panel"  # "panel" (also the API's alwayson_scripts) or "prompt"

    def __post_init__(self) -> None:
        self.name = check_name(self.name)
        self.scale = check_scale(self.scale)
        self.mode = check_mode(self.mode)
        self.start, self.end = check_window(self.start, self.end)
        self.weights = _weights_text(self.weights)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_WEIGHTS_TEXT = 4000  # 70 SDXL sites at ~10 characters each, with room to spare


def _weights_text(value: object) -> str:
    """Weights as text: "" , a preset name or "w1,w2,..."; the count is checked against the model at generation."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        try:
            numbers = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ArgumentError(f"site weights must be numbers, got {_short(value)}") from None
        value = ",".join(f"{v:g}" for v in numbers)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ArgumentError(f"site weights must be a preset name or a list of numbers, got {_short(value)}")
    text = str(value).strip()
    if len(text) > MAX_WEIGHTS_TEXT:
        raise ArgumentError(f"site weights are {len(text)} characters long; at most {MAX_WEIGHTS_TEXT}")
    if text and text.lower() not in PRESETS:
        # the format is checked here, for a clear error before generation; the count needs the model
        parse_weights(text, [None] * len(text.replace(";", ",").split(",")))  # type: ignore[list-item]
    return text


def _short(value: object, limit: int = 80) -> str:
    """repr of a user value, cut short: an error message must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def unit_from_prompt_items(positional: list[str], named: dict[str, str], default_scale: float = 1.0) -> ContextUnit:
    """`<anima:name[:scale[:mode]][:mode=..][:start=..][:end=..][:preset=..|weights=..]>` as a unit."""
    if not positional or not str(positional[0]).strip():
        raise ArgumentError("<anima:...> needs a context name, e.g. <anima:my_style:0.8>")
    unknown = sorted(set(named) - {"scale", "mode", "start", "end", "preset", "weights"})
    if unknown:
        raise ArgumentError(f"<anima:{positional[0]}>: unknown argument(s) {', '.join(map(_short, unknown))}; "
                            "known: scale, mode, start, end, preset, weights")
    if len(positional) > 3:
        raise ArgumentError(f"<anima:{positional[0]}>: too many positional arguments (name, scale, mode)")
    scale = named.get("scale", positional[1] if len(positional) > 1 else default_scale)
    mode = named.get("mode", positional[2] if len(positional) > 2 else "positive")
    return ContextUnit(
        name=str(positional[0]).strip(),
        scale=scale,  # type: ignore[arg-type]
        mode=mode,
        start=named.get("start", 0.0),  # type: ignore[arg-type]
        end=named.get("end", 1.0),  # type: ignore[arg-type]
        weights=named.get("weights", named.get("preset", "")),
        source="prompt",
    )


MAX_PANEL_UNITS = 3
PANEL_ARGS_PER_UNIT = len(UNIT_FIELDS)
PANEL_ARGS = 1 + MAX_PANEL_UNITS * PANEL_ARGS_PER_UNIT  # what the host passes to the script (it cuts the rest)
MAX_UNITS = 16  # contexts in one generation: more is a mistake (or an attack), not a picture


def _unit_from_dict(d: dict[str, Any], where: str) -> ContextUnit:
    unknown = sorted(set(d) - set(UNIT_FIELDS) - {"preset", "enabled"})
    if unknown:
        raise ArgumentError(f"{where}: unknown field(s) {', '.join(map(_short, unknown))}; "
                            f"known: {', '.join(UNIT_FIELDS)}, preset, enabled")
    fields = {k: v for k, v in d.items() if k in UNIT_FIELDS}
    if "preset" in d and "weights" not in d:
        fields["weights"] = d["preset"]
    if "name" not in fields:
        raise ArgumentError(f"{where}: 'name' is required")
    try:
        return ContextUnit(**fields)
    except ArgumentError as e:
        raise ArgumentError(f"{where}: {e}") from None


def units_from_script_args(args: tuple | list) -> list[ContextUnit]:
    """The panel's (or API ``alwayson_scripts``) arguments as units; [] when disabled.

    Positional: ``[enabled, name, scale, mode, start, end, weights, name, ...]`` (the panel's order).
    Named: ``[{"enabled": true, "units": [{"name": ..., "scale": ..., ...}, ...]}]`` or ``[{"name": ...}, ...]``.
    """
    if not isinstance(args, (list, tuple)):
        raise ArgumentError(f"anima args must be a list, got {_short(args)}")
    args = list(args)
    if not args:
        return []
    if isinstance(args[0], dict):
        return _units_from_dicts(args)
    enabled, rest = args[0], args[1:]
    if not _truthy(enabled, "enabled (the first of the anima args)"):
        return []
    units = []
    for i in range(0, len(rest), PANEL_ARGS_PER_UNIT):
        values = rest[i:i + PANEL_ARGS_PER_UNIT]
        if not values or values[0] in (None, "", "None"):
            continue
        fields = dict(zip(UNIT_FIELDS, values, strict=False))
        try:
            units.append(ContextUnit(**{k: v for k, v in fields.items() if v is not None}))
        except ArgumentError as e:
            raise ArgumentError(f"anima unit {i // PANEL_ARGS_PER_UNIT + 1}: {e}") from None
    return _check_count(units)


def _units_from_dicts(args: list) -> list[ContextUnit]:
    first = args[0]
    if "units" in first or "contexts" in first:
        unknown = sorted(set(first) - {"enabled", "units", "contexts"})
        if unknown:
            raise ArgumentError(f"anima args: unknown field(s) {', '.join(map(_short, unknown))}; known: enabled, units")
        if not _truthy(first.get("enabled", True), "enabled"):
            return []
        items = first.get("units", first.get("contexts")) or []
    else:
        items = args
    if not isinstance(items, list):
        raise ArgumentError(f"anima args: 'units' must be a list of objects, got {_short(items)}")
    if len(items) > MAX_UNITS:
        raise ArgumentError(f"anima args: {len(items)} units; at most {MAX_UNITS} contexts per generation")
    units = []
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ArgumentError(f"anima unit {n}: expected an object with name, scale, mode, ...; got {_short(item)}")
        if _truthy(item.get("enabled", True), f"anima unit {n}: enabled"):
            units.append(_unit_from_dict(item, f"anima unit {n}"))
    return _check_count(units)


def _check_count(units: list[ContextUnit]) -> list[ContextUnit]:
    if len(units) > MAX_UNITS:
        raise ArgumentError(f"{len(units)} anima contexts; at most {MAX_UNITS} per generation")
    return units


def _truthy(value: object, what: str = "enabled") -> bool:
    """A switch: bool, number or "true"/"false"-like text; anything else (an object, a list) is an error."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("", "0", "false", "no", "off", "none"):
            return False
        raise ArgumentError(f"{what} must be true or false, got {_short(value)}")
    if value is None or isinstance(value, (bool, int, float)):
        return bool(value)
    raise ArgumentError(f"{what} must be true or false, got {_short(value)}")


# ---- the X/Y/Z plot's Anima axes: they set fields of the panel's first unit ---------------------------------------


def check_axis_value(field: str, value: object) -> object:
    """One X/Y/Z axis value checked like the panel checks it. Start and end are checked each alone (the other
    one is not known here); a start after the panel's end is then a warning at generation, as from the panel."""
    if field == "name":
        text = str(value).strip()
        return "None" if text in ("", "None") else check_name(text)
    if field == "scale":
        return check_scale(value)
    if field == "mode":
        return check_mode(value)
    if field == "start":  # against the widest window: a start of 1 or an end of 0 can never apply
        return check_window(value, 1.0)[0]
    if field == "end":
        return check_window(0.0, value)[1]
    if field == "weights":
        return _weights_text(value)
    raise ArgumentError(f"unknown anima axis field {field!r}")


def units_with_axes(args: tuple | list, fields: dict[str, Any]) -> list[ContextUnit]:
    """The script's units with the first unit's fields set by X/Y/Z axes.

    Positional args are edited where the panel's first unit sits, so a context axis enables the panel with that
    unit's other values (scale, mode, ... as the panel shows them); a name of "None" turns that unit off.
    Named (dict) args: the first unit's fields are replaced, or a unit is made from them when a name is given.
    """
    if not fields or not isinstance(args, (list, tuple)):
        return units_from_script_args(args)
    args = list(args)
    if args and isinstance(args[0], dict):
        return _dict_units_with_axes(units_from_script_args(args), fields)
    args += [None] * (1 + PANEL_ARGS_PER_UNIT - len(args))
    for key, value in fields.items():
        args[1 + UNIT_FIELDS.index(key)] = value
    if fields.get("name", "None") != "None":
        args[0] = True  # naming a context enables the panel; "None" only turns the first unit off
    return units_from_script_args(args)


def _dict_units_with_axes(units: list[ContextUnit], fields: dict[str, Any]) -> list[ContextUnit]:
    if fields.get("name") == "None":
        return units[1:]
    if units:
        return [ContextUnit(**{**units[0].as_dict(), **fields}), *units[1:]]
    return [ContextUnit(**fields)] if "name" in fields else units
