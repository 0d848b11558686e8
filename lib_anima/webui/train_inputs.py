"""A training's inputs: the request (options + decoded images) and what the run trains on.

Reference images are decoded from base64 with every size checked from its header first; a dataset is read with
the host's textual-inversion loader (captions, ``[name]``/``[filewords]`` templates, alpha as loss weight) or,
where the host has none (Forge), :mod:`lib_anima.dataset`; the learning-rate text is the host's schedule syntax.
Everything becomes :class:`lib_anima.train.TrainExample` (VAE latents and text conditioning, encoded once).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from modules import devices, paths, prompt_parser, shared
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from lib_anima import dataset as ti_dataset
from lib_anima.errors import AnimaError, ArgumentError, TooLargeError
from lib_anima.images import decode_base64, image_size
from lib_anima.names import check_directory, check_name
from lib_anima.options import MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_TOTAL_PIXELS, TrainOptions, parse
from lib_anima.schedule import schedule_pairs
from lib_anima.train import TrainExample
from lib_anima.webui import host

CAPTIONS_PER_IMAGE = 4  # template lines drawn per dataset image (each one text-encoded once, before the loop)
ENCODE_CHUNK = 8
OWN_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "textual_inversion_templates")


class TrainRequest(TrainOptions):
    """The options with the reference images decoded: what :func:`lib_anima.webui.training.run` takes."""

    images: list[Any] = Field(default_factory=list, description="PIL images")
    masks: list[Any] = Field(default_factory=list, description="one PIL image or None per image; white: learn")
    log_directory: str = Field("", description="default: the host's textual_inversion log folder")

    def check(self) -> None:
        check_name(self.name)
        self.check_inputs(len(self.images), len(self.masks))


def request_from(options: dict, images: list, masks: list) -> TrainRequest:
    """Options and decoded reference images → the request (the API and the tab both end here); with images and an
    empty prompt, the prompt is the first image's infotext prompt."""
    if images and not str(options.get("prompt") or "").strip():
        options = {**options, "prompt": prompt_from_infotext(images[0])}
    return parse(TrainRequest, {**options, "images": images, "masks": masks})


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

