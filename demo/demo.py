"""Main job, over the WebUI's HTTP API: reference image → context → images without / with it, side by side."""

from __future__ import annotations

import argparse
import base64
import io
import os

import numpy as np
import requests
from PIL import Image, ImageDraw

NAME = "anima_demo"


def txt2img(url: str, prompt: str, seed: int, size: int) -> Image.Image:
    body = {"prompt": prompt, "steps": 12, "width": size, "height": size, "seed": seed, "sampler_name": "Euler a"}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
    r.raise_for_status()
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")


def encode(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_context(url: str, reference: Image.Image, prompt: str) -> str:
    """Train a context from the reference image through the extension's training route."""
    body = {"name": NAME, "images": [encode(reference)], "prompt": prompt, "overwrite": True, "steps": 40,
            "resolution": reference.width}
    r = requests.post(f"{url}/anima/v1/train", json=body, timeout=1800)
    if r.status_code != 200:
        raise SystemExit(f"training failed: {r.status_code} {r.text}")
    summary = r.json()
    return f"trained from the reference image ({summary['steps']} steps, {summary['seconds']} s)"


def side_by_side(images: list[tuple[str, Image.Image]], tile: int = 256) -> Image.Image:
    sheet = Image.new("RGB", (tile * len(images), tile + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(images):
        sheet.paste(image.resize((tile, tile), Image.NEAREST), (i * tile, 24))
        draw.text((i * tile + 6, 6), label, fill="black")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", default="out/anima_demo.png")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    reference_prompt = "a red fox sitting, orange fur"
    reference = txt2img(args.url, reference_prompt, seed=1, size=args.size)
    how = make_context(args.url, reference, reference_prompt)
    prompt = "a cat in the snow"
    without = txt2img(args.url, prompt, seed=7, size=args.size)
    with_ctx = txt2img(args.url, f"{prompt} <anima:{NAME}:1>", seed=7, size=args.size)
    negative = txt2img(args.url, f"{prompt} <anima:{NAME}:1:negative>", seed=7, size=args.size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    side_by_side([("reference", reference), ("without", without), ("with context", with_ctx),
                  ("negative mode", negative)]).save(args.out)

    def diff(a: Image.Image, b: Image.Image) -> float:
        return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())

    print(f"context {NAME!r}: {how}")
    print(f"mean pixel change vs without: with {diff(with_ctx, without):.1f}/255, negative {diff(negative, without):.1f}/255")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
