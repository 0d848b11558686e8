"""The scale sweep: one prompt and one seed rendered without the context and at several scales, as one labelled row.

Used after a training run (the run's log folder, the Anima tab, the jobs API) and by the Contexts list's Compare
button. Every image goes through the host's normal txt2img processing (what a user would get with the same
settings); the scale-0 cell applies nothing, so it is the plain image. The caller holds the queue lock and has
``shared.state`` begun (the host's Interrupt stops the sweep between and inside cells).
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass, field

from modules import shared
from PIL import Image, PngImagePlugin

from lib_anima import inject
from lib_anima.context import ReferenceContext
from lib_anima.errors import AnimaError
from lib_anima.fileio import atomic_write_bytes
from lib_anima.grid import font_size, labelled_row
from lib_anima.inject import Activation
from lib_anima.webui import host, store

# (scale, mode) per cell: without, half, as trained, beyond, and pushed away from the reference
CELLS: tuple[tuple[float, str], ...] = ((0.0, "positive"), (0.5, "positive"), (1.0, "positive"),
                                        (1.5, "positive"), (1.0, "negative"))
SAMPLER = "Euler a"
CFG_SCALE = 7.0


@dataclass
class SweepSettings:
    """What every cell shares; the seed is a concrete number (one seed for all cells)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    width: int = 512
    height: int = 512


@dataclass
class Sweep:
    grid: Image.Image
    labels: list[str]
    settings: SweepSettings
    seconds: float
    path: str = ""
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The JSON-able description (the jobs API's ``result.sweep``)."""
        return {"path": self.path, "labels": self.labels, "seconds": round(self.seconds, 2),
                **asdict(self.settings), **self.extra}


def label(scale: float, mode: str) -> str:
    return f"scale {scale:g}" + (" negative" if mode == "negative" else "")


def check_fits(context: ReferenceContext) -> None:
    """Refuse a context for another model up front (an AnimaError naming the mismatch), before any cell."""
    unet = store.current_unet()
    if unet is None:
        raise AnimaError("no model is loaded")
    inject.check_fits(unet, Activation(context, 1.0, "positive"))


def render_image(context: ReferenceContext, scale: float, mode: str, settings: SweepSettings) -> Image.Image | None:
    """One txt2img image with the context at `scale` (none at 0), through the host's processing."""
    from modules import processing

    from lib_anima.webui import generation

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=settings.prompt, negative_prompt=settings.negative_prompt,
        steps=settings.steps, seed=settings.seed, width=settings.width, height=settings.height,
        cfg_scale=CFG_SCALE, sampler_name=SAMPLER,
        do_not_save_grid=True, do_not_save_samples=True, do_not_reload_embeddings=True,
    )
    if scale != 0.0:  # scale 0 is "without": no hook at all, so the cell is exactly the plain image
        generation.add_in_memory(p, Activation(context, scale, mode))
    if host.is_fork():  # the forks read p.scripts (reForge: every cell) and patch their UNet only in a script callback
        p.scripts = _PreviewScripts()
    saved = (shared.state.job_count, shared.state.job_no, shared.state.textinfo)  # the caller's progress display
    try:
        with contextlib.closing(p):
            processed = processing.process_images(p)
    finally:
        shared.state.job_count, shared.state.job_no, shared.state.textinfo = saved
    return processed.images[0] if processed.images else None


class _PreviewScripts:
    """A training preview's stand-in for the host's script runner on the forks: the sampling-pass callback
    applies the context; every other callback does nothing (no other script takes part in a preview)."""

    alwayson_scripts: list = []  # read directly by reForge's processing
    selectable_scripts: list = []
    scripts: list = []

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        from lib_anima.webui import generation

        generation.before_sampling(p)

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def render(context: ReferenceContext, settings: SweepSettings) -> Sweep | None:
    """Every cell of :data:`CELLS` as one labelled grid; None when interrupted."""
    from modules import images

    check_fits(context)
    started = time.perf_counter()
    cells = []
    for scale, mode in CELLS:
        if shared.state.interrupted:
            return None
        shared.state.textinfo = f"Anima: scale sweep, {label(scale, mode)}"
        image = render_image(context, scale, mode, settings)
        if image is None or shared.state.interrupted:
            return None
        cells.append(image)
    labels = [label(scale, mode) for scale, mode in CELLS]
    grid = labelled_row(cells, labels, images.get_font(font_size(settings.width, settings.height)))
    return Sweep(grid, labels, settings, time.perf_counter() - started,
                 extra={"context": context.name, "hash": context.shorthash})


def infotext(sweep: Sweep) -> str:
    """The grid's PNG text, in the host's infotext layout (PNG Info reads prompt, seed and size back)."""
    s = sweep.settings
    negative = f"\nNegative prompt: {s.negative_prompt}" if s.negative_prompt else ""
    name = sweep.extra.get("context", "")
    return (f"{s.prompt}{negative}\nSteps: {s.steps}, Sampler: {SAMPLER}, CFG scale: {CFG_SCALE:g}, Seed: {s.seed}, "
            f"Size: {s.width}x{s.height}, Anima sweep: \"name: {name}, scales: {', '.join(sweep.labels)}\"")


def save(sweep: Sweep, path: str) -> str:
    """Write the grid as PNG with its infotext (atomically); returns the path (also set on the sweep)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(sweep))
    data = io.BytesIO()
    sweep.grid.save(data, format="PNG", pnginfo=info)
    atomic_write_bytes(path, data.getvalue())
    sweep.path = path
    return path
