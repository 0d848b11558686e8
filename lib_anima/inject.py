"""The injection: each active context adds a decoupled attention to every cross-attention site.

For a site with query input ``x`` and tokens ``T`` (``[n_tokens, context_dim]``), the hook adds to the output

    scale · w_site · W_out · Attn(to_q(x), to_k(T), to_v(T))

where ``W_out`` is the weight of the site's ``to_out`` linear (without its bias), i.e. the site's output
becomes ``to_out(Attn_text + scale · w_site · Attn_ctx)``: the context is attended beside the text, not mixed
into its softmax. Several contexts add up. Mode ``positive`` adds only to the conditional rows of a batch,
``negative`` only to the unconditional rows.

Hooks are torch forward hooks on the ``attn2`` *instances* (the host replaces the class's forward), plus a
pre-hook on the UNet that tells them which rows of each call are conditional. ``InjectionSession`` installs
them in ``__enter__`` and always removes them in ``__exit__``.

With only a few tokens the term is computed folded (:func:`fold_site`): per head ``h`` the attention logits are
``x · (W_q,hᵀ k_hᵀ) · s`` and the output ``Σ_h A_h · (v_h W_out,hᵀ)``, so a site costs two thin products with
``heads · n_tokens`` columns instead of ``to_q`` and ``W_out`` at full width (the same numbers up to rounding;
:func:`decoupled_attention` is the direct form).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lib_anima.context import ReferenceContext, check_mode, check_scale
from lib_anima.errors import ArgumentError
from lib_anima.layout import Site, find_sites, parse_weights

log = logging.getLogger("anima")


@dataclass
class Activation:
    """One context applied to one generation."""

    context: ReferenceContext
    scale: float
    mode: str = "positive"
    start: float = 0.0
    end: float = 1.0
    weights: str | list[float] | None = None  # preset name, custom list; None: the file's own or all 1
    reached: bool = field(default=False, compare=False)  # set once the term was added to some UNet call

    def __post_init__(self) -> None:
        self.scale = check_scale(self.scale)
        self.mode = check_mode(self.mode)
        self.start, self.end = check_window(self.start, self.end)

    def active_at(self, progress: float) -> bool:
        return self.start <= progress and (progress < self.end or self.end >= 1.0)

    def site_weights(self, sites: list[Site]) -> list[float]:
        if self.weights is None and self.context.site_weights is not None:
            return [float(w) for w in self.context.site_weights]
        return parse_weights(self.weights, sites)


def check_window(start: object, end: object) -> tuple[float, float]:
    """Start and end as fractions of the sampling steps, each in [0, 1], start before end."""
    first, last = _check_fraction(start, "start"), _check_fraction(end, "end")
    if first >= last:
        raise ArgumentError(f"start ({first:g}) must be before end ({last:g})")
    return first, last


def _check_fraction(value: object, what: str) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ArgumentError(f"{what} must be a number from 0 to 1, got {value!r}") from None
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise ArgumentError(f"{what} must be from 0 to 1, got {value!r}")
    return f


def decoupled_attention(attn: torch.nn.Module, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W_out · Attn(to_q(x), k, v)`` for one site; `k`, `v` are ``[n_tokens, inner_dim]``."""
    q = attn.to_q(x)
    b, n, inner = q.shape
    heads = int(attn.heads)
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.to(q.dtype).view(1, -1, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    v = v.to(q.dtype).view(1, -1, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    scale = float(getattr(attn, "scale", d**-0.5))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = out.transpose(1, 2).reshape(b, n, inner)
    weight = attn.to_out[0].weight
    return F.linear(out, weight.to(out.dtype))


@dataclass
class FoldedSite:
    """One context's keys and values at one site, folded into the site's ``to_q`` and ``to_out`` weights.

    Columns (and `vo`'s rows) are token-major, head-minor (``n · heads``): the softmax then runs over a middle
    dimension with the heads innermost, which CPU kernels do about ten times faster than over a last
    dimension of a few tokens.
    """

    qk: torch.Tensor  # [C_in, n · heads]: W_q,hᵀ k_hᵀ per token and head, times the attention scale
    qk_bias: torch.Tensor | None  # [n · heads]: to_q's bias against the keys (None: to_q has no bias)
    vo: torch.Tensor  # [n · heads, C_out]: v_h W_out,hᵀ per token and head, times the strength (no to_out bias)
    heads: int


WeightReader = Callable[[torch.nn.Module], tuple[torch.Tensor, "torch.Tensor | None"]]
"""A host's accessor for a linear layer's effective weight and bias (fp8 scaling, online LoRA, offloading)."""


def fold_site(
    attn: torch.nn.Module, tokens: torch.Tensor, strength: float = 1.0, read: WeightReader | None = None,
    dtype: torch.dtype | None = None,
) -> FoldedSite:
    """Fold `tokens` (``[n, context_dim]``) and `strength` into the projections of site `attn`; autograd reaches
    the tokens.

    Without `read` the projections are the modules' own weights and ``to_k``/``to_v`` are called as modules (what
    the host's Lora patches); with it every weight comes from the host's accessor (cast to where and how the host
    computes). `dtype` (default: the weights') is what the folding computes in (float32 to upcast a half model)."""
    if read is None:
        w_q, b_q = attn.to_q.weight, attn.to_q.bias
        dtype = dtype or w_q.dtype
        t = tokens.to(w_q.device, dtype)
        k, v = _project(attn.to_k, t), _project(attn.to_v, t)
        w_out = attn.to_out[0].weight
    else:
        (w_q, b_q), (w_k, b_k), (w_v, b_v) = read(attn.to_q), read(attn.to_k), read(attn.to_v)
        w_out = read(attn.to_out[0])[0]
        dtype = dtype or w_q.dtype
        t = tokens.to(w_q.device, dtype)
        k, v = _linear(t, w_k, b_k), _linear(t, w_v, b_v)
    b_q = None if b_q is None else b_q.to(dtype)
    return fold_projections(w_q.to(dtype), b_q, k, v, w_out.to(dtype), int(attn.heads), getattr(attn, "scale", None),
                            strength)


def _linear(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(t, weight.to(t.dtype), None if bias is None else bias.to(t.dtype))


def fold_projections(
    w_q: torch.Tensor, b_q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, w_out: torch.Tensor,
    heads: int, scale: float | None = None, strength: float = 1.0,
) -> FoldedSite:
    """The folded form from ``to_q``'s weight/bias, the tokens' keys/values ``[n, inner]`` and ``to_out``'s weight."""
    inner, c_in = w_q.shape
    d = inner // heads
    k = k.view(-1, heads, d)  # [n, heads, d]
    v = v.view(-1, heads, d)
    scale = float(scale if scale is not None else d**-0.5)
    qk = torch.einsum("hdc,nhd->cnh", w_q.view(heads, d, c_in), k).reshape(c_in, -1) * scale
    qk_bias = None if b_q is None else torch.einsum("hd,nhd->nh", b_q.view(heads, d), k).reshape(-1) * scale
    vo = torch.einsum("nhd,ohd->nho", v, w_out.view(-1, heads, d)).reshape(-1, w_out.shape[0])
    if strength != 1.0:
        vo = vo * strength
    return FoldedSite(qk, qk_bias, vo, heads)


HALF = (torch.float16, torch.bfloat16)


def _project(linear: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """`linear` applied to `t`: through the module (what the host's Lora patches) in its own dtype, else the same
    product in `t`'s dtype."""
    if linear.weight.dtype == t.dtype:
        return linear(t)
    return _linear(t, linear.weight, linear.bias)


def folded_attention(
    x: torch.Tensor, folded: FoldedSite, add_to: torch.Tensor | None = None, in_place: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """``strength · W_out · Attn(to_q(x), k, v)`` from the folded form (softmax over each head's tokens, then one
    product), added to `add_to` (same shape as the result) in the same product when given.

    `in_place` adds into `add_to` itself (no copy of the site's output; only without autograd, where nothing
    else holds it yet) when its dtype and layout allow, and returns it. `upcast` (the host's "upcast cross
    attention layer to float32") computes a half-precision term in float32 and rounds only the sum.
    """
    if upcast and x.dtype in HALF:
        term = folded_attention(x.float(), folded)
        if add_to is None:
            return term.to(x.dtype)
        if in_place:
            return add_to.add_(term.to(add_to.dtype))
        return add_to + term.to(add_to.dtype)
    qk = folded.qk.to(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    if folded.qk_bias is None:
        logits = torch.mm(rows, qk)  # [rows, n · heads]
    else:  # the bias in the same kernel
        logits = torch.addmm(folded.qk_bias.to(x.dtype), rows, qk)
    probs = logits.view(logits.shape[0], -1, folded.heads).softmax(dim=1).view(logits.shape)  # over each head's tokens
    vo = folded.vo.to(x.dtype)
    out_shape = (*x.shape[:-1], vo.shape[1])
    if add_to is None:
        return torch.mm(probs, vo).view(out_shape)
    if add_to.dtype != x.dtype:
        return add_to + torch.mm(probs, vo).view(out_shape).to(add_to.dtype)
    if in_place and add_to.is_contiguous():  # one kernel: product and sum into the output's own memory
        add_to.view(-1, vo.shape[1]).addmm_(probs, vo)
        return add_to
    return torch.addmm(add_to.reshape(-1, vo.shape[1]), probs, vo).view(add_to.shape)


# ---- which rows are conditional --------------------------------------------------------------------------------


@dataclass
class Rows:
    """Row indices of one UNet call, by kind, on the call's device (None: no row of that kind)."""

    cond: torch.Tensor | None
    uncond: torch.Tensor | None
    batch: int
    cond_span: slice | None = None  # the same rows as a slice when they are consecutive (the host's layout)
    uncond_span: slice | None = None

    def for_mode(self, mode: str) -> torch.Tensor | None:
        return self.cond if mode == "positive" else self.uncond

    def span_for_mode(self, mode: str) -> slice | None:
        return self.cond_span if mode == "positive" else self.uncond_span


CHUNK_TOKENS = 77  # one prompt chunk; the host pads a shorter conditioning with whole empty chunks
COND, UNCOND, BOTH, NEITHER = 1, 0, 2, -1  # what a row's text conditioning matches


@dataclass
class CallRecord:
    """Which rows of one UNet call (or one direct call of its blocks) were told apart how: for tests and status."""

    step: int
    batch: int
    cond: list[int]
    uncond: list[int]
    unplaced: list[int]


class RowTracker:
    """Knows which rows of each UNet call are conditional during sampling.

    Each step the host's CFG denoiser says (``on_cfg_denoiser``) what the conditional rows are conditioned on
    (``text_cond``) and what the unconditional ones are (``text_uncond``). A cross-attention call's own
    conditioning (its ``context`` argument) then tells, row by row, which kind each row is: a row is conditional when its text
    matches a row of ``text_cond``, unconditional when it matches one of ``text_uncond``. That holds for every
    call pattern: the host's (cond and uncond in one call or apart, chunks, AND, batch > 1, skipped uncond), and
    other extensions' (tiles, AnimateDiff windows, SAG's extra uncond pass, ControlNet's direct block calls). A
    row that matches neither (an extension built its own conditioning) is left alone and counted.

    "Matches" allows for what the host and ControlNet do to a conditioning on the way to the UNet: the host pads
    the shorter of cond/uncond with whole empty chunks (the row then starts with the reference), ControlNet
    prepends a marker token and strips it inside its UNet (the row is then the reference without its first token).

    A row whose text matches both (the prompt and the negative prompt are the same text) cannot be told apart by
    its text: it gets the kind the host's layout gives its position (all conditional rows first, then the
    unconditional ones, counted as the UNet calls arrive), and only when the cross-attention call belongs to the
    UNet call that was counted (same conditioning storage, same batch). Where the text is the same, the only
    difference between such a cond and uncond row is that position, so the layout is exactly what the host's CFG
    uses to combine them; a call the layout does not cover leaves such rows alone (counted).

    Without text (``begin_step`` given none: the core tests' plain layouts, benchmarks) every row is placed by
    the layout alone.
    """

    def __init__(self, record: bool = False) -> None:
        self.n_cond: int | None = None
        self.n_total = 0
        self.offset = 0
        self.step = 0
        self.progress = 0.0
        self.unknown_calls = 0  # calls (or direct block calls) with at least one row left alone
        self.unplaced_rows = 0
        self.record = record
        self.records: list[CallRecord] = []
        self._text_source: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None
        self._call_text: torch.Tensor | None = None
        self._call_layout: torch.Tensor | None = None  # the layout's kinds for the rows of the counted call
        self._seen: list[tuple[torch.Tensor, int, Rows]] = []  # conditionings classified since the last UNet call

    def begin_step(
        self, n_cond: int, n_total: int, step: int, total_steps: int,
        text: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """A new sampling step: `n_cond` of `n_total` rows conditional; `text` gives (text_cond, text_uncond) when
        called (read at the first cross-attention call, after every other extension's callback changed them)."""
        self.n_cond, self.n_total, self.offset = n_cond, n_total, 0
        self.step = step
        self.progress = step / total_steps if total_steps > 0 else 0.0
        self._text_source, self._text = text, None
        self._call_text, self._call_layout = None, None
        self._seen.clear()

    def take(self, batch: int, device: torch.device, text_rows: torch.Tensor | None = None) -> None:
        """A UNet call begins (its forward pre-hook): count its rows in the host's layout."""
        self._seen.clear()
        start = self.offset
        self._call_text = text_rows
        if self.n_cond is None or start + batch > self.n_total:
            self._call_layout = None
            return
        self.offset += batch
        self._call_layout = torch.arange(start, start + batch) < self.n_cond

    def rows(self, text_rows: torch.Tensor | None, batch: int, device: torch.device) -> Rows | None:
        """Rows of a cross-attention call with conditioning `text_rows` (``[batch, tokens, dim]``) by kind, or None
        when no row can be placed."""
        for seen, version, rows in self._seen:
            if seen is text_rows and version == _version(text_rows):
                return rows
        kinds = self._kinds(text_rows, batch)
        rows = _rows_of_kinds(kinds, device)
        if text_rows is not None:
            self._seen.append((text_rows, _version(text_rows), rows))  # held: its identity cannot be reused meanwhile
        unplaced = [i for i, k in enumerate(kinds) if k == NEITHER]
        if unplaced:
            self.unknown_calls += 1
            self.unplaced_rows += len(unplaced)
        if self.record:
            self.records.append(CallRecord(
                self.step, batch, [i for i, k in enumerate(kinds) if k == COND],
                [i for i, k in enumerate(kinds) if k == UNCOND], unplaced,
            ))
        return rows if rows.cond is not None or rows.uncond is not None else None

    def _kinds(self, text_rows: torch.Tensor | None, batch: int) -> list[int]:
        text = self._step_text()
        kinds = [BOTH] * batch if text is None or text_rows is None else _text_kinds(text_rows, *text)
        if BOTH in kinds:
            layout = self._layout_for(text_rows, batch)
            kinds = [(int(layout[i]) if layout is not None else NEITHER) if k == BOTH else k for i, k in enumerate(kinds)]
        return kinds

    def _layout_for(self, text_rows: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The layout's kinds, when this cross-attention call belongs to the UNet call that was counted."""
        layout, call = self._call_layout, self._call_text
        if layout is None or len(layout) != batch:
            return None
        if text_rows is not None and call is not None and not _same_storage(text_rows, call):
            return None  # a call of its own (another extension's), not the one the layout counted
        return layout

    def _step_text(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._text is None and self._text_source is not None:
            self._text = self._text_source()
        return self._text


def _version(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place)
        return 0


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _text_kinds(text_rows: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> list[int]:
    """For each row of `text_rows`, whether its text matches a row of `cond`, of `uncond`, both or neither."""
    is_cond = _matches(text_rows, cond).any(dim=1).tolist()
    is_uncond = _matches(text_rows, uncond).any(dim=1).tolist()
    return [BOTH if c and u else COND if c else UNCOND if u else NEITHER for c, u in zip(is_cond, is_uncond, strict=True)]


def _matches(rows: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """``[len(rows), len(refs)]``: row i's text is ref j's, allowing for the host's padding (whole empty chunks
    appended to the shorter) and a few marker tokens prepended to the longer (ControlNet's)."""
    refs = refs.to(rows.device, rows.dtype)
    length, ref_length = rows.shape[1], refs.shape[1]
    n = min(length, ref_length)
    found = _equal_pairs(rows[:, :n], refs[:, :n])
    if 0 < abs(length - ref_length) < CHUNK_TOKENS:
        found |= _equal_pairs(rows[:, length - n :], refs[:, ref_length - n :])
    return found


def _equal_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]``: which pairs of ``[tokens, dim]`` tensors are equal, exactly (a cheap exact test on a
    few channels first, then the whole tensors for the pairs that pass)."""
    probe = (a[:, None, :, :8] == b[None, :, :, :8]).flatten(2).all(dim=2)
    for i, j in probe.nonzero().tolist():
        probe[i, j] = torch.equal(a[i], b[j])
    return probe.cpu()


def _rows_of_kinds(kinds: list[int], device: torch.device) -> Rows:
    if all(k in (COND, UNCOND) for k in kinds):
        return _rows(torch.tensor([k == COND for k in kinds], dtype=torch.bool), device)
    cond = torch.tensor([i for i, k in enumerate(kinds) if k == COND], dtype=torch.long)
    uncond = torch.tensor([i for i, k in enumerate(kinds) if k == UNCOND], dtype=torch.long)
    return Rows(
        cond.to(device) if len(cond) else None, uncond.to(device) if len(uncond) else None, len(kinds),
        _span(cond), _span(uncond),
    )


class ChunkRows:
    """Rows of the UNet calls of a ComfyUI-style sampler (Forge, reForge): each call's batch is
    ``len(cond_or_uncond)`` equal chunks, chunk i conditional when ``cond_or_uncond[i] == 0`` and unconditional when
    it is 1 (the samplers' own ``transformer_options["cond_or_uncond"]``, which every cross-attention call of the
    UNet call sees). Sampling progress comes from the host's CFG denoiser callback (:meth:`begin_step`), as on
    A1111. A call without that list, or whose batch does not split into it, is left alone and counted.
    """

    def __init__(self, record: bool = False) -> None:
        self.step = 0
        self.progress = 0.0
        self.unknown_calls = 0
        self.unplaced_rows = 0
        self.record = record
        self.records: list[CallRecord] = []
        self._layouts: dict[tuple, Rows | None] = {}
        self._call: object = None  # the cond_or_uncond list of the UNet call seen last (one per UNet call)

    def begin_step(self, n_cond: int, n_total: int, step: int, total_steps: int, text: object = None) -> None:
        self.step = step
        self.progress = step / total_steps if total_steps > 0 else 0.0

    def rows(self, cond_or_uncond: list | None, batch: int, device: torch.device) -> Rows | None:
        """Rows of one cross-attention call of a UNet call whose chunks are `cond_or_uncond`."""
        new_call = cond_or_uncond is None or cond_or_uncond is not self._call
        self._call = cond_or_uncond
        kinds = chunk_kinds(cond_or_uncond, batch)
        if new_call:
            self._count(kinds, batch)
        if kinds is None:
            return None
        key = (tuple(kinds), str(device))
        if key not in self._layouts:
            rows = _rows_of_kinds(kinds, device)
            self._layouts[key] = rows if rows.cond is not None or rows.uncond is not None else None
        return self._layouts[key]

    def _count(self, kinds: list[int] | None, batch: int) -> None:
        """Once per UNet call: rows left alone, and the call's record (``--anima-debug-rows``)."""
        unplaced = list(range(batch)) if kinds is None else [i for i, k in enumerate(kinds) if k == NEITHER]
        if unplaced:
            self.unknown_calls += 1
            self.unplaced_rows += len(unplaced)
        if self.record:
            found = kinds or []
            self.records.append(CallRecord(
                self.step, batch, [i for i, k in enumerate(found) if k == COND],
                [i for i, k in enumerate(found) if k == UNCOND], unplaced,
            ))


def chunk_kinds(cond_or_uncond: list | None, batch: int) -> list[int] | None:
    """Each row's kind from the chunk list (0: conditional, 1: unconditional, other values: left alone), or None
    when there is no list or the batch does not split into equal chunks."""
    if not cond_or_uncond or batch % len(cond_or_uncond):
        return None
    size = batch // len(cond_or_uncond)
    kind = {0: COND, 1: UNCOND}
    return [kind.get(int(c), NEITHER) for c in cond_or_uncond for _ in range(size)]


class AllConditional:
    """Every row is conditional and sampling is at its start (training, or a plain UNet call)."""

    progress = 0.0
    unknown_calls = 0

    def take(self, batch: int, device: torch.device, text_rows: torch.Tensor | None = None) -> None:
        pass

    def rows(self, text_rows: torch.Tensor | None, batch: int, device: torch.device) -> Rows:
        if batch == 0:
            return Rows(None, None, 0)
        return Rows(_all(batch, device), None, batch, cond_span=slice(0, batch))


def _all(batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device)


def _rows(is_cond: torch.Tensor, device: torch.device) -> Rows:
    cond = is_cond.nonzero().squeeze(1)
    uncond = (~is_cond).nonzero().squeeze(1)
    return Rows(
        cond.to(device) if len(cond) else None,
        uncond.to(device) if len(uncond) else None,
        int(is_cond.shape[0]),
        _span(cond),
        _span(uncond),
    )


def _span(index: torch.Tensor) -> slice | None:
    """`index` (CPU, ascending) as a slice when its rows are consecutive."""
    if not len(index):
        return None
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == len(index) else None


# ---- the session -------------------------------------------------------------------------------------------


@dataclass
class _SiteEntry:
    activation: Activation
    strength: float  # scale · site weight
    index: int  # the site's row in the context's tokens
    folded: FoldedSite | None = None  # cached for tokens that do not train
    folded_for: tuple | None = None  # the projections' storage, dtype and versions it was folded with


@dataclass
class InjectionSession:
    """Hooks `activations` into `unet` for the duration of a ``with`` block; always unhooks.

    A session can be entered again after it exits (training enters it around every UNet call); pass `sites`
    (:func:`lib_anima.layout.find_sites` of `unet`) to skip looking them up again.
    """

    unet: torch.nn.Module
    activations: list[Activation]
    tracker: RowTracker | AllConditional = field(default_factory=AllConditional)
    sites: list[Site] | None = None
    upcast: bool = False  # the host's "upcast cross attention layer to float32"
    _entries: list[list[_SiteEntry]] = field(init=False)
    _handles: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.sites is None:
            self.sites = find_sites(self.unet)
        self._entries = site_entries(self.sites, self.activations)

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> InjectionSession:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        if self._handles:
            return
        if not any(self._entries):
            return  # nothing would change: leave the model untouched
        try:
            self._handles.append(self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
            for site in self.sites:
                if self._entries[site.index]:
                    self._handles.append(site.module.register_forward_hook(self._site_hook(site), with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _on_unet_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x", kwargs.get("sample"))
        text_rows = args[2] if len(args) > 2 else kwargs.get("context", kwargs.get("encoder_hidden_states"))
        self.tracker.take(int(x.shape[0]), x.device, text_rows if isinstance(text_rows, torch.Tensor) else None)

    def _site_hook(self, site: Site):
        entries = self._entries[site.index]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            rows = self.tracker.rows(_site_text(args, kwargs), int(x.shape[0]), x.device)
            if rows is None:
                return None
            return add_site_terms(x, output, entries, rows, self.tracker.progress, lambda e: self._folded(module, e),
                                  upcast=self.upcast)

        return hook

    def _folded(self, module: torch.nn.Module, entry: _SiteEntry) -> FoldedSite:
        tokens = entry.activation.context.tokens
        dtype = torch.float32 if self.upcast and module.to_q.weight.dtype in HALF else None
        if tokens.requires_grad:  # training: the tokens change every step
            return fold_site(module, tokens[entry.index], entry.strength, dtype=dtype)
        key = _weights_key(module)
        if entry.folded is None or entry.folded_for != key:
            with torch.no_grad():
                entry.folded = fold_site(module, tokens[entry.index], entry.strength, dtype=dtype)
            entry.folded_for = key
        return entry.folded


def site_entries(sites: list[Site], activations: list[Activation]) -> list[list[_SiteEntry]]:
    """Per site, the activations that add to it (strength = scale · site weight, never 0); checks each context
    fits the sites."""
    names = [s.name for s in sites]
    entries: list[list[_SiteEntry]] = [[] for _ in sites]
    for act in activations:
        act.context.check_fits(names, sites[0].context_dim)
        for site, weight in zip(sites, act.site_weights(sites), strict=False):
            strength = act.scale * weight
            if strength != 0.0:
                entries[site.index].append(_SiteEntry(act, strength, site.index))
    return entries


def check_fits(unet: torch.nn.Module, activation: Activation) -> None:
    """Refuse `activation` where it does not fit `unet` (site count, layout, context_dim, weights), with the
    error a session would raise when made; nothing is installed."""
    site_entries(find_sites(unet), [activation])


def add_site_terms(
    x: torch.Tensor, output: torch.Tensor, entries: list[_SiteEntry], rows: Rows, progress: float,
    folded: Callable[[_SiteEntry], FoldedSite], upcast: bool = False,
) -> torch.Tensor:
    """One site's output with every active entry's term added on its mode's rows (the other rows stay bit-exact).

    `x` is the site's query input, `output` its output (``to_out`` applied); every host adapter ends here.
    `upcast`: the host's "upcast cross attention layer to float32" (see :func:`folded_attention`).
    """
    in_place = not torch.is_grad_enabled()  # generation: the output is ours until returned
    for entry in entries:
        index = rows.for_mode(entry.activation.mode)
        if index is None or not entry.activation.active_at(progress):
            continue
        entry.activation.reached = True
        site = folded(entry)
        span = rows.span_for_mode(entry.activation.mode)
        if len(index) == rows.batch:
            output = folded_attention(x, site, add_to=output, in_place=in_place, upcast=upcast)
        elif span is not None:  # views and one product-and-sum: the other rows stay bit-exact
            target = output[span]
            part = folded_attention(x[span], site, add_to=target, in_place=in_place, upcast=upcast)
            if part is not target:  # not added in place
                output = torch.cat([output[: span.start], part, output[span.stop :]])
        else:  # the same arithmetic on gathered rows (the sum comes back in the output's dtype)
            part = folded_attention(x.index_select(0, index), site, add_to=output.index_select(0, index),
                                    upcast=upcast)
            output = output.index_copy_(0, index, part) if in_place else output.index_copy(0, index, part)
    return output


def _site_text(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The text conditioning a cross-attention call got (ldm names it `context`, diffusers `encoder_hidden_states`;
    "context" in this project means the reference tokens)."""
    text_rows = args[1] if len(args) > 1 else kwargs.get("context", kwargs.get("encoder_hidden_states"))
    return text_rows if isinstance(text_rows, torch.Tensor) else None


def _weights_key(module: torch.nn.Module) -> tuple:
    """What the folded keys/values depend on: the projections' storage, dtype and in-place edits (the host's Lora
    writes its weights into the same storage with ``copy_``, which bumps the version counter)."""
    tensors = [module.to_q.weight, module.to_q.bias, module.to_k.weight, module.to_v.weight, module.to_out[0].weight]
    return tuple((t.data_ptr(), t.dtype, _version(t)) for t in tensors if t is not None)
