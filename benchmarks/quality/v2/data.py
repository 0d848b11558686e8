"""The v2 world: the pictures of v1, but characters are known by NAME only, and the held-out ones have none.

A picture is still a character (shape × colour × texture) on a background with a companion object, rendered by
:func:`benchmarks.quality.data.render` (pixels pinned by v1's tests). What changes is the language:

* every character the base model is trained on has its own opaque name (``chr07``); captions say
  ``chr07 on sand with moon``. No caption word names a shape, a colour or a texture, so the only way words can
  reach a character is its name.
* :data:`TEST_CHARACTERS` (6) and :data:`DEV_CHARACTER` (used only to choose learning rates and defaults) are
  never shown in pre-training and have no name. Each of their attributes is seen in other characters, so the
  model can draw them in principle, but no prompt can ask for them: a textual-inversion vector has to go through
  the frozen text encoder and find input that makes the UNet draw a combination it never drew.

Everything here is a pure function of its arguments, like v1's data.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.quality import data as v1

Character = tuple[str, str, str]  # shape, colour, texture

ALL_CHARACTERS: tuple[Character, ...] = tuple(itertools.product(v1.SHAPES, v1.COLOURS, v1.TEXTURES))
TEST_CHARACTERS: tuple[Character, ...] = (
    ("triangle", "blue", "stripes"),
    ("circle", "yellow", "checker"),
    ("square", "red", "stripes"),
    ("cross", "green", "checker"),
    ("circle", "red", "solid"),
    ("square", "blue", "checker"),
)
DEV_CHARACTER: Character = ("cross", "yellow", "solid")
HELD_OUT: tuple[Character, ...] = (*TEST_CHARACTERS, DEV_CHARACTER)
MASKED_CHARACTER: Character = TEST_CHARACTERS[0]  # also learned with a mask on the character (ours)
REFERENCE_BACKGROUND = "sand"

NAMED: tuple[Character, ...] = tuple(c for c in ALL_CHARACTERS if c not in HELD_OUT)
NAMES: dict[Character, str] = {c: f"chr{ALL_CHARACTERS.index(c):02d}" for c in NAMED}

PAD, BOS, ON, WITH = "<pad>", "<bos>", "on", "with"
VOCAB: tuple[str, ...] = (PAD, BOS, ON, WITH, *v1.BACKGROUNDS, *v1.OBJECTS, *NAMES.values())
SEQ_LEN = 14  # <bos> + up to 8 learned vectors + "on bg with obj" + at least one <pad>


def slug(character: Character) -> str:
    return "-".join((character[1], character[2], character[0]))  # "blue-stripes-triangle"


def scene(character: Character, background: str, obj: str) -> v1.Scene:
    return v1.Scene(*character, background, obj)


def setting_words(background: str | None, obj: str | None) -> list[str]:
    return v1.setting_words(background, obj)


def caption(s: v1.Scene) -> list[str]:
    """``<name> on <background> with <object>``; only named characters have captions."""
    return [NAMES[s.character], *setting_words(s.background, s.object)]


def training_scenes() -> list[v1.Scene]:
    """Every named character in every setting (the held-out characters never appear)."""
    return [scene(c, b, o) for c in NAMED for b in v1.BACKGROUNDS for o in v1.OBJECTS]


def reference(character: Character) -> tuple[v1.Scene, np.ndarray]:
    """The ONE picture a one-shot method learns `character` from: on sand, no companion, render seed 0."""
    s = scene(character, REFERENCE_BACKGROUND, "nothing")
    return s, v1.render(s, seed=0)


def reference_setting() -> list[str]:
    return setting_words(REFERENCE_BACKGROUND, "nothing")


def character_mask(character: Character, factor: int = 2) -> torch.Tensor:
    """Where the reference picture shows the character, as a ``[1, 32/factor, 32/factor]`` 0/1 loss mask.

    Found without knowing the drawing code: the reference rendered on two other backgrounds (same seed, same
    layout) differs from it everywhere except on the character; a latent pixel counts when any of its pixels does.
    """
    s, image = reference(character)
    same = np.ones(image.shape[:2], dtype=bool)
    for bg in ("night", "sky"):
        other = v1.render(scene(character, bg, "nothing"), seed=0)
        same &= np.abs(other - image).max(axis=2) < 1e-6
    n = v1.SIZE // factor
    cells = same.reshape(n, factor, n, factor).any(axis=(1, 3))
    return torch.from_numpy(cells.astype(np.float32))[None]


def new_settings() -> list[tuple[str, str]]:
    return v1.new_settings()


def caption_rng(*key: object) -> np.random.Generator:
    return v1._rng("captions-v2", *key)


def dropped_caption(s: v1.Scene, rng: np.random.Generator) -> list[str]:
    """Word dropout: 10 % empty (the unconditional branch), 30 % without the name, background and object clauses
    each left out with 15 % (a part left out means "any")."""
    if rng.random() < 0.1:
        return []
    name = [] if rng.random() < 0.3 else [NAMES[s.character]]
    background = s.background if rng.random() >= 0.15 else None
    obj = s.object if rng.random() >= 0.15 else None
    return name + setting_words(background, obj)


@dataclass
class Bank:
    images: torch.Tensor  # [N, 3, 32, 32] in [-1, 1]
    scenes: list[v1.Scene]


def picture_bank(n: int, seed: int) -> Bank:
    """`n` pictures of random training scenes, rendered once (captions are drawn afresh every step)."""
    b = v1.sample_batch(training_scenes(), n, seed, -2, dropout=False)
    return Bank(b.images, b.scenes)
