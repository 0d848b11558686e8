"""HTTP routes for training under /anima/v1 (registered by :func:`lib_anima.webui.api.add_routes`)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from pydantic import BaseModel

from lib_anima.errors import AnimaError

PREFIX = "/anima/v1"


class TrainBody(BaseModel):
    name: str
    images: list[str]
    prompt: str = ""
    steps: int = 300
    learning_rate: float = 5e-3
    n_tokens: int = 4
    resolution: int = 0
    flip: bool = True
    seed: int = 0
    overwrite: bool = False


def train(body: TrainBody) -> dict:
    from lib_anima.webui import training

    try:
        images = [training.decode_image(data) for data in body.images]
        fields = body.dict()
        fields["images"] = images
        return training.train(training.TrainRequest(**fields))
    except AnimaError as e:
        raise HTTPException(status_code=409 if "already exists" in str(e) else 400, detail=str(e)) from None


def add_routes(add_route: Callable[..., None]) -> None:
    add_route(f"{PREFIX}/train", train, methods=["POST"])
