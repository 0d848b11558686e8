"""The three one-shot methods, each learning the held-out character from the one reference picture.

* **ours**: a reference context trained by the extension's own loop (:func:`lib_anima.train.train_context`:
  tokens only, through the same :class:`~lib_anima.inject.InjectionSession` hooks as generation), with the
  reference's setting as its caption (``on sand with nothing``), so the tokens have to carry the character.
* **ti** (textual inversion): new word vectors (as many as the context has tokens per site) in front of the same
  caption, everything else frozen; generation puts the word in the prompt.
* **finetune**: the whole UNet trained on the picture with a fixed identifier word (DreamBooth without prior
  preservation): the upper bound of how much of the picture one image can put into the model.

All three draw the same kind of step (a batch of copies of the picture, uniform timesteps, fresh noise), use
AdamW, and are stopped by the same wall-clock budget. Each is saved at checkpoints (doubling step counts) with the
training time spent so far (evaluation time not counted), which gives the time-to-similarity curves.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.quality import data
from benchmarks.quality.model import LATENT_SHAPE, ToyModel, schedule, to_latent
from lib_anima.context import ReferenceContext
from lib_anima.train import TrainConfig, TrainExample, TrainState, train_context

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class OneShotConfig:
    budget_s: float = 150.0  # training time per method, on `clock`
    clock: str = "cpu"  # "cpu": process CPU seconds (robust on a shared machine, = wall on an idle core); "wall"
    batch_size: int = 8
    n_tokens: int = 4  # tokens per site (ours) = vectors of the new word (ti)
    lr_ours: float = 2e-2
    lr_ti: float = 2e-2
    lr_finetune: float = 2e-4
    first_checkpoint: int = 5  # checkpoints at 5, 7, 10, 14, 20, … steps (× growth), and where the budget ends
    checkpoint_growth: float = 2**0.5
    seed: int = 0


@dataclass
class Checkpoint:
    step: int
    seconds: float  # training time up to here on the budget's clock
    wall: float  # training wall time up to here
    artefact: Any  # ReferenceContext (ours), [n, dim] tensor (ti), UNet state dict (finetune)


class Stopwatch:
    """Training time on the budget's clock and on the wall, counted only while running (not while evaluating)."""

    def __init__(self, clock: str):
        self._clock = CLOCKS[clock]
        self.spent = self.wall = 0.0
        self._start: tuple[float, float] | None = None

    def start(self) -> None:
        self._start = (self._clock(), time.perf_counter())

    def stop(self) -> None:
        if self._start is not None:
            self.spent += self._clock() - self._start[0]
            self.wall += time.perf_counter() - self._start[1]
            self._start = None

    def now(self) -> float:
        return self.spent + (self._clock() - self._start[0] if self._start is not None else 0.0)


@dataclass
class Run:
    method: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]


def _targets(config: OneShotConfig) -> list[int]:
    """Checkpoint step counts: a geometric series from `first_checkpoint`, rounded, strictly increasing."""
    out, k = [], float(config.first_checkpoint)
    while k < 10**6:
        step = round(k)
        if not out or step > out[-1]:
            out.append(step)
        k *= config.checkpoint_growth
    return out


def reference_latent() -> tuple[data.Scene, torch.Tensor]:
    scene, image = data.reference()
    return scene, to_latent(data.to_tensor(image))[0]


def reference_setting() -> list[str]:
    scene, _ = data.reference()
    return data.setting_words(scene.background, scene.object)


# ---- ours: the extension's training loop ------------------------------------------------------------------------


def train_ours(model: ToyModel, config: OneShotConfig, log: Callable[[str], None] = print) -> Run:
    """Chunks of :func:`train_context`, resumed from its state (bit-exact) between checkpoints."""
    _, latent = reference_latent()
    with torch.no_grad():
        cond = model.encode([reference_setting()])[0]
    examples = [TrainExample(latent, cond)]
    sched = schedule(model.config)
    run, watch = Run("ours"), Stopwatch(config.clock)
    state: TrainState | None = None

    def out_of_time() -> bool:
        return watch.now() >= config.budget_s

    for target in _targets(config):
        watch.start()
        train_config = TrainConfig(steps=target, lr=config.lr_ours, batch_size=config.batch_size,
                                   n_tokens=config.n_tokens, seed=config.seed)
        result = train_context(
            lambda x, t, c: model(x, t, c), model.unet, examples, train_config, sched, arch="sd1",
            state=state, should_stop=out_of_time,
        )
        watch.stop()
        state = result.state
        if run.checkpoints and run.checkpoints[-1].step == state.step:
            break  # the budget ran out exactly at the last checkpoint
        run.checkpoints.append(Checkpoint(state.step, watch.spent, watch.wall, result.context))
        if result.interrupted or watch.spent >= config.budget_s:
            break
    run.extra["loss_last_10"] = _mean_tail(state.losses if state else [])
    log(f"  ours: {run.final.step} steps in {watch.spent:.0f} s {config.clock} ({watch.wall:.0f} s wall), "
        f"loss {run.extra['loss_last_10']:.4f}")
    return run


def context_at(run: Run, index: int = -1) -> ReferenceContext:
    return run.checkpoints[index].artefact


# ---- textual inversion ------------------------------------------------------------------------------------------


def _step_noise(config: OneShotConfig, step: int, timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    t = torch.randint(0, timesteps, (config.batch_size,), generator=g)
    noise = torch.randn((config.batch_size, *LATENT_SHAPE), generator=g)
    return t, noise


def _loop(
    name: str, config: OneShotConfig, timesteps: int, params: list[torch.Tensor], lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], artefact: Callable[[], Any],
    log: Callable[[str], None],
) -> Run:
    """The shared step loop of ti and finetune: AdamW, checkpoints at doubling steps, stop at the budget."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    run, watch, step, losses = Run(name), Stopwatch(config.clock), 0, []
    targets = iter(_targets(config))
    target = next(targets)
    watch.start()
    while True:
        t, noise = _step_noise(config, step, timesteps)
        loss = loss_fn(t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step == target or watch.now() >= config.budget_s:
            watch.stop()
            run.checkpoints.append(Checkpoint(step, watch.spent, watch.wall, artefact()))  # copy: not training
            if watch.spent >= config.budget_s:
                break
            target = next(targets)
            watch.start()
    run.extra["loss_last_10"] = _mean_tail(losses)
    log(f"  {name}: {step} steps in {watch.spent:.0f} s {config.clock} ({watch.wall:.0f} s wall), "
        f"loss {run.extra['loss_last_10']:.4f}")
    return run


def train_ti(model: ToyModel, config: OneShotConfig, log: Callable[[str], None] = print) -> Run:
    _, latent = reference_latent()
    sched = schedule(model.config)
    with torch.no_grad():  # start from the vocabulary's mean word, slightly perturbed so the vectors differ
        mean = model.embed.weight.mean(0)
        g = torch.Generator().manual_seed(config.seed)
        init = mean + 0.02 * torch.randn((config.n_tokens, mean.shape[0]), generator=g)
    vectors = torch.nn.Parameter(init.clone())
    setting = reference_setting()
    x0 = latent.unsqueeze(0).expand(config.batch_size, -1, -1, -1)

    def loss_fn(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cond = model.encode([[vectors, *setting]]).expand(config.batch_size, -1, -1)
        pred = model(sched.noisy(x0, noise, t), t, cond)
        return ((pred - sched.target(x0, noise, t)) ** 2).mean()

    with torch.enable_grad():
        return _loop("ti", config, sched.num_timesteps, [vectors], config.lr_ti, loss_fn, lambda: vectors.detach().clone(), log)


# ---- fine-tuning ------------------------------------------------------------------------------------------------


def identifier(model: ToyModel, seed: int = 0) -> torch.Tensor:
    """The fixed identifier word of the fine-tune: a random vector of the vocabulary's scale (never trained)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    std = float(model.embed.weight.std())
    return torch.randn((1, model.config.context_dim), generator=g) * std


def train_finetune(model: ToyModel, config: OneShotConfig, log: Callable[[str], None] = print) -> Run:
    _, latent = reference_latent()
    sched = schedule(model.config)
    tuned = copy.deepcopy(model)
    tuned.unet.train(False)
    params = list(tuned.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    word = identifier(model, config.seed)
    setting = reference_setting()
    x0 = latent.unsqueeze(0).expand(config.batch_size, -1, -1, -1)
    with torch.no_grad():
        cond = tuned.encode([[word, *setting]]).expand(config.batch_size, -1, -1)

    def loss_fn(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        pred = tuned(sched.noisy(x0, noise, t), t, cond)
        return ((pred - sched.target(x0, noise, t)) ** 2).mean()

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in tuned.unet.state_dict().items()}

    with torch.enable_grad():
        run = _loop("finetune", config, sched.num_timesteps, params, config.lr_finetune, loss_fn, snapshot, log)
    run.extra["identifier"] = word
    return run


def interpolated(model: ToyModel, unet_state: dict[str, torch.Tensor], scale: float) -> ToyModel:
    """The base model with its UNet moved `scale` of the way to the fine-tuned weights (like a LoRA strength)."""
    out = copy.deepcopy(model)
    base = model.unet.state_dict()
    mixed = {k: base[k] + scale * (unet_state[k] - base[k]) if base[k].is_floating_point() else unet_state[k]
             for k in base}
    out.unet.load_state_dict(mixed)
    return out.eval().requires_grad_(False)


def _mean_tail(xs: list[float], n: int = 10) -> float:
    tail = xs[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


TRAINERS: dict[str, Callable[[ToyModel, OneShotConfig, Callable[[str], None]], Run]] = {
    "ours": train_ours, "ti": train_ti, "finetune": train_finetune,
}
