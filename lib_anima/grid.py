"""A row of equally sized images with a label above each: the scale sweep's picture. Host-free (Pillow only).

The cells fill the bottom ``height`` rows of the result, cell ``i`` at ``x = i * width``: a client can cut them out
again without knowing the font (the label band above them is as tall as the longest wrapped label).
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def font_size(width: int, height: int) -> int:
    """The host's X/Y/Z legend size ((w + h) / 25), but never below 12 px: 64 px cells still get readable labels."""
    return max(12, (width + height) // 25)


def labelled_row(cells: list[Image.Image], labels: list[str], font: ImageFont.ImageFont | None = None) -> Image.Image:
    """``cells`` side by side (all the size of the first), each under its label, wrapped to the cell's width."""
    if not cells or len(cells) != len(labels):
        raise ValueError(f"{len(cells)} cells for {len(labels)} labels")
    width, height = cells[0].size
    font = font or ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, font, width) for label in labels]
    line_height = _text_height(measure, font)
    spacing = max(2, line_height // 4)
    band = max(len(lines) for lines in wrapped) * (line_height + spacing) + spacing
    grid = Image.new("RGB", (width * len(cells), band + height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, (cell, lines) in enumerate(zip(cells, wrapped, strict=True)):
        if cell.size != (width, height):
            raise ValueError(f"cell {i + 1} is {cell.size[0]}x{cell.size[1]}, the first {width}x{height}")
        grid.paste(cell.convert("RGB"), (i * width, band))
        y = spacing
        for line in lines:
            x = i * width + (width - draw.textlength(line, font=font)) / 2  # centred by hand: bitmap fonts take no anchor
            draw.text((x, y), line, font=font, fill=TEXT)
            y += line_height + spacing
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(candidate, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def _text_height(draw: ImageDraw.ImageDraw, font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag", font=font)
    return int(bottom - top) + 1
