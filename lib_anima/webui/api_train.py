"""HTTP routes for training under /anima/v1 (registered by :func:`lib_anima.webui.api.add_routes`).

``POST /train`` trains and answers when done (simple scripts); ``POST /train/jobs`` starts a job and answers at
once (202) with its id, ``GET /train/jobs/{id}`` polls it (step, loss, it/s, ETA, preview), ``POST
/train/jobs/{id}/interrupt`` stops it (state saved, resumable). A second training while one runs: 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from lib_anima.errors import AnimaError, ArgumentError
from lib_anima.webui import jobs, training
from lib_anima.webui.http_errors import http_error, limit_body

PREFIX = "/anima/v1"
# 64 reference images and masks as base64; the route refuses a larger body before parsing it (413)
MAX_TRAIN_BODY_BYTES = 128 * 1024 * 1024


class TrainBody(BaseModel):
    """The tab's options; images and masks as base64 (PNG/JPEG/WebP, data URLs accepted)."""

    name: str
    images: list[str] = Field(default_factory=list, max_items=training.MAX_IMAGES,
                              description="reference images, base64 (together at most "
                                          f"{training.MAX_TOTAL_PIXELS} pixels)")
    masks: list[str | None] = Field(default_factory=list, max_items=training.MAX_IMAGES,
                                    description="one per image (white = learn) or none")
    dataset_dir: str = Field("", description="a textual-inversion style folder inside the allowed roots")
    template: str = Field("", description="file name in the host's textual_inversion_templates")
    name_text: str = ""
    prompt: str = Field("", description="training prompt (reference images); default: the image's infotext prompt")
    init_text: str = ""
    n_tokens: int = 4
    weights: str = ""
    steps: int = 300
    learning_rate: str = Field("5e-3", description='the host\'s schedule syntax, e.g. "0.005:100, 1e-3:1000, 1e-5"')
    batch_size: int = 1
    grad_accumulation: int = 1
    resolution: int = 0
    flip: bool = True
    use_alpha: bool = False
    seed: int = 0
    save_every: int = 0
    preview_every: int = 0
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_seed: int = -1
    sweep: bool = Field(True, description="after the run, render the prompt at scales 0, 0.5, 1, 1.5 and 1 negative "
                                          "(one seed, one labelled grid in the log folder: result.sweep)")
    resume: bool = False
    overwrite: bool = False


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


def to_request(body: TrainBody) -> training.TrainRequest:
    fields = body.dict()
    if body.masks and len(body.masks) != len(body.images):  # before decoding anything
        raise ArgumentError(f"{len(body.masks)} masks for {len(body.images)} images; give one per image or none")
    fields["images"] = training.decode_images(list(body.images), "image")
    fields["masks"] = training.decode_images(list(body.masks), "mask")
    if fields["images"] and not body.prompt.strip():
        fields["prompt"] = training.prompt_from_infotext(fields["images"][0])
    request = training.TrainRequest(**fields)
    request.validate()
    return request


def train(body: TrainBody) -> dict:
    try:
        return training.train(to_request(body))
    except AnimaError as e:
        raise http_error(e) from None


def start_job(body: TrainBody) -> JobSummary:
    try:
        job = jobs.start(to_request(body))
    except AnimaError as e:
        raise http_error(e) from None
    return JobSummary(**job.summary())


def list_jobs() -> list[JobSummary]:
    return [JobSummary(**job.summary()) for job in jobs.all_jobs()]


def get_job(job_id: str, preview: bool = False, sweep: bool = False) -> JobSummary:
    try:
        return JobSummary(**jobs.get(job_id).summary(with_preview=preview, with_sweep=sweep))
    except AnimaError as e:
        raise http_error(e) from None


def interrupt_job(job_id: str) -> JobSummary:
    try:
        return JobSummary(**jobs.interrupt(job_id).summary())
    except AnimaError as e:
        raise http_error(e) from None


def templates() -> list[str]:
    return sorted(training.templates())


def add_routes(add_route: Callable[..., Any]) -> None:
    limit_body(add_route(f"{PREFIX}/train", train, methods=["POST"]), MAX_TRAIN_BODY_BYTES)
    limit_body(add_route(f"{PREFIX}/train/jobs", start_job, methods=["POST"], response_model=JobSummary,
                         status_code=202), MAX_TRAIN_BODY_BYTES)
    add_route(f"{PREFIX}/train/jobs", list_jobs, methods=["GET"], response_model=list[JobSummary])
    add_route(f"{PREFIX}/train/jobs/{{job_id}}", get_job, methods=["GET"], response_model=JobSummary)
    add_route(f"{PREFIX}/train/jobs/{{job_id}}/interrupt", interrupt_job, methods=["POST"], response_model=JobSummary)
    add_route(f"{PREFIX}/train/templates", templates, methods=["GET"], response_model=list[str])
