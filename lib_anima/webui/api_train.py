"""HTTP routes for training under /anima/v1 (registered by :func:`lib_anima.webui.api.add_routes`).

``POST /train`` trains and answers when done (simple scripts); ``POST /train/jobs`` starts a job and answers at
once (202) with its id, ``GET /train/jobs/{id}`` polls it (step, loss, it/s, ETA, preview), ``POST
/train/jobs/{id}/interrupt`` stops it (state saved, resumable). A second training while one runs: 409.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from pydantic import BaseModel, Field

from lib_anima.errors import AnimaError
from lib_anima.webui import jobs, training

PREFIX = "/anima/v1"


class TrainBody(BaseModel):
    """The tab's options; images and masks as base64 (PNG/JPEG/WebP, data URLs accepted)."""

    name: str
    images: list[str] = Field(default_factory=list, description="reference images, base64")
    masks: list[str | None] = Field(default_factory=list, description="one per image (white = learn) or none")
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
    result: dict | None
    error: str
    created: float
    finished: float | None


def to_request(body: TrainBody) -> training.TrainRequest:
    fields = body.dict()
    fields["images"] = [training.decode_image(d, f"image {i + 1}") for i, d in enumerate(body.images)]
    fields["masks"] = [None if d is None else training.decode_image(d, f"mask {i + 1}") for i, d in enumerate(body.masks)]
    if fields["images"] and not body.prompt.strip():
        fields["prompt"] = training.prompt_from_infotext(fields["images"][0])
    request = training.TrainRequest(**fields)
    request.validate()
    return request


def _http_error(e: AnimaError) -> HTTPException:
    if isinstance(e, training.TrainingBusy) or "already exists" in str(e):
        return HTTPException(status_code=409, detail=str(e))
    return HTTPException(status_code=400, detail=str(e))


def train(body: TrainBody) -> dict:
    try:
        return training.train(to_request(body))
    except AnimaError as e:
        raise _http_error(e) from None


def start_job(body: TrainBody) -> JobSummary:
    try:
        job = jobs.start(to_request(body))
    except AnimaError as e:
        raise _http_error(e) from None
    return JobSummary(**job.summary())


def list_jobs() -> list[JobSummary]:
    return [JobSummary(**job.summary()) for job in jobs.all_jobs()]


def get_job(job_id: str, preview: bool = False) -> JobSummary:
    try:
        return JobSummary(**jobs.get(job_id).summary(with_preview=preview))
    except AnimaError as e:
        raise HTTPException(status_code=404, detail=str(e)) from None


def interrupt_job(job_id: str) -> JobSummary:
    try:
        return JobSummary(**jobs.interrupt(job_id).summary())
    except AnimaError as e:
        raise HTTPException(status_code=404, detail=str(e)) from None


def templates() -> list[str]:
    return sorted(training.templates())


def add_routes(add_route: Callable[..., None]) -> None:
    add_route(f"{PREFIX}/train", train, methods=["POST"])
    add_route(f"{PREFIX}/train/jobs", start_job, methods=["POST"], response_model=JobSummary, status_code=202)
    add_route(f"{PREFIX}/train/jobs", list_jobs, methods=["GET"], response_model=list[JobSummary])
    add_route(f"{PREFIX}/train/jobs/{{job_id}}", get_job, methods=["GET"], response_model=JobSummary)
    add_route(f"{PREFIX}/train/jobs/{{job_id}}/interrupt", interrupt_job, methods=["POST"], response_model=JobSummary)
    add_route(f"{PREFIX}/train/templates", templates, methods=["GET"], response_model=list[str])
