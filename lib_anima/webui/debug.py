"""Test-only view of the last generation's rows (``--anima-debug-rows``): which rows of each UNet call the tracker
took as conditional, unconditional or left alone, and whether each context reached a call."""

from __future__ import annotations

import dataclasses

from modules import shared

from lib_anima.webui import generation


def enabled() -> bool:
    return bool(getattr(shared.cmd_opts, "anima_debug_rows", False))


def add_routes(app) -> None:
    if not enabled():
        return
    generation.record_rows = True

    @app.get("/anima/v1/debug/rows")
    def last_rows() -> dict:
        return {
            "calls": [dataclasses.asdict(r) for r in generation.last_records],
            "reached": dict(generation.last_reached),
        }
