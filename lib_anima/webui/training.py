"""Training a context in the WebUI: inputs → examples (encoded once) → the core loop → files, previews, log.

Everything here runs with the host's queue lock held (generation and training never interleave on one model) and
reports through ``shared.state`` (progress bar, Interrupt). :func:`run` is the one function the tab, the jobs of
the HTTP API and the synchronous route all end in; it assumes the lock is held. :func:`train` takes the lock.

Host machinery reused: the textual-inversion dataset loader (images, ``.txt`` captions or file names, alpha as
loss weight, ``[name]``/``[filewords]`` templates from ``textual_inversion_templates``), the learn-rate schedule
syntax, txt2img processing for previews, the textual-inversion log directory layout and settings file. Where a host
no longer ships the loader, the schedule parser or the templates (Forge), the extension's own equivalents
(:mod:`lib_anima.dataset`, :mod:`lib_anima.schedule`, its ``textual_inversion_templates`` folder) give the same
results. What differs in reaching the model (Forge has no ``apply_model``, loads inference tensors, ...) is in
:mod:`lib_anima.webui.host`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from modules import call_queue, devices, paths, prompt_parser, shared
from PIL import Image, ImageOps, UnidentifiedImageError

from lib_anima import dataset as ti_dataset
from lib_anima.create import MAX_TOKENS
from lib_anima.errors import AnimaError, ArgumentError, ContextExistsError, TooLargeError, TrainingBusy
from lib_anima.fileio import atomic_write_bytes
from lib_anima.images import decode_base64, image_size
from lib_anima.names import check_directory, check_name
from lib_anima.schedule import schedule_pairs
from lib_anima.train import (
    DiffusionSchedule,
    TrainConfig,
    TrainExample,
    TrainingDiverged,
    TrainResult,
    TrainState,
    TrainStateFileError,
    train_context,
)
from lib_anima.webui import host, manage, store, sweep

log = logging.getLogger("anima")

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGES = 64
# All reference images of one request together (decoded RGBA: 256 MiB); checked from the headers before decoding.
MAX_TOTAL_PIXELS = 64 * 1024 * 1024
MAX_STEPS = 100_000
CAPTIONS_PER_IMAGE = 4  # template lines drawn per dataset image (each one text-encoded once, before the loop)
ENCODE_CHUNK = 8
STATE_FILE = "anima_state.safetensors"
REQUEST_FILE = "anima_request.json"
LOSS_FILE = "anima_loss.csv"
OWN_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "textual_inversion_templates")


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


@dataclass
class TrainRequest:
    """Every option of a training, shared by the tab and the HTTP API (see README "Training")."""

    name: str
    images: list[Image.Image] = field(default_factory=list)
    masks: list[Image.Image | None] = field(default_factory=list)  # white: learn, black: ignore
    dataset_dir: str = ""
    template: str = ""  # a file name in the host's textual_inversion_templates folder (dataset only)
    name_text: str = ""  # what [name] in a template becomes (the tokens do not live in the prompt)
    prompt: str = ""  # training prompt for reference images
    init_text: str = ""
    n_tokens: int = 4
    weights: str = ""  # "" = all sites, a preset (coarse/middle/fine/in/mid/out) or per-site numbers
    steps: int = 300
    learning_rate: str = "5e-3"  # the host's schedule syntax: "0.005:100, 1e-3:1000, 1e-5"
    batch_size: int = 1
    grad_accumulation: int = 1
    resolution: int = 0  # 0: the model's native size (SDXL 1024, else 512)
    flip: bool = True
    use_alpha: bool = False  # PNG alpha as loss weight (host option of the same name)
    seed: int = 0
    save_every: int = 0
    preview_every: int = 0
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_seed: int = -1
    sweep: bool = True  # after the run: the prompt at scales 0, 0.5, 1, 1.5 and 1 negative, one grid (sweep.py)
    log_directory: str = ""  # default: the host's textual_inversion log folder
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        check_name(self.name)
        if bool(self.images) == bool(self.dataset_dir.strip()):
            raise ArgumentError("give either reference images or a dataset directory (exactly one of them)")
        if len(self.images) > MAX_IMAGES:
            raise ArgumentError(f"give at most {MAX_IMAGES} reference images, got {len(self.images)}")
        if self.masks and len(self.masks) != len(self.images):
            raise ArgumentError(f"{len(self.masks)} masks for {len(self.images)} images; give one per image or none")
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("n_tokens", self.n_tokens, 1, MAX_TOKENS)
        _check_int("batch_size", self.batch_size, 1, 64)
        _check_int("grad_accumulation", self.grad_accumulation, 1, 256)
        _check_int("resolution", self.resolution, 0, 4096)
        if self.resolution and self.resolution % 8:
            raise ArgumentError(f"resolution must be a multiple of 8, got {self.resolution}")
        for name in ("save_every", "preview_every"):
            _check_int(name, getattr(self, name), 0, MAX_STEPS)
        _check_int("preview_steps", self.preview_steps, 1, 150)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ArgumentError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


# ---- inputs ----------------------------------------------------------------------------------------------------


def decode_images(datas: list[str | None], what: str) -> list[Image.Image | None]:
    """Base64 (optionally data-URL) images, each ``None`` kept; their mode is kept (alpha may be a loss weight).

    Every size is read from the file header first, and the count, each image's pixels and all of them together
    (MAX_TOTAL_PIXELS) are checked before any image is decoded.
    """
    if len(datas) > MAX_IMAGES:
        raise TooLargeError(f"give at most {MAX_IMAGES} {what}s, got {len(datas)}")
    raws = [None if d is None else decode_base64(d, f"{what} {i + 1}") for i, d in enumerate(datas)]
    total = 0
    for i, raw in enumerate(raws):
        if raw is not None:
            width, height, _ = image_size(raw, f"{what} {i + 1}", MAX_IMAGE_PIXELS, formats=None)
            total += width * height
    if total > MAX_TOTAL_PIXELS:
        raise TooLargeError(f"the {what}s have {total} pixels together; at most {MAX_TOTAL_PIXELS} are accepted "
                            f"(they are resized to the training resolution anyway)")
    return [None if raw is None else _opened_image(raw, f"{what} {i + 1}") for i, raw in enumerate(raws)]


def _opened_image(raw: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ArgumentError(f"{what} could not be decoded (PNG, JPEG or WebP expected)") from None


def prompt_from_infotext(image: Image.Image) -> str:
    """The prompt a WebUI image was made with (its PNG ``parameters`` text), or ''."""
    text = (getattr(image, "info", None) or {}).get("parameters")
    if not isinstance(text, str) or not text.strip():
        return ""
    from modules import infotext_utils

    return str(infotext_utils.parse_generation_parameters(text).get("Prompt", "")).strip()


def learn_rate(text: str | float, steps: int) -> tuple[Callable[[int], float], str]:
    """The host's learn-rate schedule syntax as ``step → rate`` (checked up front for every step)."""
    text = str(text).strip()
    try:
        pairs = _schedule_pairs(text, steps)
    except Exception as e:  # the host raises a bare Exception with a good message
        raise ArgumentError(f"learning rate {text!r}: {e}") from None
    ends = [end for _, end in pairs]
    rates = [rate for rate, _ in pairs]

    def rate_at(step: int) -> float:
        for rate, end in zip(rates, ends, strict=True):
            if step < end:
                return rate
        return rates[-1]

    return rate_at, text


def _schedule_pairs(text: str, steps: int) -> list[tuple[float, int]]:
    """The host's own parser where it has one, else the same syntax read by :mod:`lib_anima.schedule`."""
    try:
        from modules.textual_inversion.learn_schedule import LearnScheduleIterator
    except ImportError:
        return schedule_pairs(text, steps)
    return list(LearnScheduleIterator(text, steps))


def _square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square and resize (keeps the mode, so alpha survives)."""
    return ImageOps.fit(image, (size, size), Image.LANCZOS)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype="float32") / 255.0).permute(2, 0, 1)


def _mask_tensor(mask: Image.Image, size: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A mask image → ``[1, h, w]`` weights in [0, 1] at latent resolution (white = learn)."""
    gray = _square(mask, size).convert("L").resize((latent_hw[1], latent_hw[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(gray, dtype="float32") / 255.0).unsqueeze(0)


def _alpha_mask(image: Image.Image, size: int, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    if "A" not in image.getbands():
        return None
    return _mask_tensor(_square(image, size).getchannel("A"), size, latent_hw)


def _encode_images(pixels: list[torch.Tensor]) -> torch.Tensor:
    """VAE latents of ``[3, H, W]`` images in [0, 1], the distribution's mean (deterministic, so resume matches)."""
    out = []
    with torch.no_grad(), devices.autocast():
        for px in pixels:
            x = (px.unsqueeze(0) * 2 - 1).to(devices.device, devices.dtype_vae)
            out.append(host.encode_latents(x)[0].detach().float().cpu())
    return torch.stack(out)


def _encode_texts(texts: list[str], size: int) -> list:
    """Text conditioning of each text (SDXL: a dict with the pooled vector and size conditioning)."""
    model = shared.sd_model
    conds: list = []
    with torch.no_grad(), devices.autocast():
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start:start + ENCODE_CHUNK]
            cond = model.get_learned_conditioning(prompt_parser.SdConditioning(chunk, width=size, height=size))
            for i in range(len(chunk)):
                if isinstance(cond, dict):
                    conds.append({k: v[i].detach().float().cpu() for k, v in cond.items()})
                else:
                    conds.append(cond[i].detach().float().cpu())
    return conds


def image_examples(req: TrainRequest, size: int) -> list[TrainExample]:
    """Reference images (+ masks or alpha), centre-cropped to ``size``, and their flips when asked."""
    squares = [_square(img, size) for img in req.images]
    latents = _encode_images([_pixels(s) for s in squares])
    flipped = _encode_images([torch.flip(_pixels(s), dims=[2]) for s in squares]) if req.flip else None
    hw = (latents.shape[-2], latents.shape[-1])
    (cond,) = _encode_texts([req.prompt], size)
    examples = []
    for i, image in enumerate(req.images):
        mask = req.masks[i] if req.masks else None
        weight = _mask_tensor(mask, size, hw) if mask is not None else (_alpha_mask(image, size, hw) if req.use_alpha else None)
        examples.append(TrainExample(latent=latents[i], cond=cond, mask=weight))
        if flipped is not None:
            examples.append(TrainExample(latent=flipped[i], cond=cond,
                                         mask=None if weight is None else torch.flip(weight, dims=[2])))
    return examples


def allowed_dataset_roots() -> list[str]:
    configured = getattr(shared.cmd_opts, "anima_dataset_roots", None)
    roots = configured.split(os.pathsep) if configured else [paths.data_path]
    return [os.path.realpath(r) for r in roots if r.strip()]


def check_dataset_dir(path: str) -> str:
    """The dataset folder, resolved; refused outside the allowed roots (``--anima-dataset-roots``)."""
    real = check_directory(path, allowed_dataset_roots(), what="dataset directory",
                           outside_hint="start the WebUI with --anima-dataset-roots to allow more")
    if not os.path.isdir(real):
        raise ArgumentError(f"the dataset directory {path!r} does not exist")
    return real


def templates() -> dict[str, str]:
    """Template files by name: the host's ``textual_inversion_templates`` folder over the extension's own (which
    serve where the host has none, as on Forge)."""
    found: dict[str, str] = {}
    for folder in (OWN_TEMPLATES, getattr(shared.cmd_opts, "textual_inversion_templates_dir", None)):
        if folder and os.path.isdir(folder):
            for root, _, files in os.walk(folder):  # as the host lists them
                found.update({fn: os.path.join(root, fn) for fn in files})
    return found


def template_path(name: str) -> str:
    found = templates()
    chosen = name or ("subject_filewords.txt" if "subject_filewords.txt" in found else next(iter(found), ""))
    if chosen not in found:
        raise ArgumentError(f"unknown template {name!r}; the host has: {', '.join(sorted(found))}")
    return found[chosen]


def dataset_examples(req: TrainRequest, size: int, seed: int) -> tuple[list[TrainExample], list[str], int]:
    """The textual-inversion dataset (captions, [name]/[filewords], alpha weights) → examples.

    Each image gets up to CAPTIONS_PER_IMAGE template lines drawn with the run's seed, so every caption is
    encoded once before the loop and a resumed run sees the same texts. Flips are the flipped latents.
    """
    root = check_dataset_dir(req.dataset_dir)
    entries, create_text = _read_dataset(req, root, size)
    if not entries:
        raise ArgumentError(f"dataset {req.dataset_dir!r} has no readable images")
    if len(entries) > MAX_IMAGES * 16:
        raise ArgumentError(f"dataset {req.dataset_dir!r} has {len(entries)} images; at most {MAX_IMAGES * 16}")
    captions, owners = [], []
    for index, (filename_text, _, _) in enumerate(entries):
        for text in _captions(create_text, filename_text, seed, index):
            captions.append(text)
            owners.append(index)
    conds = _encode_texts(captions, size)
    examples = []
    for index, cond in zip(owners, conds, strict=True):
        _, latent, weight = entries[index]
        examples.append(TrainExample(latent=latent, cond=cond, mask=weight))
        if req.flip:
            examples.append(TrainExample(latent=torch.flip(latent, dims=[2]), cond=cond,
                                         mask=None if weight is None else torch.flip(weight, dims=[2])))
    return examples, sorted(set(captions)), len(entries)


DatasetEntries = list[tuple[str, torch.Tensor, "torch.Tensor | None"]]  # (filewords, latent [C,h,w], weight [1,h,w])


def _read_dataset(req: TrainRequest, root: str, size: int) -> tuple[DatasetEntries, Callable[[str], str]]:
    """The host's own textual-inversion loader where it has one, else :mod:`lib_anima.dataset` (the same)."""
    try:
        from modules.textual_inversion.dataset import PersonalizedBase
    except ImportError:
        return _own_dataset(req, root, size)
    try:
        dataset = PersonalizedBase(
            data_root=root, width=size, height=size, repeats=1, flip_p=0.0, placeholder_token=req.name_text,
            model=shared.sd_model, device=devices.device, template_file=template_path(req.template),
            batch_size=1, gradient_step=1, latent_sampling_method="deterministic", use_weight=req.use_alpha,
        )
    except AssertionError as e:
        raise ArgumentError(f"dataset {req.dataset_dir!r}: {e}") from None
    entries = [(e.filename_text, e.latent_sample.float(), None if e.weight is None else e.weight[:1].float())
               for e in dataset.dataset]
    return entries, dataset.create_text


def _own_dataset(req: TrainRequest, root: str, size: int) -> tuple[DatasetEntries, Callable[[str], str]]:
    from modules import images

    if not os.listdir(root):
        raise ArgumentError(f"dataset {req.dataset_dir!r}: Dataset directory is empty")
    templates_ = ti_dataset.Templates(template_path(req.template), req.name_text)
    found = ti_dataset.read_images(
        root, size, req.use_alpha, opener=getattr(images, "read", Image.open),
        word_regex=getattr(shared.opts, "dataset_filename_word_regex", ""),
        join=getattr(shared.opts, "dataset_filename_join_string", " "),
    )
    entries: DatasetEntries = []
    for item in found:
        if shared.state.interrupted:
            raise AnimaError("interrupted while reading the dataset")
        pixels = ti_dataset.pixels(item.image).to(device=devices.device, dtype=torch.float32)
        with torch.no_grad(), devices.autocast():
            latent = host.encode_latents(pixels.unsqueeze(0)).squeeze().to(devices.cpu).float()
        weight = ti_dataset.alpha_weight(item.alpha, tuple(latent.shape))[:1].float() if req.use_alpha else None
        entries.append((item.caption, latent, weight))
    return entries, templates_.create_text


def _captions(create_text: Callable[[str], str], filename_text: str, seed: int, index: int) -> list[str]:
    """Distinct captions from the host's template expansion, drawn with a fixed seed (the host uses `random`)."""
    saved = random.getstate()
    try:
        random.seed(f"{seed}:{index}")
        texts = [create_text(filename_text) for _ in range(CAPTIONS_PER_IMAGE * 4)]
    finally:
        random.setstate(saved)
    distinct = list(dict.fromkeys(" ".join(t.split()) for t in texts))
    return distinct[:CAPTIONS_PER_IMAGE]


def data_fingerprint(examples: list[TrainExample]) -> str:
    """A hash of what is trained on, so a resume can refuse different data."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.latent.numpy().tobytes())
        cond = ex.cond if isinstance(ex.cond, dict) else {"crossattn": ex.cond}
        for key in sorted(cond):
            digest.update(key.encode())
            digest.update(cond[key].numpy().tobytes())
        if ex.mask is not None:
            digest.update(ex.mask.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- the run's folder: previews, checkpoints, loss log, resume state --------------------------------------------


def log_root(req: TrainRequest) -> str:
    return os.path.abspath(req.log_directory or os.path.join(paths.data_path, "textual_inversion"))


class RunFolder:
    """``<log>/<date>/<name>/``: the host's textual-inversion layout (images/, contexts/, loss CSV, settings)."""

    def __init__(self, req: TrainRequest):
        self.name = req.name
        self.path = os.path.join(log_root(req), datetime.datetime.now().strftime("%Y-%m-%d"), req.name)
        os.makedirs(self.path, exist_ok=True)

    def sweep_path(self, step: int) -> str:
        return os.path.join(self.path, f"anima_sweep-{step}.png")

    def image_path(self, step: int) -> str:
        os.makedirs(os.path.join(self.path, "images"), exist_ok=True)
        return os.path.join(self.path, "images", f"anima-{self.name}-{step}.png")

    def checkpoint_path(self, step: int) -> str:
        os.makedirs(os.path.join(self.path, "contexts"), exist_ok=True)
        return os.path.join(self.path, "contexts", f"{self.name}-{step}.safetensors")

    def log_loss(self, step: int, loss: float, lr: float) -> None:
        path = os.path.join(self.path, LOSS_FILE)
        new = not os.path.exists(path)
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "loss", "learn_rate"])
            writer.writerow([step, f"{loss:.7f}", f"{lr:g}"])

    def save_state(self, state: TrainState, request: dict) -> None:
        state.save(os.path.join(self.path, STATE_FILE))
        atomic_write_bytes(os.path.join(self.path, REQUEST_FILE), json.dumps(request, indent=2).encode())

    def save_settings(self, settings: dict) -> None:
        if not getattr(shared.opts, "save_training_settings_to_txt", True):
            return
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        atomic_write_bytes(os.path.join(self.path, f"anima-settings-{stamp}.json"),
                           json.dumps(settings, indent=2, default=str).encode())


def find_resume_state(req: TrainRequest) -> tuple[TrainState, dict, str]:
    """The newest saved state of a run named ``req.name`` under the log folder, with its request record."""
    pattern = os.path.join(glob.escape(log_root(req)), "*", glob.escape(req.name), STATE_FILE)
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise ArgumentError(f"nothing to resume: no saved training state for {req.name!r} under {log_root(req)}")
    path = found[-1]
    try:
        state = TrainState.load(path)
    except TrainStateFileError as e:
        raise ArgumentError(f"the saved training state {path} cannot be used: {e}") from None
    record_path = os.path.join(os.path.dirname(path), REQUEST_FILE)
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    return state, record, path


# ---- progress -----------------------------------------------------------------------------------------------------


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
        with _vae_on_device():
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


def _request_record(req: TrainRequest, size: int, fingerprint: str, seed: int) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(req).items() if k not in ("images", "masks")}
    fields.update(images=len(req.images), masks=sum(m is not None for m in req.masks), resolution=size,
                  seed=seed, data=fingerprint)
    return fields


def _check_resume(req: TrainRequest, record: dict, fingerprint: str) -> None:
    for key in ("n_tokens", "weights", "batch_size", "grad_accumulation"):
        if key in record and record[key] != getattr(req, key):
            raise ArgumentError(f"cannot resume: {key} was {record[key]!r} in the saved run, now {getattr(req, key)!r}")
    if record.get("data") and record["data"] != fingerprint:
        raise ArgumentError("cannot resume: the training images, masks or captions differ from the saved run's")


def preflight(req: TrainRequest) -> tuple[Callable[[int], float], str]:
    """Every check a training makes before it starts, so a request is refused before it is queued or a job
    exists: the fields, the name (taken without overwrite/resume: 409), the learning-rate schedule, the loaded
    model, the saved state to resume, the dataset folder and template. Returns the parsed schedule."""
    req.validate()
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
            _check_resume(req, record, fingerprint)
        folder = RunFolder(req)
        request_record = _request_record(req, size, fingerprint, seed)
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
        with _vae_on_device():
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
        _save_preview_image(req, store.library().path(req.name), self.progress)
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


@contextlib.contextmanager
def _vae_on_device():
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


def _save_preview_image(req: TrainRequest, context_path: str, progress: Progress) -> None:
    """The reference (or the dataset's first image) as the card's preview, like the host's embeddings."""
    stem = os.path.splitext(context_path)[0]
    image = req.images[0] if req.images else None
    if image is None:
        return
    data = io.BytesIO()
    image.convert("RGB").save(data, format="PNG")
    atomic_write_bytes(stem + ".png", data.getvalue())


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
