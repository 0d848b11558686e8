"""The training options: one pydantic model for the HTTP API (its body and ``/docs``), the Train tab (its inputs
are built and read by field name) and the run (:class:`lib_anima.webui.train_inputs.TrainRequest` adds the
decoded images to it).

Every bound lives in :data:`LIMITS` and becomes the field's constrained type, so the API refuses an out-of-range
value with 422 and shows the bound in its schema, and a value the tab passes outside it is refused by the same
model with the field's name (:func:`parse`). Every type is strict, so both pydantic versions refuse the same
inputs (pydantic 1 would turn ``5`` into ``"5"``, pydantic 2 ``true`` into ``1.0``).

Works with pydantic 1 (A1111, reForge) and 2 (Forge): only ``Field``, ``conint`` and strict types are used, and
:func:`dump`, :func:`default_of` and :func:`parse` hide the two APIs' differences. No ``from __future__ import
annotations`` here: the constrained types must be evaluated where they are written, on both versions.
"""

from typing import Any

import pydantic
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, conint

from lib_anima.create import MAX_TOKENS
from lib_anima.errors import ArgumentError
from lib_anima.train import TrainConfig

PYDANTIC_2 = pydantic.VERSION.startswith("2.")

MAX_STEPS = 100_000
MAX_IMAGES = 64
MAX_IMAGE_PIXELS = 4096 * 4096
# All reference images of one request together (decoded RGBA: 256 MiB); checked from the headers before decoding.
MAX_TOTAL_PIXELS = 64 * 1024 * 1024
MAX_SEED = 2**32 - 1

# (lowest, highest) of every whole-number option: the one place a bound is written
LIMITS: dict[str, tuple[int, int]] = {
    "n_tokens": (1, MAX_TOKENS),
    "steps": (1, MAX_STEPS),
    "batch_size": (1, 64),
    "grad_accumulation": (1, 256),
    "resolution": (0, 4096),
    "seed": (-1, MAX_SEED),
    "save_every": (0, MAX_STEPS),
    "preview_every": (0, MAX_STEPS),
    "preview_steps": (1, 150),
    "preview_seed": (-1, MAX_SEED),
}


def _whole(name: str, multiple_of: int | None = None) -> Any:
    low, high = LIMITS[name]
    return conint(strict=True, ge=low, le=high, multiple_of=multiple_of)


class TrainOptions(BaseModel):
    """Every option of a training except the reference images themselves."""

    if PYDANTIC_2:  # a misspelt option is an error, not a silently used default
        model_config = {"extra": "forbid"}
    else:
        class Config:
            extra = "forbid"

    name: StrictStr = Field(..., description="the context's name (its file in the contexts folder)")
    dataset_dir: StrictStr = Field("", description="a textual-inversion style folder inside the allowed roots "
                                             "(instead of reference images)")
    template: StrictStr = Field("", description="dataset only: a file name in the host's textual_inversion_templates")
    name_text: StrictStr = Field("", description="dataset only: what [name] in a template becomes")
    prompt: StrictStr = Field("", description="the training prompt for reference images; default: the first image's "
                                        "infotext prompt")
    init_text: StrictStr = Field("", description="text whose embedding starts every token (empty: small random)")
    n_tokens: _whole("n_tokens") = Field(TrainConfig.n_tokens, description="tokens per site")
    weights: StrictStr = Field("", description='sites: "" (all), a preset (coarse, middle, fine, in, mid, out) or one '
                                         "weight per site, comma separated (0: not trained)")
    steps: _whole("steps") = Field(TrainConfig.steps, description="optimisation steps")
    learning_rate: StrictStr | StrictFloat | StrictInt = Field(
        f"{TrainConfig.lr:g}", description='a number or the host\'s schedule syntax, e.g. "0.005:100, 1e-3:1000, 1e-5"')
    batch_size: _whole("batch_size") = Field(TrainConfig.batch_size, description="examples per step")
    grad_accumulation: _whole("grad_accumulation") = Field(TrainConfig.grad_accumulation,
                                                           description="batches per optimiser step")
    resolution: _whole("resolution", multiple_of=8) = Field(0, description="training size in pixels, a multiple "
                                                            "of 8 (0: the model's native, SDXL 1024, else 512)")
    flip: StrictBool = Field(True, description="train on horizontal flips too")
    use_alpha: StrictBool = Field(False, description="PNG alpha as loss weight")
    seed: _whole("seed") = Field(0, description="-1: random (recorded)")
    save_every: _whole("save_every") = Field(0, description="save a checkpoint and the resumable state every N "
                                                            "steps (0: at the end only)")
    preview_every: _whole("preview_every") = Field(0, description="render a preview every N steps (0: none)")
    preview_prompt: StrictStr = Field("", description="previews and sweep: the prompt (empty: the training prompt)")
    preview_negative_prompt: StrictStr = ""
    preview_steps: _whole("preview_steps") = Field(20, description="sampling steps of previews and the sweep")
    preview_seed: _whole("preview_seed") = Field(-1, description="-1: the run's seed")
    sweep: StrictBool = Field(True, description="after the run, render the prompt at scales 0, 0.5, 1, 1.5 and 1 "
                                                "negative (one seed, one labelled grid in the log folder)")
    resume: StrictBool = Field(False, description="continue the saved run of this name")
    overwrite: StrictBool = Field(False, description="replace an existing context of this name")

    def check_inputs(self, n_images: int, n_masks: int) -> None:
        """What the fields alone cannot say: images or a dataset (one of them), and one mask per image or none."""
        if bool(n_images) == bool(self.dataset_dir.strip()):
            raise ArgumentError("give either reference images or a dataset directory (exactly one of them)")
        if n_images > MAX_IMAGES:
            raise ArgumentError(f"give at most {MAX_IMAGES} reference images, got {n_images}")
        if n_masks and n_masks != n_images:
            raise ArgumentError(f"{n_masks} masks for {n_images} images; give one per image or none")


def max_items(count: int) -> dict[str, int]:
    """``Field`` keywords bounding a list's length (pydantic 2 renamed ``max_items``)."""
    return {"max_length": count} if PYDANTIC_2 else {"max_items": count}


def _fields(model: type[BaseModel]) -> dict:
    return model.model_fields if PYDANTIC_2 else model.__fields__


def field_names(model: type[BaseModel] = TrainOptions) -> list[str]:
    return list(_fields(model))


def default_of(name: str) -> Any:
    return _fields(TrainOptions)[name].default


def dump(model: BaseModel, exclude: set[str] | None = None) -> dict:
    return model.model_dump(exclude=exclude) if PYDANTIC_2 else model.dict(exclude=exclude)


def parse(model: type[BaseModel], values: dict) -> Any:
    """``model(**values)``, a refusal as an :class:`ArgumentError` naming each field and what is wrong with it."""
    try:
        return model(**values)
    except pydantic.ValidationError as e:
        problems: dict[str, list[str]] = {}  # by field: a union's branches each add their own complaint
        for err in e.errors():
            problems.setdefault(str(err["loc"][0]), []).append(err["msg"])
        text = "; ".join(f"{field}: {' or '.join(dict.fromkeys(msgs))}" for field, msgs in problems.items())
        raise ArgumentError(f"invalid training options: {text}") from None
