"""Which rows get the context, for every call pattern the host and other extensions make.

Each test replays one step of sampling: the tracker is told the step's text conditioning (``text_cond`` /
``text_uncond``, as the host's ``on_cfg_denoiser`` does), then the UNet is called the way the host or another
extension calls it. The rows the term landed on are the rows whose output differs from the same call made without
the extension. Runs on diffusers' UNet and on the host's own ldm UNet (skipped, visibly, without the host source).
"""

from __future__ import annotations

import pytest
import torch
import unets

from lib_anima.context import ReferenceContext
from lib_anima.inject import Activation, InjectionSession, RowTracker, _matches
from lib_anima.layout import find_sites

DIM = 64
TOKENS = 7  # text tokens per row (the host uses 77; nothing here depends on it)


@pytest.fixture(scope="module", params=["diffusers", "ldm"])
def unet(request) -> torch.nn.Module:
    make = unets.diffusers_sd1_unet if request.param == "diffusers" else unets.ldm_sd1_unet
    return make(context_dim=DIM).requires_grad_(False)


def texts(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))


COND, UNCOND = texts(1, 1), texts(1, 2)  # a prompt and a negative prompt, encoded


def context_for(unet, mode: str = "positive", scale: float = 1.0) -> Activation:
    sites = find_sites(unet)
    tokens = torch.randn(len(sites), 4, DIM, generator=torch.Generator().manual_seed(3))
    ctx = ReferenceContext(tokens=tokens, arch="sd1", site_names=[s.name for s in sites], name="rows")
    return Activation(ctx, scale=scale, mode=mode)


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run(unet, x: torch.Tensor, context: torch.Tensor, direct: bool = False) -> torch.Tensor:
    t = torch.full((x.shape[0],), 500)
    with torch.no_grad():
        return unet.forward(x, t, context=context) if direct else unet(x, t, context=context)


def landed(out: torch.Tensor, clean: torch.Tensor) -> list[int]:
    return [i for i in range(out.shape[0]) if not torch.equal(out[i], clean[i])]


def step(tracker: RowTracker, n_cond: int, n_total: int, cond=COND, uncond=UNCOND) -> None:
    tracker.begin_step(n_cond, n_total, 0, 10, text=lambda: (cond, uncond))


def rows_of(*kinds: str) -> torch.Tensor:
    return torch.cat([COND if k == "c" else UNCOND for k in kinds])


# ---- the host's own layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_host_layout_one_call(unet, mode):
    x, ctx = latents(4), rows_of("c", "c", "u", "u")
    clean = run(unet, x, ctx)
    tracker = RowTracker()
    with InjectionSession(unet, [context_for(unet, mode)], tracker):
        step(tracker, 2, 4)
        out = run(unet, x, ctx)
    assert landed(out, clean) == ([0, 1] if mode == "positive" else [2, 3])
    assert tracker.unknown_calls == 0


def test_cond_and_uncond_apart_with_different_lengths(unet):
    """A BREAK prompt: cond (2 chunks) and uncond (1 chunk) are separate calls of different lengths."""
    long_cond = torch.cat([COND, texts(1, 9)], dim=1)
    tracker = RowTracker()
    x = latents(2)
    clean_c, clean_u = run(unet, x[:1], long_cond), run(unet, x[1:], UNCOND)
    with InjectionSession(unet, [context_for(unet)], tracker):
        step(tracker, 1, 2, cond=long_cond)
        out_c, out_u = run(unet, x[:1], long_cond), run(unet, x[1:], UNCOND)
    assert landed(out_c, clean_c) == [0] and landed(out_u, clean_u) == []
    assert tracker.unknown_calls == 0


def test_padded_uncond_is_still_uncond(unet):
    """The host pads the shorter conditioning with empty chunks: the padded row starts with the reference."""
    padded = torch.cat([UNCOND, texts(1, 5)], dim=1)
    long_cond = torch.cat([COND, texts(1, 9)], dim=1)
    x, ctx = latents(2), torch.cat([long_cond, padded])
    clean = run(unet, x, ctx)
    tracker = RowTracker()
    with InjectionSession(unet, [context_for(unet, "negative")], tracker):
        step(tracker, 1, 2, cond=long_cond, uncond=UNCOND)
        out = run(unet, x, ctx)
    assert landed(out, clean) == [1]
    assert tracker.unknown_calls == 0


# ---- other extensions' call patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_tiles_every_tile_batch_gets_it(unet, mode):
    """Tiled Diffusion: 3 calls of batch 6 per step (3 tiles x cond/uncond), none of them the host's layout."""
    tracker = RowTracker()
    tiles = [latents(6, seed=s) for s in range(3)]
    ctx = rows_of("c", "c", "c", "u", "u", "u")
    clean = [run(unet, x, ctx) for x in tiles]
    with InjectionSession(unet, [context_for(unet, mode)], tracker):
        step(tracker, 1, 2)
        outs = [run(unet, x, ctx) for x in tiles]
    want = [0, 1, 2] if mode == "positive" else [3, 4, 5]
    assert [landed(o, c) for o, c in zip(outs, clean, strict=True)] == [want] * 3
    assert tracker.unknown_calls == 0


def test_animatediff_windows_each_frame_gets_it(unet):
    """AnimateDiff with more frames than its window: the step's [4 cond; 4 uncond] rows run as two calls of
    [2 cond; 2 uncond], a layout the host's row counting would take as all-cond then all-uncond."""
    tracker = RowTracker()
    frames = latents(4)
    windows = [(frames[:2], rows_of("c", "c", "u", "u")), (frames[2:], rows_of("c", "c", "u", "u"))]
    clean = [run(unet, torch.cat([f, f]), c) for f, c in windows]
    with InjectionSession(unet, [context_for(unet)], tracker):
        step(tracker, 4, 8)
        outs = [run(unet, torch.cat([f, f]), c) for f, c in windows]
    assert [landed(o, c) for o, c in zip(outs, clean, strict=True)] == [[0, 1], [0, 1]]
    assert tracker.unknown_calls == 0


@pytest.mark.parametrize("mode,want", [("positive", []), ("negative", [0])])
def test_sag_extra_uncond_pass_is_uncond(unet, mode, want):
    """SAG runs one more batch-1 call on the unconditional text after the step's call: it is an uncond row."""
    tracker = RowTracker()
    x = latents(2)
    degraded = latents(1, seed=7)
    clean = run(unet, degraded, UNCOND)
    with InjectionSession(unet, [context_for(unet, mode)], tracker):
        step(tracker, 1, 2)
        run(unet, x, rows_of("c", "u"))
        out = run(unet, degraded, UNCOND)
    assert landed(out, clean) == want
    assert tracker.unknown_calls == 0


def test_direct_call_gets_its_own_rows_not_the_outer_calls(unet):
    """ControlNet's reference pass calls the UNet's forward directly (no pre-hook): its rows come from its own
    conditioning (here in the opposite order to the outer call), never from the outer call's layout."""
    tracker = RowTracker()
    x = latents(2)
    reversed_ctx = rows_of("u", "c")
    clean = run(unet, x, reversed_ctx)
    with InjectionSession(unet, [context_for(unet)], tracker):
        step(tracker, 1, 2)
        run(unet, x, rows_of("c", "u"))  # the outer call, counted by the layout
        out = run(unet, x, reversed_ctx, direct=True)
    assert landed(out, clean) == [1]
    assert tracker.unknown_calls == 0


def test_marker_token_is_allowed_for(unet):
    """ControlNet prepends a ±1024 marker token to each conditioning and strips it inside the UNet."""
    marked_cond = torch.cat([torch.full((1, 1, DIM), 1024.0), COND], dim=1)
    marked_uncond = torch.cat([torch.full((1, 1, DIM), -1024.0), UNCOND], dim=1)
    tracker = RowTracker()
    x, ctx = latents(2), rows_of("c", "u")
    clean = run(unet, x, ctx)
    with InjectionSession(unet, [context_for(unet)], tracker):
        step(tracker, 1, 2, cond=marked_cond, uncond=marked_uncond)
        out = run(unet, x, ctx)
    assert landed(out, clean) == [0]
    assert tracker.unknown_calls == 0


def test_unknown_text_is_left_alone_and_counted(unet):
    """Rows conditioned on a text that is neither the prompt nor the negative prompt (a region's own prompt)."""
    tracker = RowTracker()
    x, ctx = latents(3), torch.cat([COND, texts(1, 11), UNCOND])
    clean = run(unet, x, ctx)
    with InjectionSession(unet, [context_for(unet)], tracker):
        step(tracker, 1, 2)
        out = run(unet, x, ctx)
    assert landed(out, clean) == [0]
    assert tracker.unknown_calls == 1 and tracker.unplaced_rows == 1


# ---- the same text in prompt and negative prompt -----------------------------------------------------------------


def test_same_text_falls_back_to_the_layout_of_the_counted_call(unet):
    """Prompt == negative prompt: the text cannot tell the rows apart, the host's layout does (the cond rows come
    first). The result equals what the layout alone gives (a tracker told no text)."""
    x, ctx = latents(2), torch.cat([COND, COND])
    clean = run(unet, x, ctx)
    by_text, by_layout = RowTracker(), RowTracker()
    with InjectionSession(unet, [context_for(unet)], by_text):
        step(by_text, 1, 2, cond=COND, uncond=COND)
        out = run(unet, x, ctx)
    with InjectionSession(unet, [context_for(unet)], by_layout):
        by_layout.begin_step(1, 2, 0, 10)
        layout_out = run(unet, x, ctx)
    assert landed(out, clean) == [0]
    assert torch.equal(out, layout_out)


def test_same_text_in_a_call_the_layout_does_not_cover_is_left_alone(unet):
    tracker = RowTracker()
    x, ctx = latents(2), torch.cat([COND, COND])
    clean = run(unet, x, ctx.clone())
    with InjectionSession(unet, [context_for(unet)], tracker):
        step(tracker, 1, 2, cond=COND, uncond=COND)
        run(unet, x, ctx)
        out = run(unet, x, ctx.clone(), direct=True)  # not the counted call
    assert landed(out, clean) == []
    assert tracker.unknown_calls == 1


# ---- wrapped blocks, in-place weight edits -------------------------------------------------------------------------


class Scaler(torch.nn.Module):
    """A wrapper in the way Kohya's Deep Shrink wraps a block while it samples (the original at ``.block``)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


def _blocks(unet) -> tuple[torch.nn.ModuleList, int]:
    body = unet.diffusion if hasattr(unet, "diffusion") else unet
    return (body.down_blocks, 1) if hasattr(body, "down_blocks") else (body.input_blocks, 2)


def test_context_applies_while_a_block_is_wrapped(unet):
    act = context_for(unet)  # made for the unwrapped model
    blocks, index = _blocks(unet)
    original = blocks[index]
    x, ctx = latents(2), rows_of("c", "u")
    blocks[index] = Scaler(original)
    try:
        assert any(".block." in name for name, _ in unet.named_modules())
        clean = run(unet, x, ctx)
        tracker = RowTracker()
        with InjectionSession(unet, [act], tracker) as session:
            step(tracker, 1, 2)
            out = run(unet, x, ctx)
        assert [s.name for s in session.sites] == act.context.site_names
    finally:
        blocks[index] = original
    assert landed(out, clean) == [0]


def test_in_place_weight_edit_refolds(unet):
    """The host's Lora writes merged weights into the same storage (`copy_`): the next call uses them, the same
    as a session started on the merged model."""
    act = context_for(unet)
    x, ctx = latents(2), rows_of("c", "u")
    sites = find_sites(unet)
    saved = [s.module.to_k.weight.detach().clone() for s in sites]
    try:
        tracker = RowTracker()
        with InjectionSession(unet, [act], tracker):
            step(tracker, 1, 2)
            before = run(unet, x, ctx)
            with torch.no_grad():
                for s in sites:
                    s.module.to_k.weight.copy_(s.module.to_k.weight * 1.5)  # same storage, new values
            step(tracker, 1, 2)
            after = run(unet, x, ctx)
        fresh_tracker = RowTracker()
        with InjectionSession(unet, [context_for(unet)], fresh_tracker):
            step(fresh_tracker, 1, 2)
            fresh = run(unet, x, ctx)
    finally:
        with torch.no_grad():
            for s, w in zip(sites, saved, strict=True):
                s.module.to_k.weight.copy_(w)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)


# ---- the matching rule itself ------------------------------------------------------------------------------------


def test_matches_prefix_suffix_and_nothing_looser():
    a, b = texts(1, 1), texts(1, 2)
    padded = torch.cat([a, b], dim=1)  # a + an appended chunk
    marked = torch.cat([torch.full((1, 1, DIM), 1024.0), a], dim=1)
    assert _matches(a, a).tolist() == [[True]]
    assert _matches(padded, a).tolist() == [[True]]  # padding appended to the row
    assert _matches(a, marked).tolist() == [[True]]  # the row is the marked reference without its marker
    assert _matches(b, a).tolist() == [[False]]
    chunk_a, chunk_b = (torch.randn(1, 77, DIM, generator=torch.Generator().manual_seed(s)) for s in (4, 5))
    assert _matches(torch.cat([chunk_b, chunk_a], dim=1), chunk_a).tolist() == [[False]]  # a whole chunk before it
    near = a.clone()
    near[0, 3, 40] += 1e-6
    assert _matches(near, a).tolist() == [[False]]  # exact, not approximate
