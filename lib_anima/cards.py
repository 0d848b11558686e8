"""What an Extra Networks card and its ✎ editor show of a context, as HTML-safe text.

Everything here comes from files (the context's ``anima.training`` metadata, its ``name.json``), which may be
shared by anyone: the host puts metadata-table values, search terms and (with "Treat card description as HTML")
descriptions into its HTML as they are, so each value is escaped here. Imports nothing from the WebUI.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from lib_anima.context import MODES, check_mode, check_scale
from lib_anima.errors import ArgumentError

TRAINING_ROWS = ("steps", "learning_rate", "references", "prompt", "base_model", "created")


def text(value: Any) -> str:
    """`value` as HTML text (a prompt like ``<lora:x:1>`` shows as written, markup never runs)."""
    return html.escape(value if isinstance(value, str) else str(value))


def table_rows(rows: Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
    """Label/value rows for the host's metadata table with every value escaped; None values are left out (as
    the host does)."""
    return [(label, text(value)) for label, value in rows if value is not None]


def context_rows(arch: str, sites: int, tokens: int, dim: int, training: dict[str, Any]) -> list[tuple[str, Any]]:
    """The rows a context adds to the editor's table: its shape and the training record's main entries."""
    rows: list[tuple[str, Any]] = [("Architecture: ", arch), ("Sites × tokens × dim: ", f"{sites} × {tokens} × {dim}")]
    rows += [(f"Training {key.replace('_', ' ')}: ", training[key]) for key in TRAINING_ROWS if key in training]
    return rows


def training_prompt(training: dict[str, Any]) -> str:
    """The training record's prompt as plain text ('' when absent; a non-string value becomes its text)."""
    prompt = training.get("prompt", "")
    return prompt if isinstance(prompt, str) else str(prompt)


def fallback_description(training: dict[str, Any], description_is_html: bool) -> str:
    """The card description when the user wrote none: the training prompt. The host escapes descriptions unless
    told to treat them as HTML; this one comes from the file, never from the user, so then it is escaped here."""
    prompt = training_prompt(training)
    return text(prompt) if description_is_html else prompt


def search_terms(terms: Iterable[Any]) -> list[str]:
    """Search terms, escaped: the host writes them into hidden spans as they are (its search reads textContent,
    so escaped text still matches what was written)."""
    return [text(t) for t in terms if t not in (None, "")]


def user_scale(user: dict[str, Any], default: float, where: str) -> float:
    """The card's default scale from the user metadata (``preferred weight``), else `default`."""
    value = user.get("preferred weight")
    if value in (None, "", 0):
        return default
    return check_scale(value, f"'preferred weight' in {where}")


def user_mode(user: dict[str, Any], default: str, where: str) -> str:
    """The card's default mode from the user metadata (``mode``), else `default`."""
    value = user.get("mode")
    if value in (None, ""):
        return default
    try:
        return check_mode(value)
    except ArgumentError:
        raise ArgumentError(f"'mode' in {where} must be one of {', '.join(MODES)}, got {value!r}"[:300]) from None
