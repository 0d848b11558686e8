"""The toy text-to-image model: a word-embedding conditioner and a small pixel-space UNet from the host's own ldm.

The UNet is A1111's ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (the SD1.x code) with tiny widths:
real ``SpatialTransformer`` blocks whose ``attn2`` cross-attention modules are the sites the extension hooks.
It works on the 32×32 RGB picture rearranged losslessly into 12 channels of 16×16 (``pixel_unshuffle``; no
VAE), which makes it about four times cheaper on a CPU. Cross-attention sits at 8×8 and 4×4 (7 sites).

The conditioner is a learned embedding table: a caption becomes its words' vectors padded to
:data:`~benchmarks.quality.data.SEQ_LEN` with the ``<pad>`` vector (the empty caption = unconditional). There is
no text transformer, so a textual-inversion vector goes straight into the cross-attention keys and values.

Pre-training is v-prediction (as SD 2.x 768-v) on a linear DDPM schedule: with eps-prediction this small,
briefly trained model makes x0 estimates at high noise that are pure noise (eps errors are amplified by
1/√ᾱ), and DDIM samples stay grainy; v keeps them bounded. AdamW with a short warm-up and a cosine decay, and an
EMA of the weights (the EMA is what is used).
Everything is seeded; the trained model is cached under ``benchmarks/.cache/quality``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks.quality import data
from lib_anima.inject import Activation, InjectionSession, RowTracker
from lib_anima.train import DiffusionSchedule

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(REPO, "benchmarks", ".cache", "quality")
FACTOR = 2  # pixel_unshuffle factor: 3×32×32 ↔ 12×16×16
LATENT_SHAPE = (3 * FACTOR * FACTOR, data.SIZE // FACTOR, data.SIZE // FACTOR)

# A word's vectors: a vocabulary word, or a learned word given as a [n, dim] tensor (textual inversion).
Word = str | torch.Tensor


@dataclass(frozen=True)
class ModelConfig:
    context_dim: int = 64
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    attention_resolutions: tuple[int, ...] = (2, 4)
    num_head_channels: int = 16
    timesteps: int = 1000
    parameterization: str = "v"
    version: int = 1  # bump when the model code changes in a way the cache key cannot see


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    ema: float = 0.995
    bank: int = 12000  # pictures rendered once; captions (with dropout) drawn afresh every step
    seed: int = 0


def host_ldm() -> None:
    """Put the host's ldm on sys.path (the same lookup as the core tests: $WEBUI_SOURCES/stable-diffusion-webui)."""
    from tests import unets

    unets.import_host_modules()


class ToyModel(torch.nn.Module):
    """Embedding conditioner + ldm UNet; ``self.unet`` is what the extension hooks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        host_ldm()
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        self.config = config
        self.embed = torch.nn.Embedding(len(data.VOCAB), config.context_dim)
        c = LATENT_SHAPE[0]
        self.unet = UNetModel(
            image_size=LATENT_SHAPE[1], in_channels=c, out_channels=c, model_channels=config.model_channels,
            attention_resolutions=list(config.attention_resolutions), num_res_blocks=1,
            channel_mult=list(config.channel_mult), num_head_channels=config.num_head_channels,
            use_spatial_transformer=True, transformer_depth=1, context_dim=config.context_dim,
            use_checkpoint=False, legacy=False,
        )

    def encode(self, captions: Sequence[Sequence[Word]]) -> torch.Tensor:
        """Captions → ``[B, SEQ_LEN, dim]``; a tensor in a caption is inserted as its own vectors."""
        return torch.stack([self._encode_one(c) for c in captions])

    def _encode_one(self, caption: Sequence[Word]) -> torch.Tensor:
        parts = []
        for word in caption:
            if isinstance(word, torch.Tensor):
                parts.append(word.reshape(-1, self.config.context_dim).to(self.embed.weight.dtype))
            else:
                parts.append(self.embed.weight[data.VOCAB.index(word)].unsqueeze(0))
        used = sum(p.shape[0] for p in parts)
        if used > data.SEQ_LEN:
            raise ValueError(f"caption of {used} vectors is longer than {data.SEQ_LEN}")
        pad = self.embed.weight[data.VOCAB.index(data.PAD)].unsqueeze(0).expand(data.SEQ_LEN - used, -1)
        return torch.cat([*parts, pad], 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's prediction (v, or eps) for latents ``x`` ``[B, 12, 16, 16]``."""
        return self.unet(x, t, context=cond)


def to_latent(images: torch.Tensor) -> torch.Tensor:
    return F.pixel_unshuffle(images, FACTOR)


def to_image(latents: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(latents, FACTOR)


def schedule(config: ModelConfig) -> DiffusionSchedule:
    betas = torch.linspace(1e-4, 0.02, config.timesteps, dtype=torch.float64)
    return DiffusionSchedule(torch.cumprod(1 - betas, 0), config.parameterization)


# ---- pre-training ----------------------------------------------------------------------------------------------


def data_fingerprint() -> str:
    """A hash of a few rendered pictures and the vocabulary: the cache notices any change to the data."""
    h = hashlib.sha256("|".join(data.VOCAB).encode())
    for i, scene in enumerate(data.all_scenes()[::97]):
        h.update(data.render(scene, i).tobytes())
    return h.hexdigest()[:16]


def cache_key(*parts: object) -> str:
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrain(
    config: ModelConfig, train: PretrainConfig, log: Callable[[str], None] = print,
    on_snapshot: Callable[[int, ToyModel], None] | None = None,
) -> tuple[ToyModel, dict]:
    """Train the base model on every scene but the held-out character; returns the EMA model and a record."""
    torch.manual_seed(train.seed)
    model = ToyModel(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    sched = schedule(config)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.0, fused=True)
    losses, start = [], time.perf_counter()
    bank = data.sample_batch(data.training_scenes(), train.bank, train.seed, -1, dropout=False)
    latents = to_latent(bank.images)
    log(f"  rendered {train.bank} training pictures ({time.perf_counter() - start:.0f} s)")
    gen = torch.Generator().manual_seed(train.seed)
    for step in range(train.steps):
        lr = train.lr * min(1.0, (step + 1) / train.warmup) * 0.5 * (1 + math.cos(math.pi * step / train.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(0, train.bank, (train.batch_size,), generator=gen)
        rng = data.caption_rng(train.seed, step)
        words = [data.dropped_caption(bank.scenes[int(i)], rng) for i in pick]
        x0 = latents[pick]
        t = torch.randint(0, config.timesteps, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = model(sched.noisy(x0, noise, t), t, model.encode(words))
        loss = ((pred - sched.target(x0, noise, t)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(train.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss.detach()))
        if on_snapshot is not None:
            on_snapshot(step + 1, ema)
        if (step + 1) % 100 == 0 or step + 1 == train.steps:
            log(f"  pretrain step {step + 1}/{train.steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    record = {"steps": train.steps, "seconds": round(time.perf_counter() - start, 1), "final_loss": losses[-1],
              "threads": torch.get_num_threads(),
              "loss_last_100": sum(losses[-100:]) / len(losses[-100:])}
    return ema.eval(), record


def load_or_pretrain(
    config: ModelConfig, train: PretrainConfig, log: Callable[[str], None] = print
) -> tuple[ToyModel, dict]:
    key = cache_key(config, train, data_fingerprint())
    path = os.path.join(CACHE, f"base-{key}.pt")
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = ToyModel(config)
        model.load_state_dict(saved["state"])
        log(f"base model from cache {os.path.relpath(path, REPO)}")
        return model.eval().requires_grad_(False), dict(json.loads(saved["record"]), cached=True)
    log(f"pre-training the base model ({train.steps} steps of {train.batch_size}); cached afterwards")
    model, record = pretrain(config, train, log)
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"state": model.state_dict(), "record": json.dumps(record)}, tmp)
    os.replace(tmp, path)
    return model.requires_grad_(False), dict(record, cached=False)


# ---- sampling --------------------------------------------------------------------------------------------------


@dataclass
class SampleSpec:
    """What to draw: captions for the conditional and unconditional rows, and one seed per picture."""

    cond: list[list[Word]]
    uncond: list[list[Word]]
    seeds: list[int]


@torch.no_grad()
def sample(
    model: ToyModel,
    spec: SampleSpec,
    activations: Sequence[Activation] = (),
    steps: int = 20,
    guidance: float = 3.0,
) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance; `activations` are injected exactly as in the WebUI.

    Each step is one UNet call on ``[cond rows; uncond rows]``; a :class:`RowTracker` is told so before the
    call, which is how the extension's hooks know which rows are conditional (positive mode) or not (negative).
    Returns pictures ``[N, 3, 32, 32]`` in [-1, 1].
    """
    n = len(spec.seeds)
    cond, uncond = model.encode(spec.cond), model.encode(spec.uncond)
    context = torch.cat([cond, uncond])
    x = torch.stack([torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(s)) for s in spec.seeds])
    alphas = schedule(model.config).alphas_cumprod.float()
    ts = torch.linspace(model.config.timesteps - 1, 0, steps).round().long()
    tracker = RowTracker()
    with InjectionSession(model.unet, list(activations), tracker):
        for i, t in enumerate(ts):
            tracker.begin_step(n, 2 * n, i, steps)
            out_c, out_u = model(torch.cat([x, x]), t.repeat(2 * n), context).chunk(2)
            out = out_u + guidance * (out_c - out_u)
            a = alphas[t]
            a_prev = alphas[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
            if model.config.parameterization == "v":
                x0 = a.sqrt() * x - (1 - a).sqrt() * out
            else:
                x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
            x0 = x0.clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return to_image(x).clamp(-1, 1)


def sample_batched(model: ToyModel, spec: SampleSpec, chunk: int = 36, **kwargs) -> torch.Tensor:
    parts = []
    for i in range(0, len(spec.seeds), chunk):
        sub = SampleSpec(spec.cond[i : i + chunk], spec.uncond[i : i + chunk], spec.seeds[i : i + chunk])
        parts.append(sample(model, sub, **kwargs))
    return torch.cat(parts)
