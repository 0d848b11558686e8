"""Training jobs for the HTTP API: start one in the background, poll it, interrupt it.

One training at a time (a second start while one runs is refused with :class:`TrainingBusy` → HTTP 409); the job
thread takes the host's queue lock, so it waits for a running generation and generations wait for it.
Finished jobs are kept (the last MAX_KEPT) so a client can read the result after the fact.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from lib_anima.errors import AnimaError, NotFoundError
from lib_anima.webui import training
from lib_anima.webui.train_inputs import TrainRequest
from lib_anima.webui.train_progress import Progress

MAX_KEPT = 20
STATES = ("queued", "running", "finished", "interrupted", "failed")


@dataclass
class Job:
    id: str
    name: str
    state: str = "queued"
    progress: Progress = field(default_factory=Progress)
    result: dict | None = None
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def current_state(self) -> str:
        return "running" if self.state == "queued" and self.progress.started else self.state

    def summary(self, with_preview: bool = False, with_sweep: bool = False) -> dict:
        p = self.progress
        return {
            "id": self.id, "name": self.name, "state": self.current_state(), "step": p.step, "steps": p.steps,
            "loss": p.loss, "learn_rate": p.learn_rate, "it_per_s": p.it_per_s, "eta_s": p.eta_s,
            "message": p.message, "preview_path": p.preview_path, "result": self.result, "error": self.error,
            "created": self.created, "finished": self.finished,
            "preview": _png_base64(p.preview) if with_preview else None,
            "sweep": _png_base64(p.sweep) if with_sweep else None,
        }


def _png_base64(image) -> str | None:
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


_jobs: OrderedDict[str, Job] = OrderedDict()
_guard = threading.Lock()


def start(req: TrainRequest) -> Job:
    """Check everything the synchronous route checks (so a bad request is refused before a job exists), claim
    the one training slot and run in a background thread; returns at once."""
    training.preflight(req)
    training.claim_slot()
    try:
        job = Job(id=uuid.uuid4().hex, name=req.name)
        with _guard:
            _jobs[job.id] = job
            while len(_jobs) > MAX_KEPT:
                _jobs.popitem(last=False)
        thread = threading.Thread(target=_run, args=(job, req), name=f"anima-train-{job.id[:8]}", daemon=True)
        thread.start()
    except BaseException:
        training.release_slot()
        raise
    return job


def _run(job: Job, req: TrainRequest) -> None:
    try:
        job.result = training.locked_run(req, job.progress)
        job.state = "interrupted" if job.result.get("interrupted") else "finished"
    except AnimaError as e:
        job.state, job.error = "failed", str(e)
    except Exception as e:  # noqa: BLE001 - a job must always end with a state the client can read
        job.state, job.error = "failed", f"{type(e).__name__}: {e}"
    finally:
        job.finished = time.time()
        training.release_slot()


def get(job_id: str) -> Job:
    with _guard:
        job = _jobs.get(job_id)
    if job is None:
        raise NotFoundError(f"no training job {job_id!r}")
    return job


def all_jobs() -> list[Job]:
    with _guard:
        return list(_jobs.values())


def interrupt(job_id: str) -> Job:
    """Stop the job at the next step; it saves its state (resumable) and the context so far."""
    from modules import shared

    job = get(job_id)
    if job.current_state() in ("queued", "running"):
        job.progress.interrupt_requested = True  # seen before the first step even if still queued
        if job.current_state() == "running" and shared.state.job == "anima-train":
            shared.state.interrupt()
    return job
