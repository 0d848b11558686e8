"""The one-shot methods of v2, each learning one held-out character from its ONE reference picture.

* **ours**: the extension's own :func:`lib_anima.train.train_context` (tokens only, through the injection hooks),
  caption ``on sand with nothing`` encoded by the frozen text encoder; optionally with the character's mask.
* **ti**: textual inversion as the host does it: ``n_tokens`` new input embeddings in front of the same caption,
  through the frozen text encoder (gradients flow back through it to the vectors), UNet frozen.
* **finetune**: the whole UNet (text encoder frozen) with a fixed, never-trained identifier embedding in front
  of the caption (DreamBooth without prior preservation): the upper bound of what one picture can teach.

Same batch (copies of the picture, fresh noise and timesteps), AdamW, the same CPU-second budget; checkpoints at
geometrically spaced steps record the training time spent so far (evaluation not counted), as in v1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.quality import data as v1
from benchmarks.quality.methods import Checkpoint, Run, Stopwatch, _mean_tail, _targets
from benchmarks.quality.model import schedule
from benchmarks.quality.v2 import data
from benchmarks.quality.v2.model import LATENT_SHAPE, ToyModel, to_latent
from lib_anima.train import TrainConfig, TrainExample, TrainState, train_context


@dataclass(frozen=True)
class OneShotConfig:
    budget_s: float = 30.0  # training time per method and character, on `clock`
    clock: str = "cpu"
    batch_size: int = 8
    n_tokens: int = 4  # tokens per site (ours) = vectors of the new word (ti)
    lr_ours: float = 0.03
    lr_ti: float = 0.01
    lr_finetune: float = 3e-4
    weights: str = "all"  # sites preset (ours)
    first_checkpoint: int = 5
    checkpoint_growth: float = 2.0  # checkpoints at 5, 10, 20, 40, … steps and at the budget's end
    max_steps: int = 10**6  # stop also at this step count (defaults sweep)
    seed: int = 0


def reference_latent(character: data.Character) -> torch.Tensor:
    _, image = data.reference(character)
    return to_latent(v1.to_tensor(image))[0]


def _checkpoints(config: OneShotConfig) -> list[int]:
    steps = [s for s in _targets(config) if s < config.max_steps]
    return steps + [config.max_steps] if config.max_steps < 10**6 else steps


def train_ours(model: ToyModel, character: data.Character, config: OneShotConfig, mask: bool = False,
               log: Callable[[str], None] = print) -> Run:
    latent = reference_latent(character)
    with torch.no_grad():
        cond = model.encode([data.reference_setting()])[0]
    examples = [TrainExample(latent, cond, data.character_mask(character) if mask else None)]
    sched = schedule(model.config)
    run, watch = Run("ours_mask" if mask else "ours"), Stopwatch(config.clock)
    state: TrainState | None = None

    def out_of_time() -> bool:
        return watch.now() >= config.budget_s

    for target in _checkpoints(config):
        watch.start()
        tc = TrainConfig(steps=target, lr=config.lr_ours, batch_size=config.batch_size, n_tokens=config.n_tokens,
                         seed=config.seed, weights=config.weights)
        result = train_context(lambda x, t, c: model(x, t, c), model.unet, examples, tc, sched, arch="sd1",
                               state=state, should_stop=out_of_time)
        watch.stop()
        state = result.state
        if run.checkpoints and run.checkpoints[-1].step == state.step:
            break
        run.checkpoints.append(Checkpoint(state.step, watch.spent, watch.wall, result.context))
        if result.interrupted or watch.spent >= config.budget_s or state.step >= config.max_steps:
            break
    run.extra["loss_last_10"] = _mean_tail(state.losses if state else [])
    log(f"  {run.method}: {run.final.step} steps in {watch.spent:.1f} s {config.clock} ({watch.wall:.1f} s wall)")
    return run


def _step_noise(config: OneShotConfig, step: int, timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    t = torch.randint(0, timesteps, (config.batch_size,), generator=g)
    noise = torch.randn((config.batch_size, *LATENT_SHAPE), generator=g)
    return t, noise


def _loop(name: str, config: OneShotConfig, timesteps: int, params: list[torch.Tensor], lr: float,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], artefact: Callable[[], Any],
          log: Callable[[str], None]) -> Run:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    run, watch, step, losses = Run(name), Stopwatch(config.clock), 0, []
    targets = iter(_checkpoints(config))
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
            run.checkpoints.append(Checkpoint(step, watch.spent, watch.wall, artefact()))
            if watch.spent >= config.budget_s or step >= config.max_steps:
                break
            target = next(targets)
            watch.start()
    run.extra["loss_last_10"] = _mean_tail(losses)
    log(f"  {name}: {step} steps in {watch.spent:.1f} s {config.clock} ({watch.wall:.1f} s wall)")
    return run


def initial_word(model: ToyModel, n: int, seed: int) -> torch.Tensor:
    """TI's starting vectors: the mean input embedding of the vocabulary, slightly perturbed (distinct vectors)."""
    with torch.no_grad():
        mean = model.text.token.weight.mean(0)
        g = torch.Generator().manual_seed(seed)
        return mean + 0.02 * torch.randn((n, mean.shape[0]), generator=g)


def train_ti(model: ToyModel, character: data.Character, config: OneShotConfig,
             log: Callable[[str], None] = print) -> Run:
    x0 = reference_latent(character).unsqueeze(0).expand(config.batch_size, -1, -1, -1)
    sched = schedule(model.config)
    vectors = torch.nn.Parameter(initial_word(model, config.n_tokens, config.seed))
    setting = data.reference_setting()

    def loss_fn(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cond = model.encode([[vectors, *setting]]).expand(config.batch_size, -1, -1)  # through the text encoder
        pred = model(sched.noisy(x0, noise, t), t, cond)
        return ((pred - sched.target(x0, noise, t)) ** 2).mean()

    with torch.enable_grad():
        return _loop("ti", config, sched.num_timesteps, [vectors], config.lr_ti, loss_fn,
                     lambda: vectors.detach().clone(), log)


def identifier(model: ToyModel, seed: int = 0) -> torch.Tensor:
    """The fine-tune's fixed identifier: a random input embedding of the vocabulary's scale (a rare token)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn((1, model.config.context_dim), generator=g) * float(model.text.token.weight.std())


def train_finetune(model: ToyModel, character: data.Character, config: OneShotConfig,
                   log: Callable[[str], None] = print) -> Run:
    x0 = reference_latent(character).unsqueeze(0).expand(config.batch_size, -1, -1, -1)
    sched = schedule(model.config)
    tuned = copy.deepcopy(model)
    params = list(tuned.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    word = identifier(model, config.seed)
    with torch.no_grad():
        cond = tuned.encode([[word, *data.reference_setting()]]).expand(config.batch_size, -1, -1)

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
    out.unet.load_state_dict({k: base[k] + scale * (unet_state[k] - base[k]) if base[k].is_floating_point()
                              else unet_state[k] for k in base})
    return out.eval().requires_grad_(False)


TRAINERS: dict[str, Callable[..., Run]] = {"ours": train_ours, "ti": train_ti, "finetune": train_finetune}
