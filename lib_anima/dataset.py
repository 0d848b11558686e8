"""A textual-inversion dataset folder, read the way A1111's ``PersonalizedBase`` reads it, for hosts that no
longer ship that loader (Forge). Same files, same captions, same pixels and loss weights, so a dataset trains the
same on every host:

* every entry of the folder in ``os.listdir`` order that opens as an image (others are skipped);
* its caption: the ``.txt`` file of the same stem (its whole text), else the file name without extension and
  without leading digits/dashes, optionally reduced to the words a regex finds, joined by a string (the host's
  "Filename word regex" / "Filename join string" settings);
* pixels: RGB, resized to the square size (bicubic), scaled to [-1, 1] as ``x / 127.5 - 1``;
* loss weight (when asked): the alpha channel resized to the latent size, shifted to a minimum of 0 and divided
  by its mean; an image without alpha weighs 1 everywhere;
* a template line drawn with :func:`random.choice`, ``[filewords]`` → the caption, ``[name]`` → the name text.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")


@dataclass
class DatasetImage:
    path: str
    caption: str  # the "filewords"
    image: Image.Image  # RGB, already at the square size
    alpha: Image.Image | None  # the original's alpha channel (at its own size) when weights are asked for


def caption_for(path: str, word_regex: str = "", join: str = " ") -> str:
    """The caption of an image file: its ``.txt`` twin's text, else words of its file name."""
    text_file = f"{os.path.splitext(path)[0]}.txt"
    if os.path.exists(text_file):
        with open(text_file, encoding="utf8") as f:
            return f.read()
    text = NUMBERS_AT_START.sub("", os.path.splitext(os.path.basename(path))[0])
    if word_regex:
        text = (join or "").join(re.compile(word_regex).findall(text))
    return text


def read_images(root: str, size: int, use_alpha: bool, opener: Callable[[str], Image.Image] = Image.open,
                word_regex: str = "", join: str = " ") -> list[DatasetImage]:
    """Every image of the folder (``os.listdir`` order), resized to `size` square."""
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            image = opener(path)
            alpha = image.getchannel("A") if use_alpha and "A" in image.getbands() else None
            image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        except Exception:  # noqa: BLE001 - not an image (a caption, a folder, a broken file): skipped, as the host does
            continue
        found.append(DatasetImage(path, caption_for(path, word_regex, join), image, alpha))
    return found


def pixels(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1]."""
    array = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def alpha_weight(alpha: Image.Image | None, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The per-latent-pixel loss weight ``[C, h, w]`` from an alpha channel (minimum 0, mean 1), or ones."""
    channels, *latent_size = latent_shape
    if alpha is None:
        return torch.ones(latent_shape)
    weight = torch.from_numpy(np.array(alpha.resize(latent_size)).astype(np.float32))
    weight = weight.expand(channels, *weight.shape).reshape([channels, *latent_size]).clone()
    weight -= weight.min()
    weight /= weight.mean()
    return weight


class Templates:
    """Template lines of one file; :meth:`create_text` fills one in."""

    def __init__(self, path: str, name_text: str) -> None:
        with open(path) as f:
            self.lines = [line.strip() for line in f.readlines()]
        self.name_text = name_text

    def create_text(self, filewords: str) -> str:
        text = random.choice(self.lines)
        text = text.replace("[filewords]", ",".join(filewords.split(",")))
        return text.replace("[name]", self.name_text)
