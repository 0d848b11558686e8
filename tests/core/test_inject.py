"""The attention injection on real UNets with random weights: diffusers' UNet2DConditionModel in SD1 and SDXL
layouts (always), and the host's own ldm / sgm modules for what is about the host's module layout (skipped,
visibly, when $WEBUI_SOURCES has no A1111 source).

Every comparison is against the same computation done without the extension (a clean run with the same
batch layout) or against an explicit reference formula written out here.
"""

from __future__ import annotations

import pytest
import torch
import unets

from lib_anima.context import ReferenceContext, check_mode, check_scale
from lib_anima.errors import ArgumentError, ContextMismatchError
from lib_anima.inject import (
    Activation,
    AllConditional,
    InjectionSession,
    RowTracker,
    check_fits,
    decoupled_attention,
    fold_site,
    folded_attention,
)
from lib_anima.layout import find_sites, parse_weights, preset_weights

CTX_DIM = 64
ADM = 32
N_TOKENS = 4

SD1_FINE = {
    "input_blocks.1.1.transformer_blocks.0.attn2",
    "input_blocks.2.1.transformer_blocks.0.attn2",
    "output_blocks.9.1.transformer_blocks.0.attn2",
    "output_blocks.10.1.transformer_blocks.0.attn2",
    "output_blocks.11.1.transformer_blocks.0.attn2",
}
SD1_COARSE = {
    "input_blocks.7.1.transformer_blocks.0.attn2",
    "input_blocks.8.1.transformer_blocks.0.attn2",
    "middle_block.1.transformer_blocks.0.attn2",
    "output_blocks.3.1.transformer_blocks.0.attn2",
    "output_blocks.4.1.transformer_blocks.0.attn2",
    "output_blocks.5.1.transformer_blocks.0.attn2",
}


# ---- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1() -> torch.nn.Module:
    return unets.sd1_unet(context_dim=CTX_DIM).requires_grad_(False)


@pytest.fixture(scope="module")
def sd1_sites(sd1):
    return find_sites(sd1)


@pytest.fixture(scope="module")
def sdxl() -> torch.nn.Module:
    return unets.sdxl_unet(context_dim=CTX_DIM, adm=ADM).requires_grad_(False)


@pytest.fixture(scope="module")
def sdxl_sites(sdxl):
    return find_sites(sdxl)


@pytest.fixture(scope="module")
def ldm_sd1() -> torch.nn.Module:
    return unets.ldm_sd1_unet(context_dim=CTX_DIM).requires_grad_(False)


@pytest.fixture(scope="module")
def sgm_sdxl() -> torch.nn.Module:
    return unets.sgm_sdxl_unet(context_dim=CTX_DIM, adm=ADM).requires_grad_(False)


@pytest.fixture(autouse=True)
def _no_leftover_hooks(request):
    """Every test must leave the shared UNets without hooks (a failing test would otherwise poison the rest)."""
    yield
    for name in ("sd1", "sdxl", "ldm_sd1", "sgm_sdxl"):
        if name in request.fixturenames:
            assert_no_hooks(request.getfixturevalue(name))


def make_context(sites, seed: int = 1, dim: int = CTX_DIM, arch: str = "sd1", n_tokens: int = N_TOKENS,
                 **kwargs) -> ReferenceContext:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(sites), n_tokens, dim, generator=g)
    return ReferenceContext(tokens=tokens, arch=arch, site_names=[s.name for s in sites], name=f"ctx{seed}", **kwargs)


def inputs(batch: int, seed: int = 0, adm: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    args = {
        "x": torch.randn(batch, 4, 8, 8, generator=g),
        "timesteps": torch.randint(0, 1000, (batch,), generator=g),
        "context": torch.randn(batch, 7, CTX_DIM, generator=g),
    }
    if adm is not None:
        args["y"] = torch.randn(batch, adm, generator=g)
    return args


def call(unet, args: dict, a: int | None = None, b: int | None = None) -> torch.Tensor:
    """One UNet call on rows a:b, positional x like the host's CFG denoiser (`apply_model` → `diffusion_model`)."""
    sl = slice(a, b)
    kw = {k: v[sl] for k, v in args.items() if k != "x"}
    with torch.no_grad():
        return unet(args["x"][sl], **kw)


def assert_no_hooks(unet: torch.nn.Module) -> None:
    for name, m in unet.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name or 'unet'}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name or 'unet'}"
        assert not getattr(m, "_forward_hooks_with_kwargs", {}), f"kwargs hook left on {name or 'unet'}"
        assert not getattr(m, "_forward_pre_hooks_with_kwargs", {}), f"kwargs pre-hook left on {name or 'unet'}"


def reference_delta(attn: torch.nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """W_out · softmax(q kᵀ · d^-½) v, written out by hand in float64."""
    W = {n: getattr(attn, n).weight.double() for n in ("to_q", "to_k", "to_v")}
    assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
    x64, t64 = x.double(), tokens.double()
    q = x64 @ W["to_q"].T  # [b, n, inner]
    k = t64 @ W["to_k"].T  # [m, inner]
    v = t64 @ W["to_v"].T
    b, n, inner = q.shape
    h = int(attn.heads)
    d = inner // h
    qh = q.reshape(b, n, h, d).permute(0, 2, 1, 3)  # [b, h, n, d]
    kh = k.reshape(-1, h, d).permute(1, 0, 2)  # [h, m, d]
    vh = v.reshape(-1, h, d).permute(1, 0, 2)
    att = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)  # [b, h, n, m]
    out = (att @ vh).permute(0, 2, 1, 3).reshape(b, n, inner)
    return (out @ attn.to_out[0].weight.double().T).float()


class OneSite(torch.nn.Module):
    """A model whose only cross-attention site is `attn`, so that the site module is called directly."""

    def __init__(self, attn: torch.nn.Module):
        super().__init__()
        self.attn2 = attn

    def forward(self, x, context):
        return self.attn2(x, context)  # positional: ldm names it `context`, diffusers `encoder_hidden_states`


def one_site_context(tokens: torch.Tensor) -> ReferenceContext:
    return ReferenceContext(tokens=tokens[None], arch="sd1", site_names=["attn2"])


def site_inputs(attn, batch=2, n=16, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, attn.to_q.in_features, generator=g)
    ctx = torch.randn(batch, 7, attn.to_k.in_features, generator=g)
    return x, ctx


class Capture:
    """Forward hooks (registered after the session's, so they see the injected output) recording site calls."""

    def __init__(self, modules):
        self.calls: dict[int, list] = {i: [] for i in range(len(modules))}
        self.handles = [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            context = args[1] if len(args) > 1 else kwargs.get("context", kwargs.get("encoder_hidden_states"))
            self.calls[i].append((x.detach().clone(), context.detach().clone(), output.detach().clone()))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- the injected term is exactly the decoupled attention -----------------------------------------------------


@pytest.mark.parametrize("site_index", [0, 6, 15])
def test_site_delta_equals_reference_formula(sd1_sites, site_index):
    attn = sd1_sites[site_index].module
    model = OneSite(attn)
    tokens = torch.randn(N_TOKENS, CTX_DIM, generator=torch.Generator().manual_seed(3))
    x, ctx = site_inputs(attn)
    scale, weight = 0.7, 0.5
    act = Activation(one_site_context(tokens), scale=scale, weights=[weight])
    with torch.no_grad():
        clean = model(x, ctx)
        with InjectionSession(model, [act], AllConditional()) as session:
            assert session.installed
            hooked = model(x, ctx)
    expected = reference_delta(attn, x, tokens) * (scale * weight)
    assert expected.abs().max() > 1e-3  # the check below is not vacuous
    torch.testing.assert_close(hooked - clean, expected, atol=1e-5, rtol=0)


def test_negative_mode_under_all_conditional_adds_nothing(sd1_sites):
    attn = sd1_sites[3].module
    model = OneSite(attn)
    x, ctx = site_inputs(attn)
    act = Activation(one_site_context(torch.randn(N_TOKENS, CTX_DIM)), scale=2.0, mode="negative")
    with torch.no_grad():
        clean = model(x, ctx)
        with InjectionSession(model, [act], AllConditional()):
            hooked = model(x, ctx)
    assert torch.equal(hooked, clean)


@pytest.mark.parametrize("unet_name", ["sd1", "sdxl"])
def test_decoupled_attention_alone(request, unet_name):
    sites = request.getfixturevalue(f"{unet_name}_sites")
    for site in (sites[0], sites[len(sites) // 2], sites[-1]):
        attn = site.module
        tokens = torch.randn(N_TOKENS, CTX_DIM, generator=torch.Generator().manual_seed(site.index))
        x, _ = site_inputs(attn, batch=3, n=5)
        with torch.no_grad():
            got = decoupled_attention(attn, x, attn.to_k(tokens), attn.to_v(tokens))
        assert got.shape == (3, 5, attn.to_out[0].out_features)
        torch.testing.assert_close(got, reference_delta(attn, x, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("unet_name", ["sd1", "sdxl"])
def test_site_delta_inside_real_unet_call(request, unet_name):
    """Inside a full UNet forward each hooked site adds exactly strength · reference formula."""
    unet = request.getfixturevalue(unet_name)
    sites = request.getfixturevalue(f"{unet_name}_sites")
    arch = "sd1" if unet_name == "sd1" else "sdxl"
    ctx = make_context(sites, seed=11, arch=arch)
    args = inputs(2, adm=ADM if unet_name == "sdxl" else None)
    picked = [0, len(sites) // 2, len(sites) - 1]
    weights = [0.0] * len(sites)
    for i in picked:
        weights[i] = 0.8
    act = Activation(ctx, scale=1.5, weights=weights)
    with InjectionSession(unet, [act]):
        cap = Capture([sites[i].module for i in picked])
        try:
            call(unet, args)
        finally:
            cap.remove()
    for j, i in enumerate(picked):
        [(x, context, hooked)] = cap.calls[j]
        with torch.no_grad():
            clean = sites[i].module(x, context)
        expected = reference_delta(sites[i].module, x, ctx.tokens[i]) * 1.2
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(hooked - clean, expected, atol=1e-5, rtol=0)


def test_multiple_contexts_add_at_a_site(sd1_sites):
    attn = sd1_sites[7].module
    model = OneSite(attn)
    x, ctx = site_inputs(attn)
    ta = torch.randn(N_TOKENS, CTX_DIM, generator=torch.Generator().manual_seed(1))
    tb = torch.randn(6, CTX_DIM, generator=torch.Generator().manual_seed(2))
    a = Activation(one_site_context(ta), scale=0.9)
    b = Activation(one_site_context(tb), scale=1.7)

    def delta(acts):
        with torch.no_grad(), InjectionSession(model, acts):
            return model(x, ctx) - clean

    with torch.no_grad():
        clean = model(x, ctx)
    da, db, dab = delta([a]), delta([b]), delta([a, b])
    assert da.abs().max() > 1e-3 and db.abs().max() > 1e-3
    assert not torch.allclose(da, db, atol=1e-4)
    torch.testing.assert_close(dab, da + db, atol=1e-5, rtol=0)


# ---- identity and hook removal ------------------------------------------------------------------------------


def test_scale_zero_is_exact_identity_and_installs_nothing(sd1, sd1_sites):
    args = inputs(2)
    clean = call(sd1, args)
    session = InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=0)])
    with session:
        assert not session.installed
        assert_no_hooks(sd1)
        out = call(sd1, args)
    assert torch.equal(out, clean)


@pytest.mark.parametrize("weights", [[0.0] * 16, ",".join(["0"] * 16)])
def test_all_site_weights_zero_installs_nothing(sd1, sd1_sites, weights):
    session = InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=2.0, weights=weights)])
    with session:
        assert not session.installed
        assert_no_hooks(sd1)


def test_context_site_weights_are_the_default(sd1, sd1_sites):
    ctx = make_context(sd1_sites, site_weights=torch.zeros(16))
    with InjectionSession(sd1, [Activation(ctx, scale=1.0)]) as session:
        assert not session.installed
    with InjectionSession(sd1, [Activation(ctx, scale=1.0, weights="all")]) as session:
        assert session.installed
        assert all(s.module._forward_hooks for s in sd1_sites)


def test_hooks_installed_then_removed_and_output_restored(sd1, sd1_sites):
    args = inputs(2)
    clean = call(sd1, args)
    session = InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0)])
    with session:
        assert session.installed
        assert all(len(s.module._forward_hooks) == 1 for s in sd1_sites)
        assert len(sd1._forward_pre_hooks) == 1
        first = call(sd1, args)
        second = call(sd1, args)  # cached keys/values give the same result
    assert not session.installed
    assert_no_hooks(sd1)
    assert not torch.equal(first, clean)
    assert (first - clean).abs().max() > 1e-4
    assert torch.equal(first, second)
    assert torch.equal(call(sd1, args), clean)


def test_hooks_removed_after_exception_in_with_block(sd1, sd1_sites):
    args = inputs(2)
    clean = call(sd1, args)
    session = InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0)])
    with pytest.raises(RuntimeError, match="user abort"), session:
        assert session.installed
        raise RuntimeError("user abort")
    assert not session.installed
    assert_no_hooks(sd1)
    assert torch.equal(call(sd1, args), clean)


def test_hooks_removed_after_exception_inside_unet_forward(sd1, sd1_sites):
    args = inputs(2)
    clean = call(sd1, args)

    def explode(module, inp, out):
        raise RuntimeError("interrupted mid-forward")

    # a resblock of the output blocks: raised after several hooked sites already ran
    bomb = sd1_sites[12].module.register_forward_hook(explode)
    session = InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0)])
    try:
        with pytest.raises(RuntimeError, match="interrupted mid-forward"), session:
            call(sd1, args)
    finally:
        bomb.remove()
    assert not session.installed
    assert_no_hooks(sd1)
    assert torch.equal(call(sd1, args), clean)
    # and the session object (or a new one) works normally afterwards
    with session:
        assert not torch.equal(call(sd1, args), clean)
    assert torch.equal(call(sd1, args), clean)


# ---- which rows: the host's CFG batching layouts -------------------------------------------------------------

# (n_cond, n_total, the UNet calls of one step as row slices)
LAYOUTS = {
    "one_call_batch1": (1, 2, [(0, 2)]),
    "one_call_batch2": (2, 4, [(0, 4)]),
    "cond_then_uncond_calls": (2, 4, [(0, 2), (2, 4)]),
    "chunks_of_batch_size_1": (2, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    "chunks_straddling_cond_uncond": (3, 5, [(0, 2), (2, 4), (4, 5)]),
    "and_prompts_one_call": (3, 5, [(0, 5)]),
    "and_prompts_cond_chunks_then_uncond": (3, 5, [(0, 2), (2, 3), (3, 5)]),
    "uncond_skipped": (2, 4, [(0, 2)]),
    "uncond_skipped_batch3": (3, 6, [(0, 3)]),
}


def run_step(unet, args, slices) -> tuple[torch.Tensor, int]:
    out = torch.full_like(args["x"], float("nan"))
    for a, b in slices:
        out[a:b] = call(unet, args, a, b)
    return out, slices[-1][1]


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mode_touches_only_its_rows(sd1, sd1_sites, layout, mode):
    n_cond, n_total, slices = LAYOUTS[layout]
    args = inputs(n_total, seed=n_total)
    clean, n_run = run_step(sd1, args, slices)
    tracker = RowTracker()
    with InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0, mode=mode)], tracker):
        tracker.begin_step(n_cond, n_total, 3, 20)
        out, _ = run_step(sd1, args, slices)
    assert tracker.unknown_calls == 0
    for row in range(n_run):
        is_cond = row < n_cond
        must_change = is_cond if mode == "positive" else not is_cond
        if must_change:
            assert (out[row] - clean[row]).abs().max() > 1e-4, f"row {row} ({'cond' if is_cond else 'uncond'}) unchanged"
        else:
            assert torch.equal(out[row], clean[row]), f"row {row} ({'cond' if is_cond else 'uncond'}) was changed"


class _Gathered:
    """Rows 0 and 2 of 4 are conditional: not consecutive, so the hook gathers them (never the host's layout)."""

    progress = 0.0
    unknown_calls = 0

    def take(self, batch, device, context=None):
        pass

    def rows(self, context, batch, device):
        from lib_anima.inject import _rows

        return _rows(torch.tensor([True, False, True, False][:batch]), device)


@pytest.mark.parametrize("tracker_kind", ["consecutive", "gathered"])
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generation_path_in_place_equals_autograd_path(sd1, sd1_sites, tracker_kind, mode):
    """Without autograd the hook adds into the site's output in place; the numbers are the same as with autograd
    (out of place), bit for bit, and rows outside the mode stay bit-exact."""
    args = inputs(4, seed=5)
    clean = call(sd1, args)
    act = Activation(make_context(sd1_sites), scale=1.0, mode=mode)

    def run(grad: bool) -> torch.Tensor:
        tracker = _Gathered() if tracker_kind == "gathered" else RowTracker()
        with InjectionSession(sd1, [act], tracker):
            if tracker_kind == "consecutive":
                tracker.begin_step(2, 4, 0, 10)
            with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
                return sd1(args["x"], **{k: v for k, v in args.items() if k != "x"}).detach()

    in_place, autograd = run(False), run(True)
    assert torch.equal(in_place, autograd)
    cond = [0, 1] if tracker_kind == "consecutive" else [0, 2]
    touched = cond if mode == "positive" else [r for r in range(4) if r not in cond]
    for row in range(4):
        changed = not torch.equal(in_place[row], clean[row])
        assert changed == (row in touched), f"row {row}"


@pytest.mark.parametrize("bias", [False, True])
def test_folded_attention_in_place_adds_into_the_given_tensor(sd1_sites, bias):
    attn = sd1_sites[0].module
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(N_TOKENS, CTX_DIM, generator=g)
    folded = fold_site(attn, tokens, strength=0.7)
    if bias:
        folded.qk_bias = torch.randn(folded.qk.shape[1], generator=g)
    x = torch.randn(2, 16, attn.to_q.weight.shape[1], generator=g)
    base = torch.randn(2, 16, attn.to_out[0].weight.shape[0], generator=g)
    with torch.no_grad():
        expected = base + folded_attention(x, folded)
        target = base.clone()
        got = folded_attention(x, folded, add_to=target, in_place=True)
        out_of_place = folded_attention(x, folded, add_to=base)
    assert got is target
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, out_of_place)
    assert not torch.equal(base, target)  # out of place left its input alone


def test_folded_keys_follow_new_weight_storage_inside_a_session():
    """The folded keys/values are cached per session; weights that get new storage mid-session (what a move to
    another device or dtype does) are folded again."""
    unet = unets.sd1_unet(context_dim=CTX_DIM).requires_grad_(False)
    sites = find_sites(unet)
    args = inputs(2, seed=4)
    act = Activation(make_context(sites), scale=1.0)
    with InjectionSession(unet, [act]):
        before = call(unet, args)  # folds
        for site in sites:
            site.module.to_q.weight.data = site.module.to_q.weight.data * 1.5  # new storage
        after = call(unet, args)
    with InjectionSession(unet, [act]):
        fresh = call(unet, args)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)


def test_positive_and_negative_together(sd1, sd1_sites):
    """Two contexts, one per mode: each row kind gets exactly its own context (same as running each alone)."""
    args = inputs(4, seed=9)
    pos = Activation(make_context(sd1_sites, seed=1), scale=1.0, mode="positive")
    neg = Activation(make_context(sd1_sites, seed=2), scale=1.0, mode="negative")

    def run(acts):
        tracker = RowTracker()
        with InjectionSession(sd1, acts, tracker):
            tracker.begin_step(2, 4, 0, 10)
            return call(sd1, args)

    both, only_pos, only_neg = run([pos, neg]), run([pos]), run([neg])
    assert torch.equal(both[:2], only_pos[:2])
    assert torch.equal(both[2:], only_neg[2:])


def test_calls_beyond_the_layout_are_untouched_and_counted(sd1, sd1_sites):
    args = inputs(4, seed=2)
    clean = call(sd1, args)
    clean_half = call(sd1, args, 0, 2)
    tracker = RowTracker()
    with InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0)], tracker):
        # before any step was announced
        assert torch.equal(call(sd1, args), clean)
        assert tracker.unknown_calls == 1
        tracker.begin_step(1, 2, 0, 10)
        assert not torch.equal(call(sd1, args, 0, 2)[0], clean_half[0])  # the announced layout: injected
        assert tracker.unknown_calls == 1
        # one more call in the same step (e.g. another extension running the UNet): not ours to touch
        assert torch.equal(call(sd1, args, 0, 2), clean_half)
        assert tracker.unknown_calls == 2
        # a call larger than what is left of the layout
        tracker.begin_step(2, 4, 1, 10)
        call(sd1, args, 0, 2)
        assert torch.equal(call(sd1, args), clean)
        assert tracker.unknown_calls == 3
        # the next step starts counting afresh
        tracker.begin_step(2, 4, 2, 10)
        out = call(sd1, args)
        assert tracker.unknown_calls == 3
    assert not torch.equal(out[:2], clean[:2]) and torch.equal(out[2:], clean[2:])


# ---- start / end ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start,end", [(0.5, 1.0), (0.0, 0.5), (0.2, 0.4)])
def test_start_end_window(sd1, sd1_sites, start, end):
    args = inputs(2, seed=4)
    clean = call(sd1, args)
    tracker = RowTracker()
    changed = set()
    with InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0, start=start, end=end)], tracker):
        for step in range(10):
            tracker.begin_step(1, 2, step, 10)
            out = call(sd1, args)
            assert torch.equal(out[1], clean[1])
            if not torch.equal(out[0], clean[0]):
                changed.add(step)
    expected = {s for s in range(10) if start <= s / 10 < end}
    assert expected and changed == expected


def test_end_one_includes_the_last_step(sd1, sd1_sites):
    args = inputs(2, seed=4)
    clean = call(sd1, args)
    tracker = RowTracker()
    with InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0, start=0.5, end=1.0)], tracker):
        tracker.begin_step(1, 2, 10, 10)
        assert not torch.equal(call(sd1, args)[0], clean[0])


@pytest.mark.parametrize(
    "start,end",
    [(0.5, 0.5), (0.6, 0.4), (-0.1, 0.5), (0.0, 1.1), (float("nan"), 1.0), (0.0, float("nan")),
     (0.0, float("inf")), ("abc", 1.0), (None, 1.0)],
)
def test_activation_start_end_validation(sd1_sites, start, end):
    with pytest.raises(ArgumentError):
        Activation(make_context(sd1_sites), scale=1.0, start=start, end=end)


def test_activation_start_end_accepted(sd1_sites):
    act = Activation(make_context(sd1_sites), scale=1.0, start="0.25", end=1)
    assert (act.start, act.end) == (0.25, 1.0)


# ---- scale and mode validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 4.01, "abc", float("nan"), float("inf"), float("-inf"), None, "", [1]])
def test_scale_validation_rejects(sd1_sites, bad):
    with pytest.raises(ArgumentError):
        check_scale(bad)
    with pytest.raises(ArgumentError):
        Activation(make_context(sd1_sites), scale=bad)


@pytest.mark.parametrize("good,value", [(0, 0.0), (4, 4.0), ("2.5", 2.5), (1.0, 1.0)])
def test_scale_validation_accepts(sd1_sites, good, value):
    assert check_scale(good) == value
    assert Activation(make_context(sd1_sites), scale=good).scale == value


def test_mode_validation(sd1_sites):
    assert check_mode(" Negative ") == "negative"
    assert Activation(make_context(sd1_sites), scale=1, mode="POSITIVE").mode == "positive"
    for bad in ("both", "", None, "pos"):
        with pytest.raises(ArgumentError):
            check_mode(bad)
        with pytest.raises(ArgumentError):
            Activation(make_context(sd1_sites), scale=1, mode=bad)


# ---- presets and per-site weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["diffusers", "host"])
def test_the_two_module_families_give_the_same_presets(request, family):
    """diffusers' SD1-like and SDXL-like UNets have the host's site counts and preset sizes."""
    sd1, sdxl = ("sd1", "sdxl") if family == "diffusers" else ("ldm_sd1", "sgm_sdxl")
    sizes = {}
    for name in (sd1, sdxl):
        sites = find_sites(request.getfixturevalue(name))
        sizes[name] = [len(sites)] + [int(sum(preset_weights(sites, p))) for p in ("fine", "middle", "coarse", "in", "mid", "out")]
    assert sizes[sd1] == [16, 5, 5, 6, 6, 1, 9]
    assert sizes[sdxl] == [70, 10, 10, 60, 24, 10, 36]


def test_sd1_preset_site_selection(ldm_sd1):
    sd1_sites = find_sites(ldm_sd1)
    names = [s.name for s in sd1_sites]
    chosen = {p: {n for n, w in zip(names, preset_weights(sd1_sites, p), strict=True) if w} for p in ("fine", "coarse", "middle")}
    assert chosen["fine"] == SD1_FINE
    assert chosen["coarse"] == SD1_COARSE
    assert chosen["middle"] == set(names) - SD1_FINE - SD1_COARSE
    assert parse_weights("all", sd1_sites) == [1.0] * 16
    assert parse_weights(None, sd1_sites) == [1.0] * 16
    assert parse_weights(" Fine ", sd1_sites) == preset_weights(sd1_sites, "fine")
    for section in ("in", "mid", "out"):
        w = parse_weights(section, sd1_sites)
        assert w == [float(s.section == section) for s in sd1_sites] and sum(w) > 0


def test_sdxl_preset_site_selection(sgm_sdxl):
    sdxl_sites = find_sites(sgm_sdxl)
    assert len(sdxl_sites) == 70
    mid = [float(s.section == "mid") for s in sdxl_sites]
    assert sum(mid) == 10
    assert preset_weights(sdxl_sites, "middle") == mid  # only two attention resolutions: the middle block
    fine, coarse = preset_weights(sdxl_sites, "fine"), preset_weights(sdxl_sites, "coarse")
    assert sum(fine) > 0 and sum(coarse) > 0
    assert all(f + c == 1 for f, c in zip(fine, coarse, strict=True))  # two levels: every site is one or the other
    assert all(c == 1 for c, m in zip(coarse, mid, strict=True) if m)


def test_fine_preset_leaves_coarse_sites_untouched(sd1, sd1_sites):
    ctx = make_context(sd1_sites, seed=6)
    args = inputs(2, seed=6)
    fine = {s.name for s, w in zip(sd1_sites, preset_weights(sd1_sites, "fine"), strict=True) if w}
    assert len(fine) == 5
    with InjectionSession(sd1, [Activation(ctx, scale=1.5, weights="fine")]):
        hooked_sites = {s.name for s in sd1_sites if s.module._forward_hooks}
        cap = Capture([s.module for s in sd1_sites])
        try:
            call(sd1, args)
        finally:
            cap.remove()
    assert hooked_sites == fine
    for site in sd1_sites:
        [(x, context, hooked)] = cap.calls[site.index]
        with torch.no_grad():
            delta = hooked - site.module(x, context)
        if site.name in fine:
            assert delta.abs().max() > 1e-3, site.name
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), site.name


@pytest.mark.parametrize("spec", ["1,0,1", [1.0] * 15, [1.0] * 17, "abc", "1," * 15 + "x", [5.0] * 16,
                                  [float("nan")] * 16, "no-such-preset"])
def test_bad_site_weights(sd1, sd1_sites, spec):
    with pytest.raises(ArgumentError):
        parse_weights(spec, sd1_sites)
    with pytest.raises(ArgumentError):
        InjectionSession(sd1, [Activation(make_context(sd1_sites), scale=1.0, weights=spec)])


def test_custom_weights_length_message(sd1_sites):
    with pytest.raises(ArgumentError, match=r"got 3 values.*16 sites"):
        parse_weights("1,0,1", sd1_sites)


def test_custom_weight_list_scales_each_site(sd1_sites):
    attn = sd1_sites[2].module
    model = OneSite(attn)
    x, ctx = site_inputs(attn)
    tokens = torch.randn(N_TOKENS, CTX_DIM)

    def delta(w):
        with torch.no_grad(), InjectionSession(model, [Activation(one_site_context(tokens), scale=2.0, weights=w)]):
            return model(x, ctx) - clean

    with torch.no_grad():
        clean = model(x, ctx)
    torch.testing.assert_close(delta("0.5"), delta([1.0]) * 0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta([-1.0]), -delta([1.0]), atol=1e-5, rtol=0)


# ---- SDXL ------------------------------------------------------------------------------------------------------


def test_sdxl_injection_changes_and_restores(sdxl, sdxl_sites):
    assert len(sdxl_sites) == 70
    ctx = make_context(sdxl_sites, seed=8, arch="sdxl")
    args = inputs(2, seed=8, adm=ADM)
    clean = call(sdxl, args)
    session = InjectionSession(sdxl, [Activation(ctx, scale=1.0)])
    with session:
        assert sum(1 for s in sdxl_sites if s.module._forward_hooks) == 70
        out = call(sdxl, args)
    assert_no_hooks(sdxl)
    assert (out - clean).abs().max() > 1e-4
    assert torch.equal(call(sdxl, args), clean)


def test_sdxl_negative_mode_rows(sdxl, sdxl_sites):
    ctx = make_context(sdxl_sites, seed=8, arch="sdxl")
    args = inputs(4, seed=3, adm=ADM)
    clean = call(sdxl, args)
    tracker = RowTracker()
    with InjectionSession(sdxl, [Activation(ctx, scale=1.0, mode="negative")], tracker):
        tracker.begin_step(2, 4, 0, 10)
        out = call(sdxl, args)
    assert torch.equal(out[:2], clean[:2])
    assert (out[2:] - clean[2:]).abs().amax(dim=(1, 2, 3)).min() > 1e-4


# ---- contexts for another model ---------------------------------------------------------------------------------


def test_sd1_context_on_sdxl_unet(sdxl, sd1_sites):
    with pytest.raises(ContextMismatchError, match=r"16 cross-attention sites.*70"):
        InjectionSession(sdxl, [Activation(make_context(sd1_sites), scale=1.0)])


def test_sdxl_context_on_sd1_unet(sd1, sdxl_sites):
    with pytest.raises(ContextMismatchError, match=r"70 cross-attention sites.*16"):
        InjectionSession(sd1, [Activation(make_context(sdxl_sites, arch="sdxl"), scale=1.0)])


def test_wrong_context_dim(sd1, sd1_sites):
    with pytest.raises(ContextMismatchError, match=r"context_dim 32.*takes 64"):
        InjectionSession(sd1, [Activation(make_context(sd1_sites, dim=32), scale=1.0)])


def test_wrong_site_layout(ldm_sd1):
    sites = find_sites(ldm_sd1)
    ctx = make_context(sites)
    ctx.site_names = list(reversed(ctx.site_names))
    with pytest.raises(ContextMismatchError, match=r"site 0 is 'output_blocks\.11.*'input_blocks\.1\."):
        InjectionSession(ldm_sd1, [Activation(ctx, scale=1.0)])


def test_wrong_site_layout_diffusers(sd1, sd1_sites):
    ctx = make_context(sd1_sites)
    ctx.site_names = list(reversed(ctx.site_names))
    with pytest.raises(ContextMismatchError, match=r"site 0 is 'diffusion\.up_blocks\.3.*'diffusion\.down_blocks\.0\."):
        InjectionSession(sd1, [Activation(ctx, scale=1.0)])


def test_mismatch_with_a_good_context_installs_nothing(sd1, sd1_sites):
    good = Activation(make_context(sd1_sites), scale=1.0)
    bad = Activation(make_context(sd1_sites, dim=32), scale=1.0)
    with pytest.raises(ContextMismatchError):
        InjectionSession(sd1, [good, bad])
    assert_no_hooks(sd1)


# ---- training ---------------------------------------------------------------------------------------------------


def test_gradients_reach_tokens_only(sd1, sd1_sites):
    assert not any(p.requires_grad for p in sd1.parameters())
    tokens = torch.randn(16, N_TOKENS, CTX_DIM, generator=torch.Generator().manual_seed(12)).requires_grad_()
    ctx = ReferenceContext(tokens=tokens, arch="sd1", site_names=[s.name for s in sd1_sites])
    args = inputs(2, seed=12)
    kw = {k: v for k, v in args.items() if k != "x"}
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(13))
    session = InjectionSession(sd1, [Activation(ctx, scale=1.0)])
    with session:
        out = sd1(args["x"], **kw)
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        assert tokens.grad is not None
        per_site = tokens.grad.abs().flatten(1).amax(dim=1)
        assert bool((per_site > 0).all()), per_site  # every site's tokens get a gradient
        assert all(p.grad is None for p in sd1.parameters())
        # one SGD step: the next forward must see the new tokens (no stale cached keys/values)
        with torch.no_grad():
            tokens -= 10.0 * tokens.grad
            after = sd1(args["x"], **kw)
    assert_no_hooks(sd1)
    assert not torch.equal(after, out.detach())
    fresh_ctx = ReferenceContext(tokens=tokens.detach().clone(), arch="sd1", site_names=ctx.site_names)
    with InjectionSession(sd1, [Activation(fresh_ctx, scale=1.0)]):
        expected = call(sd1, args)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)


def test_token_gradient_matches_reference_formula(sd1_sites):
    """d loss / d tokens through the hook equals the gradient of the hand-written formula (one site)."""
    attn = sd1_sites[4].module
    model = OneSite(attn)
    x, ctx = site_inputs(attn, batch=2, n=6)
    tokens = torch.randn(1, 3, CTX_DIM, generator=torch.Generator().manual_seed(4)).requires_grad_()
    act = Activation(ReferenceContext(tokens=tokens, arch="sd1", site_names=["attn2"]), scale=1.3)
    with InjectionSession(model, [act]):
        model(x, ctx).pow(2).sum().backward()
    got = tokens.grad.clone()

    ref_tokens = tokens.detach().double().requires_grad_()
    with torch.no_grad():
        clean = model(x, ctx).double()
    W = attn.to_out[0].weight
    # reference_delta works in float64; redo it here keeping the graph to ref_tokens
    q = x.double() @ attn.to_q.weight.double().T
    k = ref_tokens[0] @ attn.to_k.weight.double().T
    v = ref_tokens[0] @ attn.to_v.weight.double().T
    h = int(attn.heads)
    d = q.shape[-1] // h
    qh = q.reshape(2, 6, h, d).permute(0, 2, 1, 3)
    kh, vh = (t.reshape(-1, h, d).permute(1, 0, 2) for t in (k, v))
    out = (torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, -1) @ vh).permute(0, 2, 1, 3).reshape(2, 6, -1)
    (clean + 1.3 * (out @ W.double().T)).pow(2).sum().backward()
    assert got.abs().max() > 1e-4
    torch.testing.assert_close(got, ref_tokens.grad.float(), atol=1e-5, rtol=1e-4)


# ---- the host's "upcast cross attention layer to float32" -----------------------------------------------------


def test_upcast_computes_a_half_precision_term_in_float32(sd1_sites):
    """With the host's upcast option a bfloat16 site's term is computed in float32 and rounded once: closer to a
    float64 reference than the all-half path, within one rounding of the result, and what the session adds."""
    import copy

    attn = copy.deepcopy(sd1_sites[3].module).to(torch.bfloat16)
    g = torch.Generator().manual_seed(21)
    tokens = torch.randn(N_TOKENS, CTX_DIM, generator=g).to(torch.bfloat16).float()  # values both paths see
    x = torch.randn(2, 64, attn.to_q.in_features, generator=g).to(torch.bfloat16)
    reference = reference_delta(attn, x, tokens).double()
    with torch.no_grad():
        upcast = folded_attention(x, fold_site(attn, tokens, dtype=torch.float32), upcast=True)
        half = folded_attention(x, fold_site(attn, tokens))
    assert upcast.dtype == half.dtype == torch.bfloat16
    err_upcast = (upcast.double() - reference).abs().max().item()
    err_half = (half.double() - reference).abs().max().item()
    assert err_upcast < err_half, (err_upcast, err_half)
    assert err_upcast <= reference.abs().max().item() * 2**-7  # one bfloat16 rounding of the result

    model = OneSite(attn)
    context = torch.randn(2, 7, CTX_DIM, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        clean = model(x, context)
        with InjectionSession(model, [Activation(one_site_context(tokens), scale=1.0)], upcast=True):
            hooked = model(x, context)
    assert torch.equal(hooked, clean + upcast)


def test_check_fits_refuses_what_a_session_refuses_and_installs_nothing(sd1, sd1_sites, sdxl_sites):
    check_fits(sd1, Activation(make_context(sd1_sites), 1.0, "positive"))
    assert_no_hooks(sd1)
    with pytest.raises(ContextMismatchError):
        check_fits(sd1, Activation(make_context(sdxl_sites, arch="sdxl"), 1.0, "positive"))
    with pytest.raises(ContextMismatchError):
        check_fits(sd1, Activation(make_context(sd1_sites, dim=CTX_DIM * 2), 1.0, "positive"))
    with pytest.raises(ArgumentError):
        check_fits(sd1, Activation(make_context(sd1_sites), 1.0, "positive", weights=[1.0, 0.5]))
    assert_no_hooks(sd1)
