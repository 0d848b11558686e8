"""Infotext entries: ``Anima 1: "name: x, hash: 0123abcd4567, scale: 0.8, mode: positive"``.

One key per active context (``Anima 1``, ``Anima 2``, ...). Start, end and weights appear only when not the
default; ``source: prompt`` marks a context that came from ``<anima:...>`` in the prompt (pasting the prompt
restores it, so the panel leaves it out). Custom weight lists are written space separated.
"""

from __future__ import annotations

import re
from typing import Any

from lib_anima.units import ContextUnit

KEY = "Anima"
_KEY_RE = re.compile(rf"^{KEY} (\d+)$")


def format_unit(unit: ContextUnit, shorthash: str) -> str:
    parts = [f"name: {unit.name}", f"hash: {shorthash}", f"scale: {unit.scale:g}", f"mode: {unit.mode}"]
    if unit.start != 0.0:
        parts.append(f"start: {unit.start:g}")
    if unit.end != 1.0:
        parts.append(f"end: {unit.end:g}")
    if unit.weights:
        parts.append(f"weights: {unit.weights.replace(',', ' ')}")
    if unit.source == "prompt":
        parts.append("source: prompt")
    return ", ".join(parts)


def is_entry_key(key: str) -> bool:
    """``Anima 1``, ``Anima 2``, ... (not ``Anima warnings``)."""
    return bool(_KEY_RE.match(key))


def generation_params(units: list[tuple[ContextUnit, str]]) -> dict[str, str]:
    """The infotext keys for (unit, shorthash) pairs."""
    return {f"{KEY} {i}": format_unit(unit, h) for i, (unit, h) in enumerate(units, start=1)}


def parse_entry(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in str(text).split(","):
        key, sep, value = part.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def parse_params(params: dict[str, Any]) -> list[dict[str, str]]:
    """The entries of ``Anima N`` keys in a parsed infotext, ordered by N."""
    found = []
    for key, value in params.items():
        match = _KEY_RE.match(str(key))
        if match:
            found.append((int(match.group(1)), parse_entry(value)))
    return [fields for _, fields in sorted(found)]


def panel_entries(params: dict[str, Any]) -> list[dict[str, str]]:
    """Entries that belong in the panel (not those that came from the prompt)."""
    return [e for e in parse_params(params) if e.get("source") != "prompt" and e.get("name")]
