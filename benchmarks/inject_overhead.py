"""The injection's cost inside one process: UNet calls with no context, 1 and 4 contexts, no WebUI.

    python -m benchmarks.inject_overhead                      # 64 and 256 px, the host's tiny SD1 UNet shape
    python -m benchmarks.inject_overhead --resolutions 64 --blocks 40

The UNet is the host's ldm ``UNetModel`` with the dimensions of ../shared/host's ``tiny.yaml`` (random weights:
the cost does not depend on them), attention through ``scaled_dot_product_attention`` as the WebUI's SDP
optimisation does, one CFG call (batch 2: one conditional row, one unconditional) per call, positive mode, rows
known to the tracker as during sampling. Conditions alternate in blocks of `--calls` calls; a block's time is its
fastest call (the least disturbed by other work), and ratios are taken per block against the "none" block next to
it, so drift cancels. Medians and quartiles over `--blocks` blocks.

It also times the softmax of the folded attention in the two layouts of its logits, head-major (the softmax over
a last dimension of n tokens) and token-major (over a middle dimension, heads innermost, what the extension uses).
No timed test depends on this; it explains the WebUI figure of ``gen_overhead``, which has more noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import common

# ../shared/host's tiny.yaml (SD1 layout, 16 attn2 sites); the numbers of that file, not of any real model
TINY_SD1 = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": False,
            "legacy": False}
CONDITIONS = {"none": 0, "one": 1, "four": 4}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolutions", default="64,256", help="pixel sizes (latent = size / 8), comma-separated")
    ap.add_argument("--blocks", type=int, default=30, help="blocks per condition and resolution")
    ap.add_argument("--calls", type=int, default=10, help="UNet calls per block (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    return ap.parse_args()


def _sdp_forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask=None, **_: object) -> torch.Tensor:
    """ldm CrossAttention through torch's SDP kernel, as the WebUI's SDP optimisation computes it."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, inner = q.shape
    h = self.heads
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, inner)
    return self.to_out(out)


def tiny_unet() -> torch.nn.Module:
    from tests import unets

    unets.import_host_modules()  # exits with a clear message when the host source is missing
    from ldm.modules import attention
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    attention.CrossAttention.forward = _sdp_forward  # this process only: a benchmark, not the extension
    torch.manual_seed(0)
    return unets.randomize(UNetModel(**TINY_SD1)).eval()


def contexts(unet: torch.nn.Module, count: int) -> list:
    from lib_anima.context import ReferenceContext
    from lib_anima.inject import Activation
    from lib_anima.layout import find_sites

    sites = find_sites(unet)
    names, dim = [s.name for s in sites], sites[0].context_dim
    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randn(len(sites), 4, dim, generator=g) * 0.1
        out.append(Activation(ReferenceContext(tokens, "sd1", names), scale=1.0, mode="positive"))
    return out


def block_time(unet: torch.nn.Module, sites: list, activations: list, inputs: tuple, calls: int) -> float:
    from lib_anima.inject import InjectionSession, RowTracker

    tracker = RowTracker()
    times = []
    with InjectionSession(unet, activations, tracker, sites=sites):
        for i in range(calls + 1):  # the first call of a block is not timed (fold, caches)
            tracker.begin_step(1, 2, i, calls + 1)
            start = time.perf_counter()
            unet(inputs[0], inputs[1], context=inputs[2])
            if i:
                times.append(time.perf_counter() - start)
    return min(times)


def measure(unet: torch.nn.Module, resolution: int, blocks: int, calls: int) -> dict:
    from lib_anima.layout import find_sites

    sites = find_sites(unet)
    latent = resolution // 8
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, latent, latent, generator=g), torch.tensor([500, 500]),
              torch.randn(2, 77, sites[0].context_dim, generator=g))
    acts = {c: contexts(unet, n) for c, n in CONDITIONS.items()}
    times: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    with torch.inference_mode():
        for b in range(blocks):
            order = list(CONDITIONS)[b % 3:] + list(CONDITIONS)[:b % 3]
            for c in order:
                times[c].append(block_time(unet, sites, acts[c], inputs, calls))
    out: dict = {"ms_per_call": {c: 1000 * statistics.median(v) for c, v in times.items()}, "block_s": times}
    for c in ("one", "four"):
        ratios = [a / b for a, b in zip(times[c], times["none"], strict=True)]
        out[c] = {"ratio_median": statistics.median(ratios), "ratio_quartiles": common.quartiles(ratios)}
    return out


def softmax_layouts(rows: tuple[int, ...] = (64, 1024, 4096), heads: int = 8, n: int = 4) -> list[dict]:
    out = []
    with torch.inference_mode():
        for r in rows:
            logits = torch.randn(r, heads * n)
            by_head, by_token = logits.view(r, heads, n), logits.view(r, n, heads)
            head_major = _best_us(lambda x=by_head: x.softmax(dim=-1))
            token_major = _best_us(lambda x=by_token: x.softmax(dim=1))
            out.append({"rows": r, "head_major_us": round(head_major, 1), "token_major_us": round(token_major, 1),
                        "ratio": round(head_major / token_major, 2)})
    return out


def _best_us(fn: Callable[[], object], number: int = 200, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


def plot(results: dict[str, dict]):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    data, labels = [], []
    for res, r in results.items():
        for c in ("one", "four"):
            data.append([a / b for a, b in zip(r["block_s"][c], r["block_s"]["none"], strict=True)])
            labels.append(f"{res} px, {c}")
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=15)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.03, color="C3", lw=0.8, ls="--", label="+3 %")
    ax.set_title("UNet call with contexts / without (blocks, same process)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = common.begin()
    unet = tiny_unet()
    results = {}
    for res in (int(x) for x in args.resolutions.split(",") if x.strip()):
        r = results[res] = measure(unet, res, args.blocks, args.calls)
        print(f"[bench] {res} px: none {r['ms_per_call']['none']:.2f} ms per CFG call; "
              + "; ".join(f"{c} {r[c]['ratio_median']:.3f} ({r[c]['ratio_quartiles'][0]:.3f}-"
                          f"{r[c]['ratio_quartiles'][1]:.3f})" for c in ("one", "four")), flush=True)
    layouts = softmax_layouts()
    for row in layouts:
        print(f"[bench] softmax of {row['rows']} rows × 8 heads × 4 tokens: head-major {row['head_major_us']} us, "
              f"token-major {row['token_major_us']} us ({row['ratio']}×)")
    record = {"settings": vars(args) | {"unet": TINY_SD1, "attention": "scaled_dot_product_attention"},
              "results": {str(k): v for k, v in results.items()}, "softmax_layouts": layouts}
    json_path, png_path = common.write_record("inject_overhead", record, started, plot(results))
    print(f"[bench] wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
