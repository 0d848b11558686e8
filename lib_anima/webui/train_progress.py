"""What a running training shows: its progress (the API polls it, the tab sees it through ``shared.state``),
previews, the scale sweep after the run and the card image."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from dataclasses import dataclass, field

from modules import devices, shared
from PIL import Image

from lib_anima.fileio import atomic_write_bytes
from lib_anima.webui import sweep
from lib_anima.webui.train_folder import RunFolder
from lib_anima.webui.train_inputs import TrainRequest

log = logging.getLogger("anima")


@dataclass
class Progress:
    """What a job reports while it runs (the API polls it; the tab shows it through shared.state)."""

    steps: int = 0
    step: int = 0
    loss: float | None = None
    learn_rate: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    preview: Image.Image | None = None
    preview_path: str = ""
    sweep: Image.Image | None = None  # the scale sweep's grid, once rendered
    message: str = ""
    started: bool = False  # the queue lock is held and the run began
    interrupt_requested: bool = False
    _started: float = field(default_factory=time.perf_counter)
    first_step: int = 0  # where a resumed run starts (it/s counts only this run's steps)

    def begin(self, steps: int, first_step: int) -> None:
        """The loop starts: `steps` in all, from `first_step`; the host's progress bar follows."""
        self.steps, self.first_step, self.message = steps, first_step, "training"
        shared.state.job_count = steps
        shared.state.job_no = first_step

    def update(self, step: int, loss: float, lr: float) -> None:
        self.step, self.loss, self.learn_rate = step, loss, lr
        elapsed = time.perf_counter() - self._started
        done = step - self.first_step
        if done > 0 and elapsed > 0:
            self.it_per_s = done / elapsed
            self.eta_s = (self.steps - step) / self.it_per_s
        shared.state.job_no = step
        shared.state.textinfo = self.text()

    def text(self) -> str:
        parts = [f"Anima: step {self.step}/{self.steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.5f}")
        if self.it_per_s:
            parts.append(f"{self.it_per_s:.2f} it/s, ETA {self.eta_s:.0f} s")
        return ", ".join(parts)


# ---- previews -----------------------------------------------------------------------------------------------------


def preview_settings(req: TrainRequest, size: int, default_prompt: str, seed: int) -> sweep.SweepSettings:
    """What previews and the sweep render: the preview prompt (or the training prompt) at the training size."""
    return sweep.SweepSettings(prompt=req.preview_prompt or default_prompt, negative_prompt=req.preview_negative_prompt,
                               seed=seed, steps=req.preview_steps, width=size, height=size)


def render_preview(context, req: TrainRequest, size: int, default_prompt: str) -> Image.Image | None:
    """One txt2img image with the context applied (positive, scale 1), through the host's normal processing."""
    settings = preview_settings(req, size, default_prompt, req.preview_seed)
    return sweep.render_image(context, 1.0, "positive", settings)


def render_sweep(context, req: TrainRequest, size: int, default_prompt: str, seed: int, folder: RunFolder,
                 step: int, progress: Progress) -> dict | None:
    """The scale sweep after a run, saved in its log folder; its record, None when interrupted, or ``{"error"}``
    when it failed: the context is saved by now, and a sweep that fails (out of memory at 1024 px) must not lose it."""
    progress.message = "scale sweep"
    # one seed for every cell: the preview seed, or the run's own when that is random (-1)
    settings = preview_settings(req, size, default_prompt, req.preview_seed if req.preview_seed >= 0 else seed)
    try:
        with vae_on_device():
            result = sweep.render(context, settings)
    except Exception as e:  # noqa: BLE001 - reported in the result and the log, the run itself succeeded
        log.exception("anima: the scale sweep after training %s failed", req.name)
        devices.torch_gc()
        return {"error": f"{type(e).__name__}: {e}"}
    if result is None:
        return None
    sweep.save(result, folder.sweep_path(step))
    progress.sweep = result.grid
    shared.state.assign_current_image(result.grid)
    return result.record()



@contextlib.contextmanager
def vae_on_device():
    if (getattr(shared.opts, "unload_models_when_training", False) and devices.device.type != "cpu"
            and getattr(shared.sd_model, "cond_stage_model", None) is not None):
        shared.sd_model.first_stage_model.to(devices.device)
        shared.sd_model.cond_stage_model.to(devices.device)
        try:
            yield
        finally:
            shared.sd_model.first_stage_model.to(devices.cpu)
            shared.sd_model.cond_stage_model.to(devices.cpu)
    else:
        yield


def save_card_image(req: TrainRequest, context_path: str) -> None:
    """The reference (or the dataset's first image) as the card's preview, like the host's embeddings."""
    stem = os.path.splitext(context_path)[0]
    image = req.images[0] if req.images else None
    if image is None:
        return
    data = io.BytesIO()
    image.convert("RGB").save(data, format="PNG")
    atomic_write_bytes(stem + ".png", data.getvalue())

