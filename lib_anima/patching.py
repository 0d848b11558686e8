"""Contexts through a ComfyUI-style UNet patch API (Forge, reForge) instead of torch hooks.

Those hosts run the CFG step's rows as one UNet call of ``len(cond_or_uncond)`` chunks and, once any ``attn2``
replace patch exists (Forge's IP-Adapter installs one on every cross-attention), never call the ``attn2`` modules
themselves, so forward hooks see nothing. Their patcher instead offers two per-block patch points that every
transformer block calls, whatever replaces its attention:

* ``attn2_patch(n, context, value, extra_options)``: before the cross-attention; ``n`` is its query input.
* ``attn2_output_patch(out, extra_options)``: after it (``to_out`` applied); what it returns is added to the block.

``extra_options`` carries ``block`` (``("input", 4)``), ``block_index`` (the transformer block within it) and
``cond_or_uncond``. A :class:`PatchSession` keeps the input in the first patch and adds, in the second, exactly the
term the hooks add on A1111 (:func:`lib_anima.inject.add_site_terms`: the same folded arithmetic, the same rows
left untouched). It patches a *clone* of the host's UNet patcher (:meth:`PatchSession.attach`, once per sampling
pass), so the host's own patcher never changes and the fork's other patches (ControlNet, IP-Adapter, ...) stack
with it in whatever order the fork's scripts clone it. Weights are read through the host's accessor when one is
given (fp8 scaling, online LoRA, offloaded weights) and folded once per sampling pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lib_anima.inject import (
    Activation,
    ChunkRows,
    FoldedSite,
    WeightReader,
    _SiteEntry,
    add_site_terms,
    fold_site,
    site_entries,
)
from lib_anima.layout import Site, find_sites, patch_key

ReaderFactory = Callable[[torch.device, torch.dtype], WeightReader]
PatchKey = tuple[str, int, int]


class PatchSession:
    """`activations` on `unet` (the patcher's ``model.diffusion_model``) while live (:meth:`install` to
    :meth:`remove`); :meth:`attach` gives the patcher clone to sample with."""

    def __init__(
        self, unet: torch.nn.Module, activations: list[Activation], tracker: ChunkRows,
        reader: ReaderFactory | None = None, sites: list[Site] | None = None,
    ) -> None:
        self.unet = unet
        self.activations = activations
        self.sites = sites if sites is not None else find_sites(unet)
        self.tracker = tracker
        self.reader = reader
        self._entries = site_entries(self.sites, activations)
        self._by_key: dict[PatchKey, Site] = {}
        self.unreachable: list[str] = []  # sites with a term but no place in the fork's block layout
        for site in self.sites:
            key = patch_key(site.name)
            if not self._entries[site.index]:
                continue
            if key is None:
                self.unreachable.append(site.name)
            else:
                self._by_key[key] = site
        self.live = False
        self.attached = 0  # patcher clones made by this session
        self._inputs: dict[PatchKey, torch.Tensor] = {}
        self._folded: dict[tuple, FoldedSite] = {}

    @property
    def installed(self) -> bool:
        return self.live and self.attached > 0

    def install(self) -> None:
        self.live = bool(self._by_key)  # nothing would change: no patch at all

    def remove(self) -> None:
        """From now on the patches do nothing (a clone may outlive the sampling it was made for)."""
        self.live = False
        self._inputs.clear()
        self._folded.clear()

    def attach(self, patcher):
        """A clone of the host's UNet patcher with this session's two patches (the patcher itself is unchanged)."""
        if not self.live:
            return patcher
        clone = patcher.clone()
        clone.set_model_attn2_patch(self._keep_input)
        clone.set_model_attn2_output_patch(self._add_terms)
        self._folded.clear()  # fold once per sampling pass: the weights may have changed in between (LoRA)
        self.attached += 1
        return clone

    def _keep_input(self, n: torch.Tensor, context, value, extra_options: dict):
        key = _key(extra_options)
        if self.live and key in self._by_key:
            self._inputs[key] = n
        return n, context, value

    def _add_terms(self, out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        key = _key(extra_options)
        x = self._inputs.pop(key, None) if key is not None else None
        if not self.live or x is None:
            return out
        site = self._by_key[key]
        rows = self.tracker.rows(extra_options.get("cond_or_uncond"), int(out.shape[0]), out.device)
        if rows is None:
            return out
        return add_site_terms(x, out, self._entries[site.index], rows, self.tracker.progress,
                              lambda entry: self._fold(site, entry, x))

    def _fold(self, site: Site, entry: _SiteEntry, x: torch.Tensor) -> FoldedSite:
        tokens = entry.activation.context.tokens[entry.index]
        read = self.reader(x.device, x.dtype) if self.reader is not None else None
        if tokens.requires_grad:
            return fold_site(site.module, tokens, entry.strength, read=read)
        key = (id(entry), x.device, x.dtype)
        if key not in self._folded:
            with torch.no_grad():
                self._folded[key] = fold_site(site.module, tokens, entry.strength, read=read)
        return self._folded[key]


def _key(extra_options: dict) -> PatchKey | None:
    block = extra_options.get("block")
    if not isinstance(block, (tuple, list)) or len(block) < 2:
        return None
    return str(block[0]), int(block[1]), int(extra_options.get("block_index", 0))
