"""The benchmark's pictures, drawn with Pillow only (no plotting library needed): the similarity–adherence
plot with the time-to-similarity curves, and the grid of generated pictures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"base": (60, 60, 60), "ours": (214, 39, 40), "ti": (31, 119, 180), "finetune": (44, 160, 44)}
LABELS = {"base": "base", "ours": "ours (context)", "ti": "textual inversion", "finetune": "fine-tune (upper bound)"}


class Axes:
    """A rectangle of the canvas with data coordinates; x may be logarithmic."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float], logx: bool = False):
        self.draw, self.box, self.xlim, self.ylim, self.logx = draw, box, xlim, ylim, logx

    def _fx(self, x: float) -> float:
        lo, hi = self.xlim
        if self.logx:
            x, lo, hi = math.log10(max(x, 1e-9)), math.log10(lo), math.log10(hi)
        return (x - lo) / (hi - lo)

    def point(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return x0 + self._fx(x) * (x1 - x0), y1 - fy * (y1 - y0)

    def frame(self, font: ImageFont.ImageFont, xlabel: str, ylabel: str, title: str,
              xticks: Sequence[float], yticks: Sequence[float]) -> None:
        x0, y0, x1, y1 = self.box
        d = self.draw
        d.rectangle(self.box, outline=(0, 0, 0))
        for t in xticks:
            px, _ = self.point(t, self.ylim[0])
            d.line([(px, y1), (px, y1 + 4)], fill=(0, 0, 0))
            d.line([(px, y0), (px, y1)], fill=(235, 235, 235))
            d.text((px - 8, y1 + 6), f"{t:g}", fill=(0, 0, 0), font=font)
        for t in yticks:
            _, py = self.point(self.xlim[0], t)
            d.line([(x0 - 4, py), (x0, py)], fill=(0, 0, 0))
            d.line([(x0, py), (x1, py)], fill=(235, 235, 235))
            d.text((x0 - 34, py - 5), f"{t:.2f}", fill=(0, 0, 0), font=font)
        d.rectangle(self.box, outline=(0, 0, 0))
        d.text(((x0 + x1) / 2 - 3 * len(xlabel), y1 + 22), xlabel, fill=(0, 0, 0), font=font)
        d.text((x0 - 34, y0 - 18), ylabel, fill=(0, 0, 0), font=font)
        d.text(((x0 + x1) / 2 - 3 * len(title), y0 - 36), title, fill=(0, 0, 0), font=font)

    def polyline(self, pts: Sequence[tuple[float, float]], colour: tuple[int, int, int], dashed: bool = False) -> None:
        xy = [self.point(x, y) for x, y in pts]
        for a, b in zip(xy, xy[1:], strict=False):
            if not dashed:
                self.draw.line([a, b], fill=colour, width=2)
                continue
            n = max(2, int(math.dist(a, b) / 6))
            for i in range(0, n, 2):
                p = (a[0] + (b[0] - a[0]) * i / n, a[1] + (b[1] - a[1]) * i / n)
                q = (a[0] + (b[0] - a[0]) * (i + 1) / n, a[1] + (b[1] - a[1]) * (i + 1) / n)
                self.draw.line([p, q], fill=colour, width=2)

    def marker(self, x: float, y: float, colour: tuple[int, int, int], r: int = 4, label: str = "",
               font: ImageFont.ImageFont | None = None, hollow: bool = False) -> None:
        px, py = self.point(x, y)
        self.draw.ellipse([px - r, py - r, px + r, py + r], outline=colour, fill=None if hollow else colour, width=2)
        if label:
            self.draw.text((px + r + 2, py - r - 8), label, fill=colour, font=font)


def _limits(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = max(hi - lo, 0.1)
    return max(0.0, lo - pad * span), min(1.0, hi + pad * span) if hi <= 1 else hi + pad * span


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n
    return [round(lo + i * step, 2) for i in range(n + 1)]


def plot(record: dict, path: str) -> None:
    """Left: similarity vs adherence along the scales of each method and mode. Right: similarity vs training time."""
    font = ImageFont.load_default()
    img = Image.new("RGB", (1300, 620), "white")
    d = ImageDraw.Draw(img)
    curves = record["curves"]  # method -> mode -> [{scale, similarity, adherence}]
    base = record["base"]
    pts = [(p["adherence"], p["similarity"]) for modes in curves.values() for ps in modes.values() for p in ps]
    xs, ys = [p[0] for p in pts] + [base["adherence"]], [p[1] for p in pts] + [base["similarity"]]
    ax = Axes(d, (80, 60, 640, 540), _limits(xs), _limits(ys))
    ax.frame(font, "prompt adherence (new background + object)", "reference similarity",
             "similarity vs adherence across scales (solid: positive, dashed: negative)",
             _ticks(*ax.xlim), _ticks(*ax.ylim))
    goal = record.get("goals", {})
    if "adherence_floor" in goal:  # the goal's region: adherence within 10 % of base
        px, _ = ax.point(goal["adherence_floor"], ax.ylim[0])
        _, top = ax.point(ax.xlim[0], ax.ylim[1])
        _, bottom = ax.point(ax.xlim[0], ax.ylim[0])
        for yy in range(int(top), int(bottom), 8):
            d.line([(px, yy), (px, yy + 4)], fill=(150, 150, 150))
        d.text((px - 150, top + 4), "90 % of base adherence ->", fill=(120, 120, 120), font=font)
    for method, modes in curves.items():
        colour = COLOURS[method]
        for mode, ps in modes.items():
            ax.polyline([(p["adherence"], p["similarity"]) for p in ps], colour, dashed=mode == "negative")
            for p in ps:
                ax.marker(p["adherence"], p["similarity"], colour, 3, f"{p['scale']:g}", font, hollow=mode == "negative")
    ax.marker(base["adherence"], base["similarity"], COLOURS["base"], 6, "base", font)
    for i, (method, label) in enumerate(LABELS.items()):  # legend bottom left, where no curve goes
        d.rectangle([90, 470 + 14 * i, 100, 480 + 14 * i], fill=COLOURS[method])
        d.text((106, 469 + 14 * i), label, fill=(0, 0, 0), font=font)

    times = record["time_curves"]  # method -> [{seconds, similarity}]
    all_t = [p["seconds"] for ps in times.values() for p in ps]
    all_s = [p["similarity"] for ps in times.values() for p in ps] + [base["similarity"]]
    tx = (max(min(all_t) / 1.5, 0.1), max(all_t) * 1.5)
    ax2 = Axes(d, (760, 60, 1270, 540), tx, _limits(all_s), logx=True)
    decades = [10.0**k for k in range(math.floor(math.log10(tx[0])), math.ceil(math.log10(tx[1])) + 1)]
    ticks = [t for t in decades if tx[0] <= t <= tx[1]] or [tx[0]]
    clock = "CPU seconds" if record.get("clock") == "cpu" else "wall seconds"
    ax2.frame(font, f"training time ({clock}, log)", "reference similarity (scale 1, positive)",
              "similarity vs training time", ticks, _ticks(*ax2.ylim))
    for method, ps in times.items():
        ax2.polyline([(p["seconds"], p["similarity"]) for p in ps], COLOURS[method])
        for p in ps:
            ax2.marker(p["seconds"], p["similarity"], COLOURS[method], 3)
    _, by = ax2.point(tx[0], base["similarity"])
    d.line([(760, by), (1270, by)], fill=COLOURS["base"])
    d.text((766, by - 12), "base", fill=COLOURS["base"], font=font)
    note = record.get("plot_note", "")
    if note:
        d.text((80, 590), note, fill=(0, 0, 0), font=font)
    img.save(path)


def grid(rows: Sequence[tuple[str, np.ndarray]], path: str, columns: Sequence[str] = (), zoom: int = 3) -> None:
    """One labelled row per entry; each entry is uint8 ``[N, H, W, 3]``."""
    font = ImageFont.load_default()
    n = max(r[1].shape[0] for r in rows)
    h, w = rows[0][1].shape[1:3]
    cell, label_w, head = w * zoom + 4, 190, 18 if columns else 0
    img = Image.new("RGB", (label_w + n * cell, head + len(rows) * (h * zoom + 4)), "white")
    d = ImageDraw.Draw(img)
    for j, name in enumerate(columns):
        d.text((label_w + j * cell + 2, 3), name, fill=(0, 0, 0), font=font)
    for i, (label, pics) in enumerate(rows):
        y = head + i * (h * zoom + 4)
        d.text((4, y + h * zoom // 2 - 6), label, fill=(0, 0, 0), font=font)
        for j, pic in enumerate(pics):
            tile = Image.fromarray(pic).resize((w * zoom, h * zoom), Image.NEAREST)
            img.paste(tile, (label_w + j * cell, y))
    img.save(path)
