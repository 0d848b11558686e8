"""The v2 plot (Pillow only, v1's axes): left, similarity vs adherence across scales (median over the characters
per scale, thin lines: each character); right, similarity within the adherence floor vs training time, per
character (checkpoints where no drawn scale keeps the floor are left out)."""

from __future__ import annotations

import math
import statistics

from PIL import Image, ImageDraw, ImageFont

from benchmarks.quality.plot import Axes, _ticks, grid  # noqa: F401  (grid re-exported for run.py)
from benchmarks.quality.v2 import scoring

COLOURS = {"base": (60, 60, 60), "ours": (214, 39, 40), "ours_mask": (255, 140, 0), "ti": (31, 119, 180),
           "finetune": (44, 160, 44)}
LABELS = {"base": "base", "ours": "ours (context)", "ours_mask": "ours, masked (1 character)",
          "ti": "textual inversion (through the text encoder)", "finetune": "fine-tune (upper bound)"}


def _faint(c: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(255 - (255 - v) * 0.3) for v in c)  # type: ignore[return-value]


def plot(record: dict, path: str) -> None:
    font = ImageFont.load_default()
    img = Image.new("RGB", (1300, 640), "white")
    d = ImageDraw.Draw(img)
    chars = record["characters"]
    ax = Axes(d, (80, 60, 640, 540), (0.0, 1.0), (0.0, 1.0))
    ax.frame(font, "prompt adherence (new background + object)", "reference similarity",
             "across scales 0-2 (solid: positive, dashed: negative; bold: median)", _ticks(0, 1), _ticks(0, 1))
    floor = 0.9 * record["base_adherence"]
    px, _ = ax.point(floor, 0)
    for yy in range(60, 540, 8):
        d.line([(px, yy), (px, yy + 4)], fill=(150, 150, 150))
    d.text((px - 150, 64), "90 % of base adherence ->", fill=(120, 120, 120), font=font)
    methods = [m for m in COLOURS if m != "base" and any(m in c["sweeps"] for c in chars)]
    for m in methods:
        for mode in ("positive", "negative"):
            per = [c["sweeps"][m][mode] for c in chars if m in c["sweeps"] and mode in c["sweeps"][m]]
            if not per:
                continue
            for pts in per:
                ax.polyline([(p["adherence"], p["similarity"]) for p in pts], _faint(COLOURS[m]), dashed=mode == "negative")
            med = [(statistics.median(pts[i]["adherence"] for pts in per), statistics.median(pts[i]["similarity"] for pts in per))
                   for i in range(len(per[0]))]
            ax.polyline(med, COLOURS[m], dashed=mode == "negative")
            for (a, s), p in zip(med, per[0], strict=True):
                ax.marker(a, s, COLOURS[m], 3, f"{p['scale']:g}" if mode == "positive" else "", font,
                          hollow=mode == "negative")
    for i, m in enumerate(["base", *methods]):
        d.rectangle([90, 440 + 14 * i, 100, 450 + 14 * i], fill=COLOURS[m])
        d.text((106, 439 + 14 * i), LABELS[m], fill=(0, 0, 0), font=font)
    for c in chars:
        ax.marker(record["base_adherence"], c["base"]["similarity"], COLOURS["base"], 3)

    series = []
    for c in chars:
        fl = c["goals"]["adherence_floor"]
        for m, cv in c["curves"].items():
            vals = [(v["seconds"], v["value"]) for v in scoring.checkpoint_values(cv, fl) if v["value"] is not None]
            series.append((m, vals))
    all_t = [t for _, vs in series for t, _ in vs] or [1.0]
    tx = (max(min(all_t) / 1.5, 0.01), max(all_t) * 1.5)
    ax2 = Axes(d, (760, 60, 1270, 540), tx, (0.0, 1.0), logx=True)
    decades = [10.0**k for k in range(math.floor(math.log10(tx[0])), math.ceil(math.log10(tx[1])) + 1)]
    clock = "CPU seconds" if record.get("clock") == "cpu" else "wall seconds"
    ax2.frame(font, f"training time ({clock}, log)", "similarity within the adherence floor",
              "along training, each character", [t for t in decades if tx[0] <= t <= tx[1]] or [tx[0]], _ticks(0, 1))
    for m, vals in series:
        if len(vals) > 1:
            ax2.polyline(vals, COLOURS[m])
        for t, v in vals:
            ax2.marker(t, v, COLOURS[m], 2)
    if record.get("quick"):
        d.text((80, 600), "QUICK MODE: smoke run, numbers meaningless", fill=(200, 0, 0), font=font)
    img.save(path)
