"""New (untrained) contexts: tokens from an init text's embedding or small random values."""

from __future__ import annotations

import datetime

import torch

from lib_anima.context import ReferenceContext
from lib_anima.errors import ArgumentError

MAX_TOKENS = 75


def initial_tokens(
    n_sites: int, n_tokens: int, context_dim: int, *, text_embedding: torch.Tensor | None = None,
    seed: int = 0, std: float = 0.02,
) -> torch.Tensor:
    """``[n_sites, n_tokens, context_dim]``: the init text's token vectors repeated at every site, else N(0, std)."""
    if not 1 <= int(n_tokens) <= MAX_TOKENS:
        raise ArgumentError(f"tokens per site must be from 1 to {MAX_TOKENS}, got {n_tokens!r}")
    if text_embedding is not None:
        if text_embedding.dim() != 2 or text_embedding.shape[1] != context_dim:
            raise ArgumentError(f"init embedding must be [tokens, {context_dim}], got {list(text_embedding.shape)}")
        rows = text_embedding[torch.arange(n_tokens) % text_embedding.shape[0]].float()
        return rows.unsqueeze(0).repeat(n_sites, 1, 1).contiguous()
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(n_sites, n_tokens, context_dim, generator=generator) * float(std)


def new_context(
    site_names: list[str], context_dim: int, arch: str, n_tokens: int, *,
    text_embedding: torch.Tensor | None = None, seed: int = 0, std: float = 0.02, record: dict | None = None,
) -> ReferenceContext:
    tokens = initial_tokens(len(site_names), n_tokens, context_dim, text_embedding=text_embedding, seed=seed, std=std)
    training = {"steps": 0, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    training.update(record or {})
    return ReferenceContext(tokens=tokens, arch=arch, site_names=list(site_names), training=training)
