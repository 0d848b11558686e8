"""The v2 toy text-to-image model: a small CLIP-like text encoder and an ldm UNet, pre-trained together.

* **Text encoder** (:class:`TextEncoder`): token embeddings + learned positions, 2 pre-norm transformer layers
  with a causal mask (as CLIP's), a final LayerNorm; a caption is ``<bos> words… <pad>…`` of :data:`SEQ_LEN`
  tokens, and the UNet attends to all of its output states (as SD attends to CLIP's last layer). A learned word
  (textual inversion) is a tensor in the caption: its vectors replace token embeddings at the encoder's INPUT, as
  the host's textual inversion does, so it reaches the UNet only through the frozen encoder.
* **UNet**: A1111's ``ldm`` ``UNetModel`` (SD1 code, real ``SpatialTransformer`` ``attn2`` sites) on the 32×32
  picture folded losslessly into 12×16×16 (``pixel_unshuffle`` by 2), cross-attention at 8×8 and 4×4 (7 sites),
  context dim 64 — v1's UNet. (Folding by 4 into 48×8×8 was tried first: about half the cost per step, but after
  1600 pre-training steps its samples were still grain with a faint blob.)
* v-prediction, linear DDPM schedule, DDIM + classifier-free guidance (as v1); AdamW with warm-up and cosine
  decay and an EMA of the weights for pre-training (the EMA is used). Cached in ``benchmarks/.cache/quality_v2``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from benchmarks.quality import data as v1
from benchmarks.quality.model import REPO, cache_key, host_ldm, schedule
from benchmarks.quality.v2 import data
from lib_anima.inject import Activation, InjectionSession, RowTracker

CACHE = os.path.join(REPO, "benchmarks", ".cache", "quality_v2")
FACTOR = 2
LATENT_SHAPE = (3 * FACTOR * FACTOR, v1.SIZE // FACTOR, v1.SIZE // FACTOR)


@dataclass(frozen=True)
class Emphasis:
    """A learned word with an attention weight, like A1111's ``(word:1.3)``: its output states are multiplied by
    `scale`, then the whole caption's states are rescaled to their original mean (the host's emphasis)."""

    vectors: torch.Tensor
    scale: float


Word = str | torch.Tensor | Emphasis


@dataclass(frozen=True)
class ModelConfig:
    context_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    attention_resolutions: tuple[int, ...] = (2, 4)
    num_head_channels: int = 16
    timesteps: int = 1000
    parameterization: str = "v"
    version: int = 1


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.995
    bank: int = 12000
    seed: int = 0
    # A second stage from the first stage's EMA weights (fresh optimizer, its own warm-up and cosine decay, new
    # picture bank): after 1500 steps the model drew backgrounds and rough colours but not yet the named shapes
    # and textures. The first stage is cached on its own, so this is exactly "1500 steps, then 1500 more".
    stage2_steps: int = 1500
    stage2_lr: float = 1e-3
    # A third stage, the same way from the second stage's EMA weights (issue 17 follow-up): after 3000 steps the
    # model drew settings and colours but shapes at chance (classifier agreement 0.27). 0 = no third stage.
    stage3_steps: int = 2500
    stage3_lr: float = 1e-3


class TextEncoder(torch.nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.context_dim
        self.token = torch.nn.Embedding(len(data.VOCAB), d)
        torch.nn.init.normal_(self.token.weight, std=0.3)
        self.position = torch.nn.Parameter(torch.randn(data.SEQ_LEN, d) * 0.05)
        layer = torch.nn.TransformerEncoderLayer(d, config.text_heads, dim_feedforward=2 * d, dropout=0.0,
                                                 activation="gelu", batch_first=True, norm_first=True)
        self.layers = torch.nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.register_buffer("causal", torch.triu(torch.full((data.SEQ_LEN, data.SEQ_LEN), float("-inf")), 1),
                             persistent=False)

    def embed(self, caption: Sequence[Word]) -> tuple[torch.Tensor, list[tuple[int, int, float]]]:
        """Input embeddings ``[SEQ_LEN, d]`` of one caption and the (start, end, scale) of emphasised words."""
        parts = [self.token.weight[data.VOCAB.index(data.BOS)][None]]
        spans: list[tuple[int, int, float]] = []
        used = 1
        for word in caption:
            scale = None
            if isinstance(word, Emphasis):
                word, scale = word.vectors, word.scale
            if isinstance(word, torch.Tensor):
                vec = word.reshape(-1, self.token.weight.shape[1]).to(self.token.weight.dtype)
            else:
                vec = self.token.weight[data.VOCAB.index(word)][None]
            if scale is not None:
                spans.append((used, used + vec.shape[0], scale))
            parts.append(vec)
            used += vec.shape[0]
        if used >= data.SEQ_LEN:
            raise ValueError(f"caption of {used} tokens needs at least one <pad> within {data.SEQ_LEN}")
        parts.append(self.token.weight[data.VOCAB.index(data.PAD)][None].expand(data.SEQ_LEN - used, -1))
        return torch.cat(parts), spans

    def forward(self, captions: Sequence[Sequence[Word]]) -> torch.Tensor:
        embedded = [self.embed(c) for c in captions]
        x = torch.stack([e for e, _ in embedded]) + self.position
        z = self.norm(self.layers(x, mask=self.causal, is_causal=True))
        if any(spans for _, spans in embedded):
            rows = []
            for zi, (_, spans) in zip(z, embedded, strict=True):
                if spans:
                    mult = torch.ones(zi.shape[0], 1, dtype=zi.dtype)
                    for a, b, s in spans:
                        mult[a:b] = s
                    mean = zi.mean()
                    zi = zi * mult
                    zi = zi * (mean / zi.mean())
                rows.append(zi)
            z = torch.stack(rows)
        return z


class ToyModel(torch.nn.Module):
    """Text encoder + ldm UNet; ``self.unet`` is what the extension hooks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        host_ldm()
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        self.config = config
        self.text = TextEncoder(config)
        c = LATENT_SHAPE[0]
        self.unet = UNetModel(
            image_size=LATENT_SHAPE[1], in_channels=c, out_channels=c, model_channels=config.model_channels,
            attention_resolutions=list(config.attention_resolutions), num_res_blocks=1,
            channel_mult=list(config.channel_mult), num_head_channels=config.num_head_channels,
            use_spatial_transformer=True, transformer_depth=1, context_dim=config.context_dim,
            use_checkpoint=False, legacy=False,
        )

    def encode(self, captions: Sequence[Sequence[Word]]) -> torch.Tensor:
        return self.text(captions)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=cond)


def to_latent(images: torch.Tensor) -> torch.Tensor:
    return F.pixel_unshuffle(images, FACTOR)


def to_image(latents: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(latents, FACTOR)


def data_fingerprint() -> str:
    import hashlib

    h = hashlib.sha256("|".join(data.VOCAB).encode())
    h.update(repr(data.HELD_OUT).encode())
    for i, s in enumerate(data.training_scenes()[::61]):
        h.update(v1.render(s, i).tobytes())
    return h.hexdigest()[:16]


def pretrain(config: ModelConfig, train: PretrainConfig, log: Callable[[str], None] = print,
             init: ToyModel | None = None) -> tuple[ToyModel, dict]:
    """Text encoder and UNet trained together on the named characters; returns the EMA model and a record."""
    torch.manual_seed(train.seed)
    model = ToyModel(config)
    if init is not None:
        model.load_state_dict(init.state_dict())
        model.requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    sched = schedule(config)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.0)
    losses, start, cpu0 = [], time.perf_counter(), time.process_time()
    bank = data.picture_bank(train.bank, train.seed)
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
        if (step + 1) % 100 == 0 or step + 1 == train.steps:
            log(f"  pretrain step {step + 1}/{train.steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU)")
    record = {"steps": train.steps, "seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(time.process_time() - cpu0, 1), "threads": torch.get_num_threads(),
              "loss_last_100": sum(losses[-100:]) / len(losses[-100:])}
    return ema.eval(), record


def cache_path(config: ModelConfig, train: PretrainConfig) -> str:
    fields = asdict(train)
    if not train.stage3_steps:  # two stages are keyed as before there was a third
        fields = {k: v for k, v in fields.items() if not k.startswith("stage3_")}
    if not train.stage2_steps:  # a single stage is keyed as before there were stages
        fields = {k: v for k, v in fields.items() if not k.startswith("stage2_")}
    return os.path.join(CACHE, f"base-{cache_key(config, fields, data_fingerprint())}.pt")


def load_or_pretrain(config: ModelConfig, train: PretrainConfig, log: Callable[[str], None] = print) -> tuple[ToyModel, dict]:
    path = cache_path(config, train)
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = ToyModel(config)
        model.load_state_dict(saved["state"])
        log(f"base model from cache {os.path.relpath(path, REPO)}")
        return model.eval().requires_grad_(False), dict(json.loads(saved["record"]), cached=True)
    if train.stage3_steps:
        second, second_record = load_or_pretrain(config, replace(train, stage3_steps=0), log)
        log(f"pre-training stage 3 ({train.stage3_steps} steps of {train.batch_size}); cached afterwards")
        stage = replace(train, steps=train.stage3_steps, lr=train.stage3_lr, warmup=50, seed=train.seed + 2,
                        stage2_steps=0, stage3_steps=0)
        model, record = pretrain(config, stage, log, init=second)
        record = {"stage1": second_record.get("stage1"), "stage2": second_record.get("stage2"), "stage3": record,
                  "cpu_seconds": round(second_record.get("cpu_seconds", 0) + record["cpu_seconds"], 1)}
    elif train.stage2_steps:
        first, first_record = load_or_pretrain(config, replace(train, stage2_steps=0, stage3_steps=0), log)
        log(f"pre-training stage 2 ({train.stage2_steps} steps of {train.batch_size}); cached afterwards")
        stage = replace(train, steps=train.stage2_steps, lr=train.stage2_lr, warmup=50, seed=train.seed + 1,
                        stage2_steps=0)
        model, record = pretrain(config, stage, log, init=first)
        record = {"stage1": first_record, "stage2": record,
                  "cpu_seconds": round(first_record.get("cpu_seconds", 0) + record["cpu_seconds"], 1)}
    else:
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
    cond: list[list[Word]]
    uncond: list[list[Word]]
    seeds: list[int]


@torch.no_grad()
def sample(model: ToyModel, spec: SampleSpec, activations: Sequence[Activation] = (), steps: int = 20,
           guidance: float = 3.0) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance, one UNet call per step on ``[cond; uncond]`` rows, the
    extension's injection told which rows are which by a :class:`RowTracker` (as in the WebUI)."""
    n = len(spec.seeds)
    context = torch.cat([model.encode(spec.cond), model.encode(spec.uncond)])
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
            x0 = (a.sqrt() * x - (1 - a).sqrt() * out).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return to_image(x).clamp(-1, 1)


def sample_batched(model: ToyModel, spec: SampleSpec, chunk: int = 36, **kwargs) -> torch.Tensor:
    parts = []
    for i in range(0, len(spec.seeds), chunk):
        sub = SampleSpec(spec.cond[i : i + chunk], spec.uncond[i : i + chunk], spec.seeds[i : i + chunk])
        parts.append(sample(model, sub, **kwargs))
    return torch.cat(parts)
