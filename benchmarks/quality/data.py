"""The synthetic world of the quality benchmark: 32×32 pictures of a "character" in a setting, with captions.

A picture is a character (shape × colour × texture) on a background, with an optional companion object in the
top-right corner. Every attribute has a word; a caption is a short list of words such as
``red stripes circle on sand with moon``. Everything here is a pure function of its arguments (a seeded
``numpy`` generator per picture), so the same attributes, index and seed give the same pixels on every machine.

One character, :data:`HELD_OUT`, never appears in pre-training: the one-shot methods see it in exactly one
picture (:func:`reference`), on :data:`REFERENCE_BACKGROUND` with no companion, and are then asked to draw it
in the settings of :func:`new_settings` (other backgrounds, with a companion).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
TEXTURES = ("solid", "stripes", "checker")
BACKGROUNDS = ("sand", "night", "sky", "fog")
OBJECTS = ("nothing", "moon", "box", "bar")  # "nothing": no companion
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES, "background": BACKGROUNDS, "object": OBJECTS}
CHARACTER_KEYS = ("shape", "colour", "texture")
SETTING_KEYS = ("background", "object")

HELD_OUT = ("triangle", "blue", "stripes")  # shape, colour, texture: a combination pre-training never shows
REFERENCE_BACKGROUND = "sand"

PAD, ON, WITH = "<pad>", "on", "with"
VOCAB: tuple[str, ...] = (PAD, ON, WITH, *SHAPES, *COLOURS, *TEXTURES, *BACKGROUNDS, *OBJECTS)
SEQ_LEN = 10  # longest caption: 4 learned vectors + "on bg with obj" = 8 words, with room to spare

_RGB = {
    "red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.88, 0.1),
}
_OBJECT_RGB = {"moon": (1.0, 1.0, 1.0), "box": (0.85, 0.1, 0.85), "bar": (0.1, 0.9, 0.9)}
_SUPER = 2  # render at 2× and average down: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    texture: str
    background: str
    object: str

    def __post_init__(self) -> None:
        for key, values in ATTRIBUTES.items():
            if getattr(self, key) not in values:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; one of {', '.join(values)}")

    @property
    def character(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.texture)

    def labels(self) -> dict[str, int]:
        """Class index of every attribute (the classifier's targets)."""
        return {key: ATTRIBUTES[key].index(getattr(self, key)) for key in ATTRIBUTES}


def character_words(scene: Scene) -> list[str]:
    return [scene.colour, scene.texture, scene.shape]


def setting_words(background: str | None, obj: str | None) -> list[str]:
    """``on <background> with <object>``; a part given as None is left out (unspecified)."""
    words = []
    if background is not None:
        words += [ON, background]
    if obj is not None:
        words += [WITH, obj]
    return words


def caption(scene: Scene) -> list[str]:
    return character_words(scene) + setting_words(scene.background, scene.object)


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _grid() -> tuple[np.ndarray, np.ndarray]:
    n = SIZE * _SUPER
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    return (xs + 0.5) / _SUPER, (ys + 0.5) / _SUPER  # pixel coordinates of the sample points


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":  # apex up, base at +0.8 r
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 where the character shows its colour, a dark shade elsewhere (fixed to the image grid)."""
    if texture == "solid":
        return np.ones_like(x)
    if texture == "stripes":
        return (np.floor(y / 2) % 2 == 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(x / 3) + np.floor(y / 3)) % 2 == 0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _background(name: str, y: np.ndarray) -> np.ndarray:
    v = (y / SIZE)[..., None]  # 0 at the top, 1 at the bottom
    if name == "sand":
        return np.broadcast_to(np.array([0.86, 0.74, 0.48], np.float32), (*y.shape, 3)).copy()
    if name == "night":
        return np.array([0.02, 0.02, 0.1], np.float32) + v * np.array([0.08, 0.08, 0.16], np.float32)
    if name == "sky":
        return np.array([0.35, 0.6, 0.95], np.float32) * (1 - v) + np.array([0.9, 0.95, 1.0], np.float32) * v
    if name == "fog":
        return np.broadcast_to(np.array([0.55, 0.55, 0.55], np.float32), (*y.shape, 3)).copy()
    raise ValueError(f"unknown background {name!r}")


def _object_mask(obj: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if obj == "moon":
        return dx * dx + dy * dy <= 4.2**2
    if obj == "box":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 3.5
    if obj == "bar":
        return (np.abs(dx) <= 1.6) & (np.abs(dy) <= 4.8)
    raise ValueError(f"unknown object {obj!r}")


def render(scene: Scene, seed: int = 0) -> np.ndarray:
    """The picture of `scene` as float32 ``[32, 32, 3]`` in [0, 1]; `seed` jitters position and size."""
    rng = _rng("render", *scene.character, scene.background, scene.object, seed)
    # Small jitter only: a model this small learns a nearly fixed layout within the CPU budget (with ±2 px and a
    # wider size range it was still drawing grainy blobs after 40k pictures).
    cx, cy = 13.0 + rng.uniform(-1, 1), 19.0 + rng.uniform(-1, 1)
    r = rng.uniform(8.0, 9.0)
    ox, oy = 26.0 + rng.uniform(-0.5, 0.5), 6.0 + rng.uniform(-0.5, 0.5)
    x, y = _grid()
    img = _background(scene.background, y)
    colour = np.array(_RGB[scene.colour], np.float32)
    tex = _texture(scene.texture, x, y)[..., None]
    fill = colour * (0.3 + 0.7 * tex)  # the texture's off cells are a dark shade of the same colour
    mask = _shape_mask(scene.shape, x, y, cx, cy, r)[..., None]
    img = np.where(mask, fill, img)
    if scene.object != "nothing":
        omask = _object_mask(scene.object, x, y, ox, oy)[..., None]
        img = np.where(omask, np.array(_OBJECT_RGB[scene.object], np.float32), img)
    img = img.reshape(SIZE, _SUPER, SIZE, _SUPER, 3).mean(axis=(1, 3))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``[N, 32, 32, 3]`` (or one ``[32, 32, 3]``) in [0, 1] → ``[N, 3, 32, 32]`` in [-1, 1]."""
    arr = images[None] if images.ndim == 3 else images
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))) * 2.0 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] → ``[N, H, W, 3]`` uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


# ---- the splits ------------------------------------------------------------------------------------------------


def all_scenes() -> list[Scene]:
    return [Scene(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


def training_scenes() -> list[Scene]:
    """Every scene whose character is not the held-out one."""
    return [s for s in all_scenes() if s.character != HELD_OUT]


def reference() -> tuple[Scene, np.ndarray]:
    """The one picture of the held-out character the one-shot methods learn from."""
    scene = Scene(*HELD_OUT, REFERENCE_BACKGROUND, "nothing")
    return scene, render(scene, seed=0)


def new_settings() -> list[tuple[str, str]]:
    """(background, object) pairs the reference does not show: another background and a companion."""
    return [(b, o) for b in BACKGROUNDS if b != REFERENCE_BACKGROUND for o in OBJECTS if o != "nothing"]


@dataclass
class Batch:
    images: torch.Tensor  # [N, 3, 32, 32] in [-1, 1]
    words: list[list[str]]  # captions (after dropout)
    labels: dict[str, torch.Tensor]  # attribute -> [N] class index
    scenes: list[Scene]


def sample_batch(scenes: list[Scene], n: int, seed: int, index: int, dropout: bool = True) -> Batch:
    """`n` random pictures of `scenes` (batch `index` of the stream `seed`), captions with word dropout.

    Dropout teaches the model what a partial caption means (the parts left out are "any"): 10 % empty captions
    (the unconditional branch of classifier-free guidance), 30 % without the character words, else each
    character word left out with 15 %, the background and the object clause each with 15 %.
    """
    rng = _rng("batch", seed, index)
    picks = rng.integers(0, len(scenes), size=n)
    render_seeds = rng.integers(0, 2**31, size=n)
    images, words, chosen = [], [], []
    labels: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
    for pick, rseed in zip(picks, render_seeds, strict=True):
        scene = scenes[int(pick)]
        chosen.append(scene)
        images.append(render(scene, int(rseed)))
        for key, value in scene.labels().items():
            labels[key].append(value)
        words.append(dropped_caption(scene, rng) if dropout else caption(scene))
    return Batch(to_tensor(np.stack(images)), words, {k: torch.tensor(v) for k, v in labels.items()}, chosen)


def caption_rng(*key: object) -> np.random.Generator:
    return _rng("captions", *key)


def dropped_caption(scene: Scene, rng: np.random.Generator) -> list[str]:
    """The caption of `scene` with the word dropout described in :func:`sample_batch`."""
    if rng.random() < 0.1:
        return []
    if rng.random() < 0.3:
        char: list[str] = []
    else:
        char = [w for w in character_words(scene) if rng.random() >= 0.15]
    background = scene.background if rng.random() >= 0.15 else None
    obj = scene.object if rng.random() >= 0.15 else None
    return char + setting_words(background, obj)
