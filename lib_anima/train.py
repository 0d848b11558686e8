"""Training a reference context: only the tokens learn, the model stays frozen.

The loop trains the tokens ``[sites, n_tokens, context_dim]`` with the ordinary diffusion loss on precomputed
examples (VAE latents and text conditioning made by the caller; a flipped copy is just another example). The
tokens act through the same hook as at generation (:class:`lib_anima.inject.InjectionSession`, mode positive,
scale 1, every row conditional), so what is learned is exactly what is applied later.

The model is reached through two things only, so the WebUI glue can plug in its own model:

* ``unet_apply(x_noisy, t, cond) -> prediction``: one denoiser call, ``x_noisy`` ``[B, C, h, w]`` float32,
  ``t`` ``[B]`` int64 timesteps, ``cond`` the batched conditioning (``[B, L, dim]`` tensor, or for SDXL a dict
  with ``crossattn`` ``[B, L, dim]`` and ``vector`` ``[B, adm]``). It must call ``unet_module`` (casting dtypes
  as the model needs).
* ``unet_module``: the ``nn.Module`` holding the ``attn2`` sites (``diffusion_model``), hooked for the tokens.

One step: pick ``batch_size · grad_accumulation`` examples (each example equally often: a fresh shuffle of
the examples per pass over them), draw a timestep uniformly from ``[0, T)`` (or a truncated range,
``TrainConfig.timestep_range``) and Gaussian noise per example, noise the latent
``x_t = √ā·x0 + √(1-ā)·ε``, and regress the model's output on ``ε`` (eps models) or on
``v = √ā·ε − √(1-ā)·x0`` (v models). The squared error is weighted per latent pixel by the example's mask (0 →
no loss at all) and normalised by the mask's sum, so a small mask does not shrink the step. AdamW updates the
tokens only.

Determinism and resume: the randomness of step ``s`` (timesteps, noise) comes from a generator seeded from
``(seed, s)``, the shuffle of pass ``p`` from ``(seed, p)``, all on the CPU. A run resumed from a saved
:class:`TrainState` therefore takes exactly the steps the uninterrupted run would have taken.

Defaults (one reference image plus its flip, a few minutes on a consumer GPU):

* ``n_tokens = 4``: a few tokens per site carry one image's look; more tokens mostly memorise layout.
* ``lr = 5e-2`` constant, ``steps = 300``: the tokens live in the text encoder's output space (≈ unit std after
  its final LayerNorm), about a hundred times the scale of the input embeddings textual inversion trains at
  5e-3, and Adam moves each element by at most about ``lr`` per step. Chosen by the defaults sweep of the
  synthetic v2 benchmark (``benchmarks/README.md``): the only rate of 1.5e-3 … 1.5e-1 that reached its target
  on all three characters, by 320 steps at the latest, without losing the prompt; 5e-3 reached it on one.
  Three characters of a small toy model: a starting point, not tuned on real SD weights.
* ``init_std = 0.02``: random small tokens start as a near no-op (their values, hence the added attention, are
  ~2% of a text token's), while being distinct so the tokens do not stay identical (zero init would).
* ``batch_size = 1``, ``grad_accumulation = 1``, ``weight_decay = 0``, timesteps uniform over all of ``[0, T)``.

The model is left as it was: every parameter's ``requires_grad``, every submodule's train/eval mode and every
ldm/sgm ``checkpoint`` flag are restored afterwards, also on errors; the device is never changed. During training
the UNet is in eval mode (no dropout; the host's sub-quadratic attention does not checkpoint) and the ldm/sgm
gradient checkpointing of the transformer blocks is off: their checkpoint function hands only the block's own
parameters to autograd, so no gradient would reach the tokens.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

import lib_anima
from lib_anima.context import ReferenceContext, site_layout_id
from lib_anima.errors import AnimaError, ArgumentError, ContextMismatchError
from lib_anima.fileio import atomic_write_bytes
from lib_anima.inject import Activation, AllConditional, InjectionSession
from lib_anima.layout import Site, find_sites, parse_weights

Cond = torch.Tensor | dict[str, torch.Tensor]
UnetApply = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
PARAMETERIZATIONS = ("eps", "v")
PRECISIONS = ("fp32", "fp16", "bf16")
STATE_VERSION = 1
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_STATE_META = "anima.train_state"


class TrainingDiverged(AnimaError):
    """The loss (or the tokens) stopped being finite; `state` is the last good state, before the bad step."""

    def __init__(self, message: str, step: int, state: TrainState):
        super().__init__(message)
        self.step = step  # the step (1-based) that failed
        self.state = state


class TrainStateFileError(AnimaError):
    """A training state file is unreadable or invalid."""


# ---- inputs ----------------------------------------------------------------------------------------------------


@dataclass
class TrainExample:
    """One training example: a VAE latent, its conditioning and an optional loss mask."""

    latent: torch.Tensor  # [C, h, w], already scaled by the VAE's scale factor
    cond: Cond  # [L, dim], or {"crossattn": [L, dim], "vector": [adm]} for SDXL
    mask: torch.Tensor | None = None  # [1, h, w] (or [h, w]) loss weight >= 0 in latent resolution

    def __post_init__(self) -> None:
        lat = self.latent
        if not isinstance(lat, torch.Tensor) or lat.dim() != 3 or not lat.is_floating_point():
            raise ArgumentError(f"a latent must be a float tensor [C, h, w], got {_describe(lat)}")
        if isinstance(self.cond, dict):
            if "crossattn" not in self.cond:
                raise ArgumentError(f"a conditioning dict needs 'crossattn', got keys {sorted(self.cond)}")
            if not all(isinstance(v, torch.Tensor) for v in self.cond.values()):
                raise ArgumentError("every conditioning value must be a tensor")
            text = self.cond["crossattn"]
        elif isinstance(self.cond, torch.Tensor):
            text = self.cond
        else:
            raise ArgumentError(f"conditioning must be a tensor or a dict of tensors, got {type(self.cond).__name__}")
        if text.dim() != 2:
            raise ArgumentError(f"text conditioning must be [tokens, dim] (no batch dimension), got {_describe(text)}")
        if self.mask is not None:
            m = self.mask
            if isinstance(m, torch.Tensor) and m.dim() == 2:
                m = m.unsqueeze(0)
            if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[0] != 1 or m.shape[1:] != lat.shape[1:]:
                raise ArgumentError(f"a mask must be [1, {lat.shape[1]}, {lat.shape[2]}] like its latent, got {_describe(m)}")
            m = m.float()
            if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
                raise ArgumentError("mask weights must be finite and not negative")
            if float(m.sum()) <= 0:
                raise ArgumentError("a mask must not be zero everywhere")
            self.mask = m


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


@dataclass
class DiffusionSchedule:
    """The model's noise schedule: ``alphas_cumprod`` ``[T]`` and what the model predicts (``eps`` or ``v``)."""

    alphas_cumprod: torch.Tensor
    parameterization: str = "eps"

    def __post_init__(self) -> None:
        a = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if a.numel() < 2 or not bool(torch.isfinite(a).all()) or bool((a <= 0).any()) or bool((a > 1).any()):
            raise ArgumentError("alphas_cumprod must be at least 2 finite values in (0, 1]")
        self.alphas_cumprod = a
        if self.parameterization not in PARAMETERIZATIONS:
            raise ArgumentError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {self.parameterization!r}")

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t.cpu()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        sa = a.sqrt().to(like.device, like.dtype).view(shape)
        s1a = (1 - a).sqrt().to(like.device, like.dtype).view(shape)
        return sa, s1a

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sa, s1a = self._coefficients(t, x0)
        return sa * x0 + s1a * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "eps":
            return noise
        sa, s1a = self._coefficients(t, x0)
        return sa * noise - s1a * x0


@dataclass
class TrainConfig:
    """What to train and how; see the module docstring for why the defaults are what they are."""

    steps: int = 300  # total steps (a resumed run continues up to this count)
    lr: float | Callable[[int], float] = 5e-2  # constant, or step index (0-based) -> lr
    lr_text: str = ""  # how to record the lr (e.g. the WebUI's schedule text); default: the number
    batch_size: int = 1
    grad_accumulation: int = 1
    n_tokens: int = 4
    init: torch.Tensor | None = None  # [n_tokens, dim] (every site) or [sites, n_tokens, dim]; None: random
    init_std: float = 0.02
    seed: int | None = None  # None or negative: a random seed, recorded
    weights: str | list[float] | None = None  # preset or per-site list; sites with weight 0 do not train
    timestep_range: tuple[float, float] = (0.0, 1.0)  # fraction of [0, T) to sample timesteps from
    save_every: int = 0  # call on_save every this many steps (0: never)
    precision: str = "fp32"  # fp16 / bf16: autocast around the model on cuda (ignored elsewhere)
    weight_decay: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)  # merged into the context's training record

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation", "n_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArgumentError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ArgumentError(f"save_every must be a whole number >= 0, got {self.save_every!r}")
        if not callable(self.lr):
            _check_lr(self.lr)
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ArgumentError(f"init_std must be a positive number, got {self.init_std!r}")
        lo, hi = self.timestep_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ArgumentError(f"timestep_range must be two fractions 0 <= low < high <= 1, got {self.timestep_range!r}")
        if self.precision not in PRECISIONS:
            raise ArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ArgumentError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    def lr_at(self, step: int) -> float:
        return _check_lr(self.lr(step) if callable(self.lr) else self.lr, step)

    def describe_lr(self) -> str:
        return self.lr_text or (repr(float(self.lr)) if not callable(self.lr) else "schedule")


def _check_lr(value: object, step: int | None = None) -> float:
    where = "" if step is None else f" at step {step}"
    try:
        lr = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ArgumentError(f"learning rate{where} must be a number, got {value!r}") from None
    if not math.isfinite(lr) or not 0 <= lr <= _FLOAT32_MAX:
        raise ArgumentError(f"learning rate{where} must be a number from 0 to {_FLOAT32_MAX:.3g}, got {value!r}")
    return lr


# ---- state -------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything needed to continue training exactly: tokens, AdamW state, steps done, seed, losses."""

    tokens: torch.Tensor  # [sites, n_tokens, dim] float32
    step: int  # steps done
    seed: int
    optimizer: dict[str, Any]  # torch optimizer state_dict of AdamW over [tokens]
    losses: list[float] = field(default_factory=list)  # loss of every step done
    scaler: dict[str, Any] | None = None  # fp16 GradScaler state
    site_layout: str = ""

    def to_bytes(self) -> bytes:
        tensors = {"tokens": self.tokens.detach().to("cpu", torch.float32).contiguous()}
        opt_state: dict[str, dict[str, Any]] = {}
        for pid, entry in self.optimizer.get("state", {}).items():
            plain = {}
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    plain[key] = value
            opt_state[str(pid)] = plain
        meta = {
            "version": STATE_VERSION, "step": self.step, "seed": self.seed, "losses": self.losses,
            "scaler": self.scaler, "site_layout": self.site_layout,
            "optimizer_state": opt_state, "param_groups": self.optimizer.get("param_groups", []),
        }
        return save_safetensors_bytes(tensors, metadata={_STATE_META: json.dumps(meta)})

    def save(self, path: str) -> None:
        """Write atomically (safetensors; the non-tensor parts as JSON metadata)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, label: str = "training state") -> TrainState:
        try:
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + n])
            meta = json.loads(header["__metadata__"][_STATE_META])
            tensors = load_safetensors_bytes(data)
        except Exception as e:  # any corruption: struct, JSON, key or safetensors errors
            raise TrainStateFileError(f"{label}: not an anima training state ({type(e).__name__}: {e})") from None
        if meta.get("version") != STATE_VERSION:
            raise TrainStateFileError(f"{label}: training state version {meta.get('version')!r}, expected {STATE_VERSION}")
        try:
            state: dict[Any, dict[str, Any]] = {}
            for pid, plain in meta["optimizer_state"].items():
                entry = dict(plain)
                prefix = f"optimizer.{pid}."
                entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
                state[int(pid)] = entry
            groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
            result = cls(
                tokens=tensors["tokens"].float(), step=int(meta["step"]), seed=int(meta["seed"]),
                optimizer={"state": state, "param_groups": groups}, losses=[float(x) for x in meta["losses"]],
                scaler=meta.get("scaler"), site_layout=str(meta.get("site_layout", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TrainStateFileError(f"{label}: incomplete training state ({type(e).__name__}: {e})") from None
        if result.tokens.dim() != 3 or not bool(torch.isfinite(result.tokens).all()):
            raise TrainStateFileError(f"{label}: tokens must be a finite [sites, n_tokens, dim] tensor")
        return result

    @classmethod
    def load(cls, path: str) -> TrainState:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TrainStateFileError(f"training state {path!r} cannot be read ({e.strerror or e})") from None
        return cls.from_bytes(data, f"training state {path!r}")


@dataclass
class TrainResult:
    context: ReferenceContext  # the tokens so far, arch and site names filled, with the training record
    losses: list[float]  # loss of each step run by this call
    state: TrainState  # to resume (or to save for later)
    interrupted: bool = False  # should_stop() ended the run before config.steps


# ---- the model, frozen -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters without grad, eval mode, ldm/sgm block checkpointing off; all restored on exit."""
    params = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    flags = [(m, m.checkpoint) for m in module.modules() if isinstance(getattr(m, "checkpoint", None), bool)]
    try:
        for p, _ in params:
            p.requires_grad_(False)
        module.eval()
        for m, _ in flags:
            m.checkpoint = False
        yield
    finally:
        for p, req in params:
            p.requires_grad_(req)
        for m, mode in modes:
            m.training = mode
        for m, flag in flags:
            m.checkpoint = flag


# ---- the loop ----------------------------------------------------------------------------------------------------


def _generator(seed: int, stream: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"anima/{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _sample_indices(seed: int, step: int, per_step: int, n: int) -> list[int]:
    """Example indices of one step: consecutive draws from a fresh shuffle per pass over the examples."""
    out, perms = [], {}
    for i in range(step * per_step, (step + 1) * per_step):
        epoch = i // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=_generator(seed, "epoch", epoch)).tolist()
        out.append(perms[epoch][i % n])
    return out


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example mean squared error ``[B]``, weighted per pixel by `mask` ``[B, 1, h, w]`` (normalised by its sum)."""
    err = (pred.float() - target.to(pred.device, torch.float32)) ** 2
    if mask is None:
        return err.flatten(1).mean(1)
    m = mask.to(pred.device, torch.float32)
    return (err * m).flatten(1).sum(1) / (m.flatten(1).sum(1) * err.shape[1])


def _collate(conds: list[Cond], device: torch.device) -> Cond:
    if isinstance(conds[0], dict):
        return {k: torch.stack([c[k] for c in conds]).to(device) for k in conds[0]}  # type: ignore[index]
    return torch.stack(conds).to(device)  # type: ignore[arg-type]


def _group_key(ex: TrainExample) -> tuple:
    cond = ex.cond
    cond_key = tuple(sorted((k, tuple(v.shape)) for k, v in cond.items())) if isinstance(cond, dict) else tuple(cond.shape)
    return (tuple(ex.latent.shape), cond_key, ex.mask is not None)


def _guess_arch(sites: list[Site]) -> str:
    if len(sites) == 70:
        return "sdxl"
    return "sd2" if sites[0].context_dim == 1024 else "sd1"


def _initial_tokens(config: TrainConfig, n_sites: int, dim: int, seed: int) -> torch.Tensor:
    shape = (n_sites, config.n_tokens, dim)
    if config.init is None:
        return torch.randn(shape, generator=_generator(seed, "init", 0)) * config.init_std
    init = config.init.detach().to("cpu", torch.float32)
    if init.dim() == 2:
        init = init.unsqueeze(0).expand(n_sites, -1, -1)
    if tuple(init.shape) != shape:
        raise ArgumentError(f"init tokens must be [{config.n_tokens}, {dim}] or {list(shape)}, got {list(config.init.shape)}")
    if not bool(torch.isfinite(init).all()):
        raise ArgumentError("init tokens contain NaN or infinite values")
    return init.clone()


def _make_scaler(enabled: bool) -> Any:
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def train_context(
    unet_apply: UnetApply,
    unet_module: torch.nn.Module,
    examples: Sequence[TrainExample],
    config: TrainConfig,
    schedule: DiffusionSchedule,
    *,
    arch: str | None = None,
    device: torch.device | str | None = None,
    state: TrainState | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_save: Callable[[TrainState, ReferenceContext], None] | None = None,
) -> TrainResult:
    """Train a reference context's tokens on `examples` up to ``config.steps`` steps (continuing `state`).

    `device` is where the tokens, latents and noise live (default: that of the UNet's first parameter; give it
    when the host keeps the UNet elsewhere between calls, e.g. A1111's ``--medvram``).
    ``on_step(steps_done, loss, lr)`` is called after every step; ``should_stop()`` before every step (True: return
    what there is, ``interrupted=True``); ``on_save(state, context)`` every ``config.save_every`` steps. A loss or
    tokens that stop being finite raise :class:`TrainingDiverged` carrying the state before that step.
    """
    run = _TrainingRun.prepare(unet_apply, unet_module, examples, config, schedule, arch, device, state)
    losses: list[float] = []
    interrupted = False
    with frozen(unet_module), torch.inference_mode(False), torch.enable_grad():
        while run.step < config.steps:
            if should_stop is not None and should_stop():
                interrupted = True
                break
            step_loss, lr = run.optimise_once()
            losses.append(step_loss)
            if on_step is not None:
                on_step(run.step, step_loss, lr)
            if on_save is not None and config.save_every and run.step % config.save_every == 0 and run.step < config.steps:
                on_save(run.snapshot(), run.build_context(interrupted=False))
    run.tokens.grad = None
    return TrainResult(context=run.build_context(interrupted), losses=losses, state=run.snapshot(), interrupted=interrupted)


def _check_examples(examples: list[TrainExample], dim: int) -> None:
    if not examples:
        raise ArgumentError("no training examples")
    for i, ex in enumerate(examples):
        text = ex.cond["crossattn"] if isinstance(ex.cond, dict) else ex.cond
        if text.shape[-1] != dim:
            raise ArgumentError(f"example {i}: conditioning dim {text.shape[-1]}, the model's cross-attention takes {dim}")


def _run_seed(config: TrainConfig, state: TrainState | None, layout: str, token_shape: tuple[int, int, int]) -> int:
    """The run's seed: the resumed state's (after checking it fits this run), the asked one, or a fresh one."""
    if state is None:
        return config.seed if config.seed is not None and config.seed >= 0 else random.SystemRandom().randrange(2**31)
    if config.seed is not None and config.seed >= 0 and config.seed != state.seed:
        raise ArgumentError(f"resuming a run with seed {state.seed}, but seed {config.seed} was asked for")
    if state.site_layout and state.site_layout != layout:
        raise ContextMismatchError(f"the training state is for site layout {state.site_layout}, the model has {layout}")
    if tuple(state.tokens.shape) != token_shape:
        raise ContextMismatchError(
            f"the training state has tokens {list(state.tokens.shape)}, this run needs {list(token_shape)}"
        )
    return state.seed


def _on_device(examples: list[TrainExample], device: torch.device) -> list[tuple]:
    """(latent, conditioning, mask) per example on `device`, as plain tensors (they may come from inference mode)."""
    return [
        (
            ex.latent.detach().to(device, torch.float32).clone(),
            {k: v.detach().to(device).clone() for k, v in ex.cond.items()} if isinstance(ex.cond, dict)
            else ex.cond.detach().to(device).clone(),
            None if ex.mask is None else ex.mask.detach().to(device, torch.float32).clone(),
        )
        for ex in examples
    ]


@dataclass
class _TrainingRun:
    """Everything one training run holds between steps: the tokens, their optimizer and the prepared data."""

    unet_apply: UnetApply
    examples: list[TrainExample]
    data: list[tuple]
    config: TrainConfig
    schedule: DiffusionSchedule
    arch: str
    site_names: list[str]
    weights: list[float]
    layout: str
    seed: int
    device: torch.device
    tokens: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    scaler: Any
    session: InjectionSession
    losses_all: list[float]
    step: int

    @classmethod
    def prepare(cls, unet_apply: UnetApply, unet_module: torch.nn.Module, examples: Sequence[TrainExample],
                config: TrainConfig, schedule: DiffusionSchedule, arch: str | None,
                device: torch.device | str | None, state: TrainState | None) -> _TrainingRun:
        config.validate()
        examples = list(examples)
        sites = find_sites(unet_module)
        site_names = [s.name for s in sites]
        dim = sites[0].context_dim
        _check_examples(examples, dim)
        weights = parse_weights(config.weights, sites)
        if not any(w != 0 for w in weights):
            raise ArgumentError("every site weight is 0: nothing would train")
        layout = site_layout_id(site_names)
        seed = _run_seed(config, state, layout, (len(sites), config.n_tokens, dim))
        device = torch.device(device) if device is not None else next(unet_module.parameters()).device
        init = state.tokens if state is not None else _initial_tokens(config, len(sites), dim, seed)
        tokens = torch.nn.Parameter(init.detach().to(device, torch.float32).clone())
        optimizer = torch.optim.AdamW([tokens], lr=config.lr_at(0), weight_decay=config.weight_decay)
        unet_fp16 = any(p.dtype == torch.float16 for p in unet_module.parameters())
        scaler = _make_scaler(device.type == "cuda" and (config.precision == "fp16" or unet_fp16))
        if state is not None:
            optimizer.load_state_dict(state.optimizer)
            if state.scaler and scaler.is_enabled():
                scaler.load_state_dict(state.scaler)
        arch = arch or _guess_arch(sites)
        activation = Activation(ReferenceContext(tokens=tokens, arch=arch, site_names=site_names), scale=1.0,
                                mode="positive", weights=weights)
        # one session, entered around each UNet call only: callbacks between steps (previews) see a clean model
        session = InjectionSession(unet_module, [activation], AllConditional(), sites=sites)
        return cls(
            unet_apply, examples, _on_device(examples, device), config, schedule, arch, site_names, weights, layout,
            seed, device, tokens, optimizer, scaler, session,
            list(state.losses) if state is not None else [], state.step if state is not None else 0,
        )

    @property
    def per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accumulation

    def optimise_once(self) -> tuple[float, float]:
        """One optimisation step (all its micro-batches); returns (loss, learning rate)."""
        lr = self.config.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        chosen = _sample_indices(self.seed, self.step, self.per_step, len(self.data))
        g = _generator(self.seed, "step", self.step)
        t_lo = int(round(self.config.timestep_range[0] * self.schedule.num_timesteps))
        t_hi = max(t_lo + 1, int(round(self.config.timestep_range[1] * self.schedule.num_timesteps)))
        timesteps = torch.randint(t_lo, t_hi, (self.per_step,), generator=g)
        noises = [torch.randn(self.data[i][0].shape, generator=g) for i in chosen]
        step_loss = 0.0
        for micro in range(self.config.grad_accumulation):
            slots = range(micro * self.config.batch_size, (micro + 1) * self.config.batch_size)
            groups: dict[tuple, list[int]] = {}
            for j in slots:  # examples of one shape go through the UNet together
                groups.setdefault(_group_key(self.examples[chosen[j]]), []).append(j)
            for members in groups.values():
                step_loss += self._backward(
                    [chosen[j] for j in members], torch.stack([noises[j] for j in members]), timesteps[members], lr,
                )
        self._apply(lr)
        self.step += 1
        self.losses_all.append(step_loss)
        return step_loss, lr

    def _backward(self, indices: list[int], noise: torch.Tensor, t: torch.Tensor, lr: float) -> float:
        """Loss and gradient of one group of examples of the same shape; returns its share of the step's loss."""
        device = self.device
        x0 = torch.stack([self.data[i][0] for i in indices])
        noise, t = noise.to(device), t.to(device)
        cond = _collate([self.data[i][1] for i in indices], device)
        masks = [self.data[i][2] for i in indices]
        mask = None if masks[0] is None else torch.stack(masks)  # type: ignore[arg-type]
        x_t = self.schedule.noisy(x0, noise, t)
        target = self.schedule.target(x0, noise, t)
        with self.session, self._autocast():
            pred = self.unet_apply(x_t, t, cond)
        if not isinstance(pred, torch.Tensor) or pred.shape != x0.shape:
            raise ArgumentError(f"unet_apply returned {_describe(pred)} for an input of shape {list(x0.shape)}")
        loss = masked_mse(pred, target, mask).sum() / self.per_step
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(_diverged_text(self.step + 1, f"the loss is {value}", lr), self.step + 1, self.snapshot())
        self.scaler.scale(loss).backward()
        return value

    def _autocast(self):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.precision)
        if self.device.type == "cuda" and dtype is not None:
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _apply(self, lr: float) -> None:
        """The optimizer step; a non-finite gradient or result keeps the tokens from before it and raises."""
        tokens, step = self.tokens, self.step + 1
        if not self.scaler.is_enabled() and tokens.grad is not None and not bool(torch.isfinite(tokens.grad).all()):
            raise TrainingDiverged(_diverged_text(step, "the gradient is not finite", lr), step, self.snapshot())
        before = (tokens.detach().clone(), _copy_state(self.optimizer.state_dict(), None))  # on the device: cheap
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not bool(torch.isfinite(tokens).all()):
            with torch.no_grad():
                tokens.copy_(before[0])
            self.optimizer.load_state_dict(before[1])
            raise TrainingDiverged(_diverged_text(step, "the tokens are not finite", lr), step, self.snapshot())

    def snapshot(self) -> TrainState:
        return TrainState(
            tokens=self.tokens.detach().to("cpu").clone(), step=self.step, seed=self.seed,
            optimizer=_copy_state(self.optimizer.state_dict(), "cpu"), losses=list(self.losses_all),
            scaler=dict(self.scaler.state_dict()) if self.scaler.is_enabled() else None, site_layout=self.layout,
        )

    def build_context(self, interrupted: bool) -> ReferenceContext:
        config, losses = self.config, self.losses_all
        record: dict[str, Any] = {
            "trainer": f"anima {lib_anima.__version__}", "steps": self.step, "steps_planned": config.steps,
            "lr": config.describe_lr(), "batch_size": config.batch_size,
            "grad_accumulation": config.grad_accumulation, "n_tokens": config.n_tokens, "seed": self.seed,
            "examples": len(self.examples), "parameterization": self.schedule.parameterization,
            "timestep_range": list(config.timestep_range), "weights": _weights_text(config.weights),
            "init": "tensor" if config.init is not None else f"normal(0, {config.init_std:g})",
            "precision": config.precision, "weight_decay": config.weight_decay,
            "loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "interrupted": interrupted,
        }
        record.update(config.record)
        weights = self.weights
        site_weights = None if all(w == 1.0 for w in weights) else torch.tensor(weights, dtype=torch.float32)
        return ReferenceContext(
            tokens=self.tokens.detach().to("cpu", torch.float32).clone(), arch=self.arch,
            site_names=list(self.site_names), site_weights=site_weights, training=record,
        )


def _diverged_text(step: int, what: str, lr: float) -> str:
    return (
        f"training diverged at step {step}: {what}. The tokens from before that step are kept; "
        f"try a lower learning rate (it was {lr:g})"
    )


def _weights_text(spec: str | list[float] | None) -> str:
    if spec is None or spec == "":
        return "all"
    return spec if isinstance(spec, str) else ",".join(f"{w:g}" for w in spec)


def _copy_state(obj: Any, device: str | None) -> Any:
    """A copy of an optimizer state dict whose tensors are cloned (onto `device`, None: where they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device).clone() if device is not None else obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy_state(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_state(v, device) for v in obj]
    return copy.copy(obj)
