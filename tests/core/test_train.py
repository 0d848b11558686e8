"""Training the tokens on small random-weight UNets: diffusers' UNet2DConditionModel in SD1 and SDXL layouts, and
the host's own ldm module where the test is about ldm (its block checkpointing)."""

from __future__ import annotations

import math

import pytest
import torch
import unets

from lib_anima.context import load_context
from lib_anima.errors import ArgumentError
from lib_anima.layout import find_sites, parse_weights
from lib_anima.train import (
    DiffusionSchedule,
    TrainConfig,
    TrainExample,
    TrainingDiverged,
    TrainState,
    TrainStateFileError,
    masked_mse,
    train_context,
)

DIM = 64


@pytest.fixture(scope="module")
def sd1():
    return unets.sd1_unet(context_dim=DIM)


@pytest.fixture(scope="module")
def sdxl():
    u = unets.sdxl_unet(context_dim=DIM, adm=32)
    # The test layout re-initialises SD's zero-initialised projections at std 0.02, which leaves the cross-attention
    # nearly mute in the 10-deep blocks; give proj_out its ordinary init scale so the tokens can act, as in a trained model.
    with torch.no_grad():
        for name, module in u.named_modules():
            if name.endswith("proj_out"):
                module.reset_parameters()
    return u


def sd_schedule(parameterization: str = "eps") -> DiffusionSchedule:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiffusionSchedule(torch.cumprod(1 - betas, 0), parameterization)


def sd1_apply(u, gain: float = 1.0):
    return lambda x, t, c: gain * u(x, t, context=c)


def sdxl_apply(u, gain: float = 1.0):
    return lambda x, t, c: gain * u(x, timesteps=t, context=c["crossattn"], y=c["vector"])


def reference(seed: int = 1, h: int = 8, w: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, h, w, generator=g) * 0.5 + torch.tensor([1.5, -1.0, 0.5, 2.0]).view(4, 1, 1)


def text(seed: int = 2, length: int = 77) -> torch.Tensor:
    return torch.randn(length, DIM, generator=torch.Generator().manual_seed(seed))


def examples(n: int = 2, mask: torch.Tensor | None = None) -> list[TrainExample]:
    lat = reference()
    out = [TrainExample(lat, text(), mask), TrainExample(lat.flip(-1), text(), None if mask is None else mask.flip(-1))]
    for i in range(2, n):
        out.append(TrainExample(reference(10 + i), text(), mask))
    return out[:n]


def param_state(u: torch.nn.Module):
    return (
        [p.requires_grad for p in u.parameters()],
        [m.training for m in u.modules()],
        [getattr(m, "checkpoint", None) for m in u.modules()],
    )


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ---- gradients -------------------------------------------------------------------------------------------------


def test_only_the_tokens_learn(sd1):
    init = torch.randn(len(find_sites(sd1)), 4, DIM, generator=torch.Generator().manual_seed(3)) * 0.1
    before = {k: v.clone() for k, v in sd1.state_dict().items()}
    steps_seen = []
    result = train_context(
        sd1_apply(sd1), sd1, examples(), TrainConfig(steps=3, lr=0.05, seed=0, init=init), sd_schedule(),
        on_step=lambda step, loss, lr: steps_seen.append((step, loss, lr)),
    )
    assert all(p.grad is None for p in sd1.parameters())
    assert all(torch.equal(before[k], v) for k, v in sd1.state_dict().items())
    tokens = result.context.tokens
    assert tokens.shape == init.shape and not torch.allclose(tokens, init)
    assert (tokens - init).abs().amax(dim=(1, 2)).min() > 0  # every site learned
    assert [s for s, _, _ in steps_seen] == [1, 2, 3]
    assert [lr for _, _, lr in steps_seen] == [0.05] * 3
    assert [loss for _, loss, _ in steps_seen] == result.losses
    assert result.state.step == 3 and not result.interrupted
    assert result.context.arch == "sd1"
    assert result.context.site_names == [s.name for s in find_sites(sd1)]
    record = result.context.training
    assert record["steps"] == 3 and record["seed"] == 0 and record["lr"] == "0.05" and record["examples"] == 2
    assert record["n_tokens"] == 4 and record["parameterization"] == "eps" and record["init"] == "tensor"


def test_preset_trains_only_its_sites(sd1, tmp_path):
    sites = find_sites(sd1)
    init = torch.randn(len(sites), 2, DIM, generator=torch.Generator().manual_seed(4)) * 0.1
    config = TrainConfig(steps=2, lr=0.05, n_tokens=2, seed=0, init=init, weights="coarse", record={"source": "x.png"})
    result = train_context(sd1_apply(sd1), sd1, examples(), config, sd_schedule())
    weights = parse_weights("coarse", sites)
    assert 0 < sum(weights) < len(sites)
    for site, w in zip(sites, weights, strict=True):
        changed = not torch.equal(result.context.tokens[site.index], init[site.index])
        assert changed == (w != 0), site.name
    assert result.context.site_weights.tolist() == weights
    assert result.context.training["weights"] == "coarse" and result.context.training["source"] == "x.png"
    path = str(tmp_path / "ctx.safetensors")
    result.context.save(path)
    loaded = load_context(path)
    assert torch.equal(loaded.tokens, result.context.tokens) and loaded.training == result.context.training


def test_init_tensor_for_every_site_is_broadcast(sd1):
    init = torch.randn(3, DIM, generator=torch.Generator().manual_seed(5))
    result = train_context(sd1_apply(sd1), sd1, examples(1), TrainConfig(steps=1, lr=0.0, n_tokens=3, init=init, seed=0), sd_schedule())
    assert torch.equal(result.context.tokens, init.expand(16, -1, -1))
    with pytest.raises(ArgumentError, match="init tokens"):
        train_context(sd1_apply(sd1), sd1, examples(1), TrainConfig(steps=1, n_tokens=4, init=init), sd_schedule())


# ---- the mask --------------------------------------------------------------------------------------------------


def region_mask(h: int = 8, w: int = 8) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[:, 2:5, 3:7] = 1.0
    return mask


def test_masked_loss_ignores_everything_outside_the_mask():
    g = torch.Generator().manual_seed(6)
    mask = region_mask().unsqueeze(0)
    target = torch.randn(1, 4, 8, 8, generator=g)
    other = torch.where(mask.bool(), target, torch.randn(1, 4, 8, 8, generator=g) * 10)
    pred = torch.randn(1, 4, 8, 8, generator=g)

    def loss_and_grad(tgt):
        p = pred.clone().requires_grad_(True)
        loss = masked_mse(p, tgt, mask).sum()
        loss.backward()
        return loss.detach(), p.grad

    (l1, g1), (l2, g2) = loss_and_grad(target), loss_and_grad(other)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert bool((g1 * (1 - mask) == 0).all()) and bool((g1 * mask != 0).any())
    # normalised by the mask's area: the mean squared error over the masked pixels
    assert torch.allclose(l1, ((pred - target) ** 2 * mask).sum() / (mask.sum() * 4))
    changed_inside = target + mask
    assert not torch.equal(loss_and_grad(changed_inside)[0], l1)


def test_mask_zeroes_the_loss_outside_it_in_training(sd1):
    mask = region_mask()
    grads = []

    def apply(x, t, c):
        pred = sd1(x, t, context=c)
        pred.register_hook(lambda g: grads.append(g.detach().clone()))
        return pred

    result = train_context(apply, sd1, [TrainExample(reference(), text(), mask)], TrainConfig(steps=2, lr=0.05, seed=0), sd_schedule("v"))
    assert len(grads) == 2
    for g in grads:
        assert bool((g * (1 - mask) == 0).all()) and bool((g * mask != 0).any())

    # v targets contain the latent itself: with a model blind outside the region, changing the latent outside it
    # changes neither the losses nor the learned tokens.
    def blind(x, t, c):
        return sd1(x * mask, t, context=c)

    changed = torch.where(mask.bool(), reference(), reference(seed=99) * 5)
    runs = [
        train_context(blind, sd1, [TrainExample(lat, text(), mask)], TrainConfig(steps=2, lr=0.05, seed=0), sd_schedule("v"))
        for lat in (reference(), changed)
    ]
    assert runs[0].losses == runs[1].losses
    assert torch.equal(runs[0].context.tokens, runs[1].context.tokens)
    assert result.losses != runs[0].losses


def test_bad_masks_are_refused():
    with pytest.raises(ArgumentError, match="mask must be"):
        TrainExample(reference(), text(), torch.ones(1, 4, 4))
    with pytest.raises(ArgumentError, match="zero everywhere"):
        TrainExample(reference(), text(), torch.zeros(1, 8, 8))
    with pytest.raises(ArgumentError, match="not negative"):
        TrainExample(reference(), text(), -torch.ones(8, 8))
    assert TrainExample(reference(), text(), torch.ones(8, 8)).mask.shape == (1, 8, 8)


# ---- learning --------------------------------------------------------------------------------------------------
# The random-weight UNets denoise nothing; scaled up (gain 5) their output is a large systematic error which the
# tokens can learn to cancel. Runs with the same seed draw the same examples, timesteps and noise at every step, so a
# run at lr 0 is an exact per-step baseline.


def test_loss_goes_down_sd1_eps(sd1):
    def run(lr):
        config = TrainConfig(steps=30, lr=lr, batch_size=2, init_std=1.0, seed=0)
        return train_context(sd1_apply(sd1, gain=5.0), sd1, examples(), config, sd_schedule("eps")).losses

    trained, baseline = run(1.0), run(0.0)
    assert mean(trained[-10:]) < 0.8 * mean(trained[:10])
    assert mean(trained[-10:]) < 0.8 * mean(baseline[-10:])


def test_loss_goes_down_sdxl_v(sdxl):
    lat = reference()
    cond = {"crossattn": text(), "vector": torch.randn(32, generator=torch.Generator().manual_seed(7))}
    data = [TrainExample(lat, cond), TrainExample(lat.flip(-1), cond)]

    def run(lr):
        config = TrainConfig(steps=15, lr=lr, init_std=1.0, seed=0)
        return train_context(sdxl_apply(sdxl, gain=5.0), sdxl, data, config, sd_schedule("v"))

    trained, baseline = run(3.0), run(0.0)
    assert trained.context.arch == "sdxl" and trained.context.n_sites == 70
    assert mean(trained.losses[-5:]) < 0.9 * mean(baseline.losses[-5:])
    assert mean(trained.losses[-5:]) < mean(trained.losses[:5])


# ---- resume ----------------------------------------------------------------------------------------------------


def test_resume_equals_an_uninterrupted_run(sd1, tmp_path):
    data = examples(3)  # batches of 2 across passes over 3 examples: the shuffle must resume too

    def config(steps):
        return TrainConfig(steps=steps, lr=lambda s: 0.05 if s < 4 else 0.02, lr_text="0.05:4, 0.02", batch_size=2,
                           grad_accumulation=2, seed=11)

    full = train_context(sd1_apply(sd1), sd1, data, config(6), sd_schedule())
    half = train_context(sd1_apply(sd1), sd1, data, config(3), sd_schedule())
    path = str(tmp_path / "state.safetensors")
    half.state.save(path)
    loaded = TrainState.load(path)
    assert loaded.step == 3 and loaded.seed == 11 and loaded.losses == half.losses
    rest = train_context(sd1_apply(sd1), sd1, data, config(6), sd_schedule(), state=loaded)

    assert rest.state.step == 6 and len(rest.losses) == 3
    assert rest.state.losses == pytest.approx(full.losses, rel=1e-5)
    assert torch.allclose(rest.context.tokens, full.context.tokens, atol=1e-6)
    a, b = rest.state.optimizer["state"][0], full.state.optimizer["state"][0]
    assert float(a["step"]) == float(b["step"]) == 6
    assert torch.allclose(a["exp_avg"], b["exp_avg"], atol=1e-7)
    assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    assert rest.context.training["lr"] == "0.05:4, 0.02" and rest.context.training["steps"] == 6

    with pytest.raises(ArgumentError, match="seed"):
        train_context(sd1_apply(sd1), sd1, data, TrainConfig(steps=6, seed=12), sd_schedule(), state=loaded)


def test_state_file_errors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a state at all")
    with pytest.raises(TrainStateFileError, match="not an anima training state"):
        TrainState.load(str(path))
    with pytest.raises(TrainStateFileError, match="cannot be read"):
        TrainState.load(str(tmp_path / "missing.safetensors"))


# ---- divergence ------------------------------------------------------------------------------------------------


def test_nan_loss_stops_with_the_last_good_state(sd1):
    calls = []
    before = param_state(sd1)

    def apply(x, t, c):
        calls.append(1)
        out = sd1(x, t, context=c)
        return out * float("nan") if len(calls) == 3 else out

    config = TrainConfig(steps=5, lr=0.05, seed=0)
    with pytest.raises(TrainingDiverged, match="step 3") as info:
        train_context(apply, sd1, examples(), config, sd_schedule())
    state = info.value.state
    assert info.value.step == 3 and state.step == 2 and len(state.losses) == 2
    clean = train_context(sd1_apply(sd1), sd1, examples(), TrainConfig(steps=2, lr=0.05, seed=0), sd_schedule())
    assert bool(torch.isfinite(state.tokens).all())
    assert torch.equal(state.tokens, clean.state.tokens)
    assert torch.equal(state.optimizer["state"][0]["exp_avg"], clean.state.optimizer["state"][0]["exp_avg"])
    assert all(p.grad is None for p in sd1.parameters()) and param_state(sd1) == before


def test_huge_learning_rate_diverges_cleanly(sd1):
    with pytest.raises(TrainingDiverged, match="lower learning rate") as info:
        train_context(sd1_apply(sd1), sd1, examples(), TrainConfig(steps=20, lr=1e30, seed=0), sd_schedule())
    assert info.value.state.step < 20
    assert bool(torch.isfinite(info.value.state.tokens).all())


def test_non_finite_gradient_or_tokens_keep_the_state_before_the_step(sd1, monkeypatch):
    init = torch.randn(16, 4, DIM, generator=torch.Generator().manual_seed(9)) * 0.1

    def nan_grad(x, t, c):
        pred = sd1(x, t, context=c)
        pred.register_hook(lambda g: g * float("nan"))
        return pred

    with pytest.raises(TrainingDiverged, match="gradient is not finite") as info:
        train_context(nan_grad, sd1, examples(), TrainConfig(steps=3, seed=0, init=init), sd_schedule())
    assert info.value.step == 1 and info.value.state.step == 0 and torch.equal(info.value.state.tokens, init)

    # an optimizer step that leaves the tokens non-finite is undone: tokens and moments as after the step before
    config = TrainConfig(steps=3, lr=0.05, seed=0, init=init)
    clean = train_context(sd1_apply(sd1), sd1, examples(), TrainConfig(steps=1, lr=0.05, seed=0, init=init), sd_schedule())
    adamw_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        out = adamw_step(self, *args, **kwargs)
        if float(self.state[self.param_groups[0]["params"][0]]["step"]) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0][3, 1, 5] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(TrainingDiverged, match="tokens are not finite") as info:
        train_context(sd1_apply(sd1), sd1, examples(), config, sd_schedule())
    state = info.value.state
    assert info.value.step == 2 and state.step == 1
    assert torch.equal(state.tokens, clean.state.tokens)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(state.optimizer["state"][0][key], clean.state.optimizer["state"][0][key])
    with pytest.raises(ArgumentError, match="learning rate"):
        train_context(sd1_apply(sd1), sd1, examples(), TrainConfig(lr=1e39), sd_schedule())


# ---- the model is left as it was ---------------------------------------------------------------------------------


def blocks(u):
    return [m for m in u.modules() if isinstance(getattr(m, "checkpoint", None), bool)]


@pytest.fixture(scope="module")
def ldm_sd1():
    return unets.ldm_sd1_unet(context_dim=DIM)


def test_model_flags_restored_after_training_and_after_an_error(ldm_sd1):
    sd1 = ldm_sd1
    params = list(sd1.parameters())
    try:
        for i, p in enumerate(params):
            p.requires_grad_(i % 3 == 0)
        sd1.train()
        sd1.output_blocks[2].eval()
        for b in blocks(sd1):
            b.checkpoint = True  # ldm's checkpoint would cut the tokens off from the loss
        assert len(blocks(sd1)) == 16
        before = param_state(sd1)
        seen = []

        def apply(x, t, c):
            seen.append((
                any(p.requires_grad for p in sd1.parameters()),
                any(m.training for m in sd1.modules()),
                any(b.checkpoint for b in blocks(sd1)),
            ))
            return sd1(x, t, context=c)

        init = torch.randn(16, 4, DIM, generator=torch.Generator().manual_seed(8)) * 0.1
        result = train_context(apply, sd1, examples(), TrainConfig(steps=2, lr=0.05, seed=0, init=init), sd_schedule())
        assert seen == [(False, False, False)] * 2
        assert param_state(sd1) == before
        assert (result.context.tokens - init).abs().amax(dim=(1, 2)).min() > 0  # gradients reached every site

        def failing(x, t, c):
            sd1(x, t, context=c)
            raise RuntimeError("out of memory (simulated)")

        with pytest.raises(RuntimeError, match="simulated"):
            train_context(failing, sd1, examples(), TrainConfig(steps=2, seed=0), sd_schedule())
        assert param_state(sd1) == before
        assert not sd1._forward_pre_hooks
        assert all(not s.module._forward_hooks for s in find_sites(sd1))
        assert all(p.grad is None for p in params)
        assert {p.device for p in params} == {torch.device("cpu")}
    finally:
        for p in params:
            p.requires_grad_(True)
        sd1.eval()
        for b in blocks(sd1):
            b.checkpoint = False


# ---- interrupt, callbacks, batching ------------------------------------------------------------------------------


def test_should_stop_returns_the_partial_state(sd1):
    done = []
    result = train_context(
        sd1_apply(sd1), sd1, examples(), TrainConfig(steps=10, lr=0.05, seed=0), sd_schedule(), device="cpu",
        on_step=lambda step, loss, lr: done.append(step), should_stop=lambda: len(done) >= 2,
    )
    assert result.interrupted and result.state.step == 2 and len(result.losses) == 2
    assert result.context.training["interrupted"] is True and result.context.training["steps"] == 2
    assert bool(torch.isfinite(result.context.tokens).all())


def test_on_save_every_n_steps(sd1):
    saved = []
    train_context(
        sd1_apply(sd1), sd1, examples(), TrainConfig(steps=5, lr=0.05, seed=0, save_every=2), sd_schedule(),
        on_save=lambda state, context: saved.append((state.step, context.training["steps"])),
    )
    assert saved == [(2, 2), (4, 4)]


def test_examples_of_different_sizes_share_a_batch(sd1):
    data = [TrainExample(reference(), text()), TrainExample(reference(h=8, w=16), text(length=154), region_mask(8, 16))]
    result = train_context(sd1_apply(sd1), sd1, data, TrainConfig(steps=2, lr=0.05, batch_size=2, seed=0), sd_schedule())
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


def test_bad_arguments(sd1):
    with pytest.raises(ArgumentError, match="parameterization"):
        DiffusionSchedule(torch.linspace(0.99, 0.01, 10), "x0")
    with pytest.raises(ArgumentError, match="steps"):
        train_context(sd1_apply(sd1), sd1, examples(), TrainConfig(steps=0), sd_schedule())
    with pytest.raises(ArgumentError, match="learning rate"):
        train_context(sd1_apply(sd1), sd1, examples(), TrainConfig(lr=float("nan")), sd_schedule())
    with pytest.raises(ArgumentError, match="no training examples"):
        train_context(sd1_apply(sd1), sd1, [], TrainConfig(), sd_schedule())
    with pytest.raises(ArgumentError, match="conditioning dim"):
        bad = [TrainExample(reference(), torch.zeros(77, 32))]
        train_context(sd1_apply(sd1), sd1, bad, TrainConfig(), sd_schedule())
    with pytest.raises(ArgumentError, match="nothing would train"):
        train_context(sd1_apply(sd1), sd1, examples(), TrainConfig(weights=[0.0] * 16), sd_schedule())
