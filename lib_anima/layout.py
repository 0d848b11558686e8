"""Cross-attention sites of a UNet: which `attn2` modules there are, in which order, at which resolution.

A *site* is one text cross-attention module (``attn2``) of the UNet. Sites are ordered by module path as
``named_modules()`` yields them (input blocks, middle block, output blocks), e.g. for SD1.x
``input_blocks.1.1.transformer_blocks.0.attn2`` first and ``output_blocks.11.1.transformer_blocks.0.attn2`` last.
SD1.x and SD2.x have 16 sites, SDXL 70. diffusers-style UNets (``down_blocks`` / ``mid_block`` / ``up_blocks``)
are read the same way.

A site's name ignores wrapper modules that other extensions put around a block while they sample (Kohya's
Deep Shrink replaces ``input_blocks.2`` by a ``Scaler`` whose ``.block`` is the original; ``torch.compile`` adds
``_orig_mod``), so a context fits the UNet whether or not such a wrapper is in place.

Per-site weight presets (by the spatial resolution a site works at):

* ``all``    every site 1.
* ``coarse`` the sites at the lowest resolution, middle block included: composition, pose, overall shape.
* ``fine``   the sites at the highest resolution: texture, colour, small detail.
* ``middle`` the sites at the resolutions in between; on a UNet with only two attention resolutions
  (SDXL) there are none, and ``middle`` is the middle block alone.
* ``in`` / ``mid`` / ``out``  the sites of the input blocks, middle block, output blocks.

A custom list gives one weight per site, comma separated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from lib_anima.errors import ArgumentError

PRESETS = ("all", "coarse", "middle", "fine", "in", "mid", "out")
_BLOCK = re.compile(r"(?:^|\.)(input_blocks|middle_block|output_blocks|down_blocks|mid_block|up_blocks)(?:\.(\d+))?")
_SECTION = {"input_blocks": "in", "down_blocks": "in", "middle_block": "mid", "mid_block": "mid",
            "output_blocks": "out", "up_blocks": "out"}
# Path segments of wrappers around a block: Deep Shrink's Scaler (`.block`), torch.compile (`_orig_mod`).
_WRAPPER_SEGMENT = re.compile(r"(?:^|(?<=\.))(?:block|_orig_mod)\.")


def canonical_name(path: str) -> str:
    """`path` without wrapper segments: the name a site has when no other extension wraps its block."""
    return _WRAPPER_SEGMENT.sub("", path)


@dataclass(frozen=True)
class Site:
    index: int
    name: str
    module: torch.nn.Module
    section: str  # "in", "mid", "out" or "" when the UNet is not ldm/sgm shaped
    downsample: int  # spatial downsampling factor the site works at (1 = full latent resolution)

    @property
    def context_dim(self) -> int:
        return int(self.module.to_k.in_features)


def _contains(module: torch.nn.Module, *class_names: str) -> bool:
    return any(type(m).__name__ in class_names for m in module.modules())


def _block_downsampling(unet: torch.nn.Module) -> dict[tuple[str, int], int]:
    """Downsampling factor of each input/output block of an ldm/sgm or a diffusers UNet."""
    factors: dict[tuple[str, int], int] = {}
    ds = 1
    for i, block in enumerate(getattr(unet, "input_blocks", [])):  # ldm: the downsampler is a block of its own
        if _contains(block, "Downsample"):
            ds *= 2
        factors[("in", i)] = ds
    for i, block in enumerate(getattr(unet, "down_blocks", [])):  # diffusers: it ends the block
        factors[("in", i)] = ds
        if _contains(block, "Downsample2D"):
            ds *= 2
    factors[("mid", 0)] = ds
    for i, block in enumerate([*getattr(unet, "output_blocks", []), *getattr(unet, "up_blocks", [])]):
        factors[("out", i)] = ds
        if _contains(block, "Upsample", "Upsample2D"):
            ds //= 2
    return factors


def _unet_body(unet: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the blocks (a wrapper's only child when `unet` itself has none)."""
    for module in unet.modules():
        if any(hasattr(module, a) for a in ("input_blocks", "down_blocks")):
            return module
    return unet


def find_sites(unet: torch.nn.Module) -> list[Site]:
    """Every cross-attention module of `unet`, in module path order."""
    factors = _block_downsampling(_unet_body(unet))
    sites = []
    for path, module in unet.named_modules():
        if not path.endswith("attn2") or not hasattr(module, "to_k"):
            continue
        name = canonical_name(path)
        match = _BLOCK.search(name)
        section, block = "", 0
        if match:
            section = _SECTION[match.group(1)]
            block = int(match.group(2) or 0) if section != "mid" else 0
        sites.append(Site(len(sites), name, module, section, factors.get((section, block), 1)))
    if not sites:
        raise ArgumentError("the model has no cross-attention (attn2) modules")
    # input, middle, output: diffusers registers its middle block after the up blocks
    order = {"in": 0, "": 0, "mid": 1, "out": 2}
    sites = [replace(s, index=i) for i, s in enumerate(sorted(sites, key=lambda s: order[s.section]))]
    # The middle block works at the deepest resolution; count it with the deepest attention level of the
    # input/output blocks (SD1 has no attention at the middle block's own factor otherwise).
    outer = [s.downsample for s in sites if s.section != "mid"]
    if outer:
        sites = [replace(s, downsample=max(outer)) if s.section == "mid" else s for s in sites]
    return sites


_PATCH_SITE = re.compile(
    r"^(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.\d+\.transformer_blocks\.(\d+)\.attn2$")


def patch_key(name: str) -> tuple[str, int, int] | None:
    """The key a ComfyUI-style UNet (Forge, reForge) gives site `name` in its patches' ``extra_options``:
    ``(block[0], block[1], block_index)``, e.g. ``input_blocks.4.1.transformer_blocks.1.attn2`` → ``("input", 4, 1)``
    (the middle block is ``("middle", 0, i)``); None for a name outside that layout."""
    match = _PATCH_SITE.match(name)
    if match is None:
        return None
    section, block, middle, index = match.groups()
    if middle:
        return "middle", 0, int(index)
    return ("input" if section == "input_blocks" else "output"), int(block), int(index)


def preset_weights(sites: list[Site], preset: str) -> list[float]:
    """Per-site weights (1 or 0) of a named preset."""
    if preset not in PRESETS:
        raise ArgumentError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)} or a list of {len(sites)} weights")
    if preset == "all":
        return [1.0] * len(sites)
    if preset in ("in", "mid", "out"):
        return [float(s.section == preset) for s in sites]
    levels = sorted({s.downsample for s in sites})
    if preset == "coarse":
        chosen = {levels[-1]}
    elif preset == "fine":
        chosen = {levels[0]}
    else:
        chosen = set(levels[1:-1])
        if not chosen:
            return [float(s.section == "mid") for s in sites]
    return [float(s.downsample in chosen) for s in sites]


def parse_weights(spec: str | list[float] | None, sites: list[Site]) -> list[float]:
    """Weights from a preset name, a comma-separated list (one per site) or a list of numbers."""
    if spec is None or spec == "":
        return [1.0] * len(sites)
    if isinstance(spec, str) and spec.strip().lower() in PRESETS:
        return preset_weights(sites, spec.strip().lower())
    values = spec.replace(";", ",").split(",") if isinstance(spec, str) else list(spec)
    try:
        weights = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ArgumentError(
            f"site weights {spec!r}: not a preset ({', '.join(PRESETS)}) nor a list of numbers"
        ) from None
    if len(weights) != len(sites):
        raise ArgumentError(f"site weights: got {len(weights)} values, the model has {len(sites)} sites")
    if not all(-4.0 <= w <= 4.0 for w in weights):  # also rejects NaN
        raise ArgumentError("site weights must each be from -4 to 4")
    return weights
