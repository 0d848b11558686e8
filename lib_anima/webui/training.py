"""Training a context in the WebUI: inputs → examples (encoded once) → the core loop → files, previews, log.

Everything here runs with the host's queue lock held (generation and training never interleave on one model) and
reports through ``shared.state`` (progress bar, Interrupt). :func:`run` is the one function the tab, the jobs of
the HTTP API and the synchronous route all end in; it assumes the lock is held. :func:`train` takes the lock.

The parts, by name: :mod:`lib_anima.options` (the options model the API, the tab and the run share),
:mod:`~lib_anima.webui.train_inputs` (the request, images, dataset, schedule → examples),
:mod:`~lib_anima.webui.train_folder` (the log folder and resume), :mod:`~lib_anima.webui.train_progress`
(progress, previews, the sweep); this module holds the one-training slot and the run. What differs in reaching the
model (Forge has no ``apply_model``, loads inference tensors, ...) is in :mod:`lib_anima.webui.host`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from modules import call_queue, devices, shared

from lib_anima.errors import AnimaError, ContextExistsError, TrainingBusy
from lib_anima.train import DiffusionSchedule, TrainConfig, TrainingDiverged, TrainResult, TrainState, train_context
from lib_anima.webui import host, manage, store, train_folder
from lib_anima.webui.train_folder import RunFolder, check_resume, find_resume_state
from lib_anima.webui.train_inputs import (
    TrainRequest,
    check_dataset_dir,
    data_fingerprint,
    dataset_examples,
    image_examples,
    learn_rate,
    template_path,
)
from lib_anima.webui.train_progress import Progress, render_preview, render_sweep, save_card_image, vae_on_device

# One training at a time across the tab, jobs and the synchronous route; taken before the queue lock so a
# second request is refused at once instead of waiting behind the first.
_busy = threading.Lock()


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    claim_slot()
    try:
        yield
    finally:
        release_slot()


def is_busy() -> bool:
    return _busy.locked()


def claim_slot() -> None:
    """Take the one training slot for a run that releases it itself (a background job); TrainingBusy if taken."""
    if not _busy.acquire(blocking=False):
        raise TrainingBusy("a training is already running; wait for it to finish or interrupt it")


def release_slot() -> None:
    _busy.release()


# ---- the run ------------------------------------------------------------------------------------------------------


def _check_model() -> None:
    unet = store.current_unet()
    if unet is None:
        raise AnimaError("no model is loaded")
    if int(getattr(unet, "in_channels", 4)) != 4:
        raise AnimaError("this checkpoint is an inpainting/edit model (UNet input is not 4 channels); "
                         "training a context needs a plain SD1.x, SD2.x or SDXL checkpoint")


def _unet_apply(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    return host.unet_apply(x, t, cond, devices.device, host.unet_dtype())


@contextlib.contextmanager
def _text_and_vae_offloaded():
    """The host's "Move VAE and CLIP to RAM when training": only the UNet runs inside the loop."""
    model = shared.sd_model
    if (not getattr(shared.opts, "unload_models_when_training", False) or devices.device.type == "cpu"
            or getattr(model, "cond_stage_model", None) is None):  # Forge: its memory manager moves them
        yield
        return
    model.cond_stage_model.to(devices.cpu)
    model.first_stage_model.to(devices.cpu)
    try:
        yield
    finally:
        model.cond_stage_model.to(devices.device)
        model.first_stage_model.to(devices.device)




def preflight(req: TrainRequest) -> tuple[Callable[[int], float], str]:
    """Every check a training makes before it starts, so a request is refused before it is queued or a job
    exists: the fields, the name (taken without overwrite/resume: 409), the learning-rate schedule, the loaded
    model, the saved state to resume, the dataset folder and template. Returns the parsed schedule."""
    req.check()
    if os.path.exists(store.library().path(req.name)) and not (req.overwrite or req.resume):
        raise ContextExistsError(f"a context named {req.name!r} already exists; choose another name or allow overwrite")
    schedule = learn_rate(req.learning_rate, req.steps)
    _check_model()
    if req.resume:
        find_resume_state(req)
    if req.dataset_dir.strip():
        check_dataset_dir(req.dataset_dir)
        template_path(req.template)
    return schedule


def run(req: TrainRequest, progress: Progress | None = None) -> dict:
    """Train and save (the queue lock must be held). Returns a summary; raises AnimaError with a clear text."""
    lr, lr_text = preflight(req)  # again under the lock: the folder or the model may have changed meanwhile
    progress = progress or Progress()
    if progress.interrupt_requested:  # interrupted while waiting for the queue
        return {"name": req.name, "hash": None, "steps": 0, "interrupted": True, "final_loss": None,
                "log_directory": "", "seed": req.seed, "sweep": None}
    job = _Run.prepare(req, progress, lr_text)
    config, schedule = job.config(lr, lr_text)
    progress.begin(req.steps, job.state.step if job.state is not None else 0)
    result = _train_loop(job.examples, config, schedule, job.arch, job.state, job.on_step, job.on_save, job.folder,
                         job.request_record, job.should_stop)
    return job.finish(result)


@dataclass
class _Run:
    """One training run in the WebUI: its inputs made into examples, its log folder, and what it does per step."""

    req: TrainRequest
    progress: Progress
    arch: str
    size: int
    seed: int
    state: TrainState | None
    examples: list
    captions: list[str]
    n_images: int
    fingerprint: str
    folder: RunFolder
    request_record: dict

    @classmethod
    def prepare(cls, req: TrainRequest, progress: Progress, lr_text: str) -> _Run:
        arch = store.model_arch()
        size = req.resolution or (1024 if arch == "sdxl" else 512)
        state, record = None, {}
        if req.resume:
            state, record, _ = find_resume_state(req)
        seed = state.seed if state is not None else (req.seed if req.seed >= 0 else random.SystemRandom().randrange(2**31))
        progress.message = "encoding the references"
        shared.state.textinfo = "Anima: encoding the references"
        if req.images:
            examples, captions, n_images = image_examples(req, size), [req.prompt], len(req.images)
        else:
            examples, captions, n_images = dataset_examples(req, size, seed)
        fingerprint = data_fingerprint(examples)
        if state is not None:
            check_resume(req, record, fingerprint)
        folder = RunFolder(req)
        request_record = train_folder.request_record(req, size, fingerprint, seed)
        folder.save_settings({**request_record, "learn_rate": lr_text, **manage.model_record()})
        return cls(req, progress, arch, size, seed, state, examples, captions, n_images, fingerprint, folder,
                   request_record)

    def config(self, lr, lr_text: str) -> tuple[TrainConfig, DiffusionSchedule]:
        req = self.req
        init = manage.text_embedding(req.init_text) if req.init_text.strip() and self.state is None else None
        alphas_cumprod, parameterization = host.schedule_source()
        schedule = DiffusionSchedule(alphas_cumprod.detach().float().cpu(), parameterization)
        config = TrainConfig(
            steps=req.steps, lr=lr, lr_text=lr_text, n_tokens=req.n_tokens, seed=self.seed,
            weights=req.weights or None, batch_size=req.batch_size, grad_accumulation=req.grad_accumulation,
            # on_save is called every gcd(save_every, preview_every) steps; it does what falls on each
            save_every=math.gcd(req.save_every, req.preview_every),
            init=None if init is None else init[torch.arange(req.n_tokens) % init.shape[0]],
            precision="fp16" if host.unet_dtype() == torch.float16 and devices.device.type == "cuda" else "fp32",
            record={"prompt": self.captions[0] if len(self.captions) == 1 else f"{len(self.captions)} captions",
                    "references": len(req.images) or self.n_images, "resolution": self.size,
                    "init_text": req.init_text, "dataset": os.path.basename(req.dataset_dir.rstrip("/\\")),
                    "data": self.fingerprint, **manage.model_record()},
        )
        return config, schedule

    def on_step(self, done: int, loss: float, rate: float) -> None:
        self.progress.update(done, loss, rate)
        self.folder.log_loss(done, loss, rate)

    def on_save(self, saved: TrainState, context) -> None:
        context.name = self.req.name
        if self.req.save_every and saved.step % self.req.save_every == 0:
            context.save(self.folder.checkpoint_path(saved.step))
            self.folder.save_state(saved, self.request_record)
        if self.req.preview_every and saved.step % self.req.preview_every == 0:
            self.preview(context, saved.step)

    def preview(self, context, step: int) -> None:
        with vae_on_device():
            image = render_preview(context, self.req, self.size, self.captions[0])
        if image is not None:
            image.save(self.folder.image_path(step))
            self.progress.preview, self.progress.preview_path = image, self.folder.image_path(step)
            shared.state.assign_current_image(image)

    def should_stop(self) -> bool:
        return bool(shared.state.interrupted) or self.progress.interrupt_requested

    def finish(self, result) -> dict:
        """Save the context, its card image and the state; the last preview and the sweep; the run's summary."""
        req, context = self.req, result.context
        manage.save_new(context, req.name, overwrite=True)
        save_card_image(req, store.library().path(req.name))
        self.folder.save_state(result.state, self.request_record)
        if req.preview_every:
            self.preview(context, result.state.step)
        swept = None
        if req.sweep and not result.interrupted and not self.should_stop():  # a stop request also skips the sweep
            swept = render_sweep(context, req, self.size, self.captions[0], self.seed, self.folder,
                                 result.state.step, self.progress)
        return {"name": req.name, "hash": context.shorthash, "steps": result.state.step,
                "interrupted": result.interrupted, "final_loss": result.losses[-1] if result.losses else None,
                "log_directory": self.folder.path, "seed": self.seed, "sweep": swept}



def _train_loop(examples, config, schedule, arch, state, on_step, on_save, folder, request_record,
                should_stop) -> TrainResult:
    unet = store.current_unet()
    try:
        with host.trainable_unet(unet), _text_and_vae_offloaded(), torch.enable_grad():
            return train_context(_unet_apply, unet, examples, config, schedule, arch=arch, device=devices.device,
                                 state=state, on_step=on_step, on_save=on_save,
                                 should_stop=should_stop)
    except TrainingDiverged as e:
        folder.save_state(e.state, request_record)
        raise AnimaError(f"{e} The last good state is saved in {folder.path}; resume with a lower rate.") from None
    except torch.cuda.OutOfMemoryError:
        devices.torch_gc()
        raise AnimaError("out of GPU memory while training: try a smaller batch size, fewer gradient "
                         "accumulation steps' batch, or a lower resolution; the model is unchanged") from None



def train(req: TrainRequest, progress: Progress | None = None) -> dict:
    """Train under the queue lock with shared.state begun (the HTTP routes); refuses a second concurrent run."""
    preflight(req)  # a bad request is told so (400/409) even while another training runs
    with exclusive():
        return locked_run(req, progress)


def locked_run(req: TrainRequest, progress: Progress | None = None) -> dict:
    with call_queue.queue_lock:
        shared.state.begin(job="anima-train")
        if progress is not None:
            progress.started = True
        try:
            started = time.perf_counter()
            summary = run(req, progress)
            summary["seconds"] = round(time.perf_counter() - started, 2)
            return summary
        finally:
            shared.state.end()

