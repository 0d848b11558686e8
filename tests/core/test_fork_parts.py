"""The host-independent parts of the Forge/reForge support: rows from the samplers' chunk list, the patch keys of
sites, folding through a host's weight accessor, the patch session's arithmetic against the hook session's, and
the extension's own equivalents of what Forge removed (schedule syntax, dataset reading, templates)."""

from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest
import torch
import unets
from PIL import Image

from lib_anima import dataset
from lib_anima.context import ReferenceContext
from lib_anima.errors import ArgumentError
from lib_anima.inject import COND, NEITHER, UNCOND, Activation, ChunkRows, InjectionSession, chunk_kinds, fold_site
from lib_anima.layout import find_sites, patch_key
from lib_anima.patching import PatchSession
from lib_anima.schedule import schedule_pairs

DIM = 64

# ---- rows from cond_or_uncond ------------------------------------------------------------------------------------


def test_chunk_kinds():
    assert chunk_kinds([1, 0], 4) == [UNCOND, UNCOND, COND, COND]
    assert chunk_kinds([1, 0, 0], 6) == [UNCOND, UNCOND, COND, COND, COND, COND]
    assert chunk_kinds([0], 3) == [COND] * 3
    assert chunk_kinds([0, 2], 2) == [COND, NEITHER]  # an unknown label is left alone
    assert chunk_kinds([1, 0], 3) is None and chunk_kinds(None, 2) is None and chunk_kinds([], 2) is None


def test_chunk_rows_spans_progress_and_records():
    tracker = ChunkRows(record=True)
    tracker.begin_step(2, 4, 3, 12)
    assert tracker.progress == 0.25
    call = [1, 0]
    rows = tracker.rows(call, 4, torch.device("cpu"))
    assert rows.cond.tolist() == [2, 3] and rows.uncond.tolist() == [0, 1]
    assert rows.cond_span == slice(2, 4) and rows.uncond_span == slice(0, 2)
    assert tracker.rows(call, 4, torch.device("cpu")) is rows  # the next site of the same call: no new record
    assert tracker.rows([1, 0], 3, torch.device("cpu")) is None  # does not split into the chunks
    assert tracker.unknown_calls == 1 and tracker.unplaced_rows == 3
    assert [(r.cond, r.uncond, r.unplaced) for r in tracker.records] == [([2, 3], [0, 1], []), ([], [], [0, 1, 2])]


# ---- sites ----------------------------------------------------------------------------------------------------


def test_patch_keys():
    assert patch_key("input_blocks.4.1.transformer_blocks.1.attn2") == ("input", 4, 1)
    assert patch_key("middle_block.1.transformer_blocks.9.attn2") == ("middle", 0, 9)
    assert patch_key("output_blocks.11.1.transformer_blocks.0.attn2") == ("output", 11, 0)
    assert patch_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2") is None


def test_every_ldm_site_has_its_own_patch_key():
    sites = find_sites(unets.ldm_sd1_unet(context_dim=DIM)) if unets.host_root() else None
    if sites is None:
        unets.require_host_modules()
    keys = [patch_key(s.name) for s in sites]
    assert None not in keys and len(set(keys)) == len(sites) == 16


# ---- arithmetic -------------------------------------------------------------------------------------------------


def _attention(dim: int = 32, heads: int = 4) -> torch.nn.Module:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(dim, cross_attention_dim=DIM, heads=heads, dim_head=dim // heads).eval()


def test_fold_through_an_accessor_equals_the_modules_own():
    attn = _attention()
    tokens = torch.randn(3, DIM)
    plain = fold_site(attn, tokens, 0.7)
    through = fold_site(attn, tokens, 0.7, read=lambda layer: (layer.weight, layer.bias))
    for a, b in ((plain.qk, through.qk), (plain.vo, through.vo)):
        assert torch.equal(a, b)
    scaled = fold_site(attn, tokens, 0.7, read=lambda layer: (layer.weight * 2, layer.bias))  # e.g. fp8 scale
    assert not torch.allclose(scaled.vo, plain.vo)


class _Patcher:
    """The two patch points of a fork's UNet patcher, as the session uses them (clone, then set)."""

    def __init__(self) -> None:
        self.patches: dict[str, list] = {}

    def clone(self) -> _Patcher:
        copy = _Patcher()
        copy.patches = {k: list(v) for k, v in self.patches.items()}
        return copy

    def set_model_attn2_patch(self, patch) -> None:
        self.patches.setdefault("attn2_patch", []).append(patch)

    def set_model_attn2_output_patch(self, patch) -> None:
        self.patches.setdefault("attn2_output_patch", []).append(patch)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_patch_session_adds_what_the_hooks_add(mode):
    """At every site: the same term on the same rows as the A1111 hooks, the other rows bit-exact."""
    unets.require_host_modules()
    unet = unets.ldm_sd1_unet(context_dim=DIM).requires_grad_(False)
    sites = find_sites(unet)
    tokens = torch.randn(len(sites), 4, DIM, generator=torch.Generator().manual_seed(3))
    activation = Activation(ReferenceContext(tokens=tokens, arch="sd1", site_names=[s.name for s in sites]), 1.3, mode)
    session = PatchSession(unet, [activation], ChunkRows(), sites=sites)
    session.install()
    patcher = session.attach(_Patcher())
    keep, add = patcher.patches["attn2_patch"][0], patcher.patches["attn2_output_patch"][0]
    with torch.no_grad():
        for site in sites:
            x = torch.randn(4, 16, site.module.to_q.in_features)
            text = torch.randn(4, 7, DIM)
            plain = site.module(x, context=text)
            block, number, index = patch_key(site.name)
            extra = {"block": (block, number), "block_index": index, "cond_or_uncond": [1, 0]}
            keep(x, text, text, extra)
            patched = add(plain.clone(), extra)
            with InjectionSession(unet, [activation], _FixedRows(), sites=sites):
                hooked = site.module(x, context=text)
            assert torch.equal(patched, hooked), site.name
            other = slice(2, 4) if mode == "negative" else slice(0, 2)  # the rows of the other kind
            assert torch.equal(patched[other], plain[other]) and not torch.equal(patched, plain)
    assert activation.reached
    session.remove()
    assert add(plain.clone(), extra).equal(plain), "a removed session's patches do nothing"


class _FixedRows:
    """Rows 0-1 unconditional, 2-3 conditional (the chunk layout [1, 0] above), for the hook session."""

    progress = 0.0
    unknown_calls = 0

    def __init__(self) -> None:
        self.tracker = ChunkRows()

    def take(self, batch, device, context=None) -> None:
        pass

    def rows(self, context, batch, device):
        return self.tracker.rows([1, 0], batch, device)


# ---- what Forge removed ---------------------------------------------------------------------------------------


SCHEDULES = ["5e-3", "0.005:100, 1e-3:1000, 1e-5", "0.02:2, 0.01", "1:0, 2:5", "1:-1, 2", " 0.1 : 3 ,, 0.2:7",
             "0.1:50", "0.1:2:3, 0.2", "abc:0, 0.3", "0.01:abc", "", "x", "1:-2", "0.1:20, 0.2:30, 0.3:40"]


def _host_schedule():
    path = os.path.join(unets.webui_sources(), "stable-diffusion-webui", "modules", "textual_inversion",
                        "learn_schedule.py")
    if not os.path.isfile(path):
        pytest.skip(unets.MISSING_HOST.format(sources=unets.webui_sources()))
    spec = importlib.util.spec_from_file_location("host_learn_schedule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LearnScheduleIterator


@pytest.mark.parametrize("text", SCHEDULES)
@pytest.mark.parametrize("steps", [10, 1000])
def test_schedule_reads_as_the_hosts_parser(text, steps):
    host = _host_schedule()
    try:
        expected = list(host(text, steps))
    except Exception:  # noqa: BLE001 - the host raises a bare Exception
        with pytest.raises(ArgumentError, match="Invalid learning rate schedule"):
            schedule_pairs(text, steps)
        return
    assert schedule_pairs(text, steps) == expected


def test_dataset_captions_pixels_weights_and_templates(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGBA", (40, 30), (200, 30, 30, 128)).save(root / "01-a red square.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(root / "b.png")
    (root / "b.txt").write_text("a blue tile, glossy", encoding="utf8")
    (root / "notes.md").write_text("not an image")
    assert dataset.caption_for(str(root / "01-a red square.png")) == "a red square"
    assert dataset.caption_for(str(root / "01-a red square.png"), r"\w+", "_") == "a_red_square"
    found = dataset.read_images(str(root), 16, use_alpha=True)
    assert [os.path.basename(f.path) for f in found] == [n for n in os.listdir(root) if n.endswith(".png")]
    by_name = {os.path.basename(f.path): f for f in found}
    assert by_name["b.png"].caption == "a blue tile, glossy" and by_name["b.png"].alpha is None
    assert by_name["01-a red square.png"].alpha.size == (40, 30) and by_name["b.png"].image.size == (16, 16)
    px = dataset.pixels(by_name["b.png"].image)
    assert px.shape == (3, 16, 16) and px.dtype == torch.float32
    assert torch.equal(px[:, 0, 0], torch.tensor((np.array([30, 30, 200]) / 127.5 - 1.0).astype(np.float32)))
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1)), "L")
    weight = dataset.alpha_weight(gradient, (4, 2, 2))
    assert weight.shape == (4, 2, 2) and float(weight.min()) == 0.0 and abs(float(weight.mean()) - 1.0) < 1e-6
    assert torch.equal(dataset.alpha_weight(None, (4, 2, 2)), torch.ones(4, 2, 2))
    template = tmp_path / "t.txt"
    template.write_text("a photo of [name], [filewords]\nart of [filewords] by [name]\n")
    texts = dataset.Templates(str(template), "sks")
    random.seed(1)
    first = [texts.create_text("a red square") for _ in range(6)]
    random.seed(1)
    assert first == [texts.create_text("a red square") for _ in range(6)]  # random.choice, as the host draws
    assert set(first) <= {"a photo of sks, a red square", "art of a red square by sks"}


def test_own_templates_cover_the_default():
    folder = os.path.join(os.path.dirname(__file__), "..", "..", "textual_inversion_templates")
    names = set(os.listdir(folder))
    assert {"subject_filewords.txt", "style_filewords.txt", "subject.txt", "style.txt", "none.txt"} <= names
    for name in names:
        lines = dataset.Templates(os.path.join(folder, name), "x").lines
        assert lines and all(lines), name
