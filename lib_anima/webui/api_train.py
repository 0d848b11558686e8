"""HTTP routes for training under /anima/v1 (registered by :func:`lib_anima.webui.api.add_routes`).

``POST /train`` trains and answers when done (simple scripts); ``POST /train/jobs`` starts a job and answers at
once (202) with its id, ``GET /train/jobs/{id}`` polls it (step, loss, it/s, ETA, preview), ``POST
/train/jobs/{id}/interrupt`` stops it (state saved, resumable). A second training while one runs: 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from lib_anima.options import MAX_IMAGES, MAX_TOTAL_PIXELS, TrainOptions, dump, max_items
from lib_anima.webui import jobs, train_inputs, training
from lib_anima.webui.http_errors import error_answers, limit_body
from lib_anima.webui.train_inputs import TrainRequest, decode_images, request_from

PREFIX = "/anima/v1"
# 64 reference images and masks as base64; the route refuses a larger body before parsing it (413)
MAX_TRAIN_BODY_BYTES = 128 * 1024 * 1024


class TrainBody(TrainOptions):
    """The training options (:class:`lib_anima.options.TrainOptions`) with the images and masks as base64
    (PNG/JPEG/WebP, data URLs accepted)."""

    images: list[str] = Field(default_factory=list, **max_items(MAX_IMAGES),
                              description=f"reference images, base64 (together at most {MAX_TOTAL_PIXELS} pixels)")
    masks: list[str | None] = Field(default_factory=list, **max_items(MAX_IMAGES),
                                    description="one per image (white = learn) or none")


class JobSummary(BaseModel):
    id: str
    name: str
    state: str
    step: int
    steps: int
    loss: float | None
    learn_rate: float | None
    it_per_s: float | None
    eta_s: float | None
    message: str
    preview_path: str
    preview: str | None = Field(None, description="latest preview PNG, base64 (with ?preview=true)")
    sweep: str | None = Field(None, description="the scale sweep's grid PNG, base64 (with ?sweep=true)")
    result: dict | None
    error: str
    created: float
    finished: float | None


def to_request(body: TrainBody) -> TrainRequest:
    body.check_inputs(len(body.images), len(body.masks))  # before decoding anything
    images = decode_images(list(body.images), "image")
    masks = decode_images(list(body.masks), "mask")
    return request_from(dump(body, exclude={"images", "masks"}), images, masks)


def train(body: TrainBody) -> dict:
    with error_answers():
        return training.train(to_request(body))


def start_job(body: TrainBody) -> JobSummary:
    with error_answers():
        job = jobs.start(to_request(body))
    return JobSummary(**job.summary())


def list_jobs() -> list[JobSummary]:
    return [JobSummary(**job.summary()) for job in jobs.all_jobs()]


def get_job(job_id: str, preview: bool = False, sweep: bool = False) -> JobSummary:
    with error_answers():
        return JobSummary(**jobs.get(job_id).summary(with_preview=preview, with_sweep=sweep))


def interrupt_job(job_id: str) -> JobSummary:
    with error_answers():
        return JobSummary(**jobs.interrupt(job_id).summary())


def templates() -> list[str]:
    return sorted(train_inputs.templates())


def add_routes(add_route: Callable[..., Any]) -> None:
    limit_body(add_route(f"{PREFIX}/train", train, methods=["POST"]), MAX_TRAIN_BODY_BYTES)
    limit_body(add_route(f"{PREFIX}/train/jobs", start_job, methods=["POST"], response_model=JobSummary,
                         status_code=202), MAX_TRAIN_BODY_BYTES)
    add_route(f"{PREFIX}/train/jobs", list_jobs, methods=["GET"], response_model=list[JobSummary])
    add_route(f"{PREFIX}/train/jobs/{{job_id}}", get_job, methods=["GET"], response_model=JobSummary)
    add_route(f"{PREFIX}/train/jobs/{{job_id}}/interrupt", interrupt_job, methods=["POST"], response_model=JobSummary)
    add_route(f"{PREFIX}/train/templates", templates, methods=["GET"], response_model=list[str])
