"""The v2 goals arithmetic, from measured curves only (pure functions; unit-tested).

Terms (per held-out character):

* **floor**: 90 % of the base model's adherence (the setting prompt alone, no method).
* **fine-tune gain**: the fine-tune's highest similarity over its scales minus the base's similarity.
* **best within the floor** (of a scale sweep): the highest similarity at a positive scale > 0 whose adherence
  is at or above the floor.
* **along training**: each checkpoint is drawn at a few scales; its value is the highest similarity among those
  scales that keep adherence at or above the floor (None when none does). Times are training seconds on the
  budget's clock up to that checkpoint.
* goal (a): the first checkpoint whose value reaches base + 50 % of the fine-tune gain, for ours and TI;
  goal (b): the best value TI reaches in the budget, and the first checkpoint at which ours and TI reach it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def floor_of(base: dict) -> float:
    return 0.9 * base["adherence"]


def best_within(points: Sequence[dict], floor: float) -> dict | None:
    ok = [p for p in points if p["scale"] > 0 and p["adherence"] >= floor]
    return max(ok, key=lambda p: p["similarity"]) if ok else None


def checkpoint_values(curve: Sequence[dict], floor: float) -> list[dict]:
    """``[{step, seconds, value}]``: per checkpoint the best similarity within the floor over its scales."""
    out = []
    for cp in curve:
        ok = [p["similarity"] for p in cp["scales"] if p["adherence"] >= floor]
        out.append({"step": cp["step"], "seconds": cp["seconds"], "value": max(ok) if ok else None})
    return out


def first_reaching(values: Sequence[dict], target: float) -> float | None:
    for v in values:
        if v["value"] is not None and v["value"] >= target - 1e-9:
            return v["seconds"]
    return None


def ratio(slow: float | None, fast: float | None) -> float | None:
    return round(slow / fast, 2) if slow and fast else None


def character_goals(base: dict, sweeps: dict, curves: dict) -> dict:
    """`sweeps`: method -> mode -> [{scale, similarity, adherence}]; `curves`: method -> [{step, seconds,
    scales: [{scale, similarity, adherence}]}]. Methods: ours, ti, finetune (and optionally ours_mask)."""
    floor = floor_of(base)
    ft_gain = max(p["similarity"] for p in sweeps["finetune"]["positive"]) - base["similarity"]
    out: dict = {"adherence_floor": round(floor, 4), "finetune_gain": round(ft_gain, 4), "methods": {}}
    values = {m: checkpoint_values(c, floor) for m, c in curves.items()}
    half = base["similarity"] + 0.5 * ft_gain
    ti_peak = max((v["value"] for v in values.get("ti", []) if v["value"] is not None), default=None)
    out["half_gain_similarity"] = round(half, 4)
    out["ti_best_along_training"] = ti_peak
    for m in sweeps:
        best = best_within(sweeps[m]["positive"], floor)
        gain = best["similarity"] - base["similarity"] if best else 0.0
        row = {"best_within_floor": best, "gain_fraction_of_finetune": round(gain / ft_gain, 3) if ft_gain > 0 else None}
        if m in values:
            row["seconds_to_half_gain"] = first_reaching(values[m], half)
            row["seconds_to_ti_best"] = first_reaching(values[m], ti_peak) if ti_peak is not None else None
            ok = [v["value"] for v in values[m] if v["value"] is not None]
            row["best_along_training"] = max(ok) if ok else None
        out["methods"][m] = row
    ours, ti = out["methods"]["ours"], out["methods"]["ti"]
    out["ti_over_ours_half_gain"] = ratio(ti.get("seconds_to_half_gain"), ours.get("seconds_to_half_gain"))
    out["ti_over_ours_ti_best"] = ratio(ti.get("seconds_to_ti_best"), ours.get("seconds_to_ti_best"))
    frac = ours["gain_fraction_of_finetune"]
    out["goal_half_gain"] = bool(frac is not None and frac >= 0.5)
    t_ours, t_ti = ours.get("seconds_to_half_gain"), ti.get("seconds_to_half_gain")
    # 10x: ours gets there, and TI either never does within the budget or takes at least 10x as long
    out["goal_10x"] = bool(t_ours is not None and (t_ti is None or t_ti >= 10 * t_ours))
    return out


def summary(values: Sequence[float | None]) -> dict:
    """Median and range of the measured values; `missing` counts characters where there is none (not reached)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "missing": len(values)}
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "missing": len(values) - len(xs)}
