"""Training and generation figures on random-weight UNets with the real SD1.5 and SDXL architectures.

    python -m benchmarks.gpu                     # CUDA if present, else the reduced CPU path
    python -m benchmarks.gpu --models sd15 --steps 300 --dtype bf16

The UNets are built by the host's own ldm / sgm code from the host's configs (``configs/v1-inference.yaml``,
``repositories/generative-models/configs/inference/sd_xl_base.yaml``) with random weights; attention runs through
``scaled_dot_product_attention`` as the WebUI's SDP optimisation does. Only the UNet is measured (the text encoder
and VAE run once per training, before the loop).

On CUDA (fp16 by default), per model: seconds for ``--steps`` (300) training steps of ``train_context`` at 512 px
(SD1.5) / 1024 px (SDXL) with one reference image and its flip, steps per second, peak GPU memory
(``torch.cuda.max_memory_allocated``, also above the weights), a textual-inversion-like reference step (gradient to
the text conditioning through the same UNet, weights frozen: a lower bound of what the host's TI does per step, which
also runs the text encoder), the same with the weights' gradients computed (A1111 leaves the UNet's weights
trainable, so its TI computes them; not on the CPU path for SDXL: RAM), and the per-step
generation overhead (a CFG batch of 2 through the UNet, no hooks / a session with no context / 1 / 4 contexts in
positive mode, interleaved, median ratios). Goals: a one-image context in <= 20 s on SD1.5 at 512 px and <= 60 s on
SDXL at 1024 px.

Without CUDA the same measurements run on the CPU with the same architectures at ``--cpu-resolution`` (64 px) and a
few steps, the 300-step time extrapolated, and the output says clearly that the GPU figures are missing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import common
from lib_anima.context import ReferenceContext
from lib_anima.inject import Activation, InjectionSession, RowTracker
from lib_anima.train import DiffusionSchedule, TrainConfig, TrainExample, train_context

LDM = "repositories/stable-diffusion-stability-ai"
SGM = "repositories/generative-models"
SD15_CONFIG = "configs/v1-inference.yaml"
SDXL_CONFIG = f"{SGM}/configs/inference/sd_xl_base.yaml"
GOALS_S = {"sd15": 20.0, "sdxl": 60.0}
NATIVE_PX = {"sd15": 512, "sdxl": 1024}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sd15,sdxl", help="comma separated: sd15, sdxl")
    ap.add_argument("--steps", type=int, default=300, help="training steps on CUDA")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="UNet weights on CUDA")
    ap.add_argument("--gen-repeats", type=int, default=20, help="repeats of each generation condition (CUDA)")
    ap.add_argument("--cpu-resolution", type=int, default=64)
    ap.add_argument("--cpu-steps", type=int, default=3, help="timed training steps on the CPU path")
    ap.add_argument("--cpu-gen-repeats", type=int, default=5)
    ap.add_argument("--host-dir", default=os.environ.get("WEBUI_HOST_DIR", ""),
                    help="an A1111 v1.10.1 folder with configs/ and repositories/ (default: $WEBUI_SOURCES/stable-diffusion-webui)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    return ap.parse_args()


# ---- the host's sources and configs ------------------------------------------------------------------------------


def host_sources(host_dir: str) -> str:
    """The A1111 folder holding the host's ldm/sgm packages and the two configs: `host_dir`, else the source
    folder the tests use ($WEBUI_SOURCES/stable-diffusion-webui); exits with a clear message when neither has them."""
    from tests import unets

    def complete(root: str) -> bool:
        return all(os.path.exists(os.path.join(root, p)) for p in (f"{LDM}/ldm", f"{SGM}/sgm", SD15_CONFIG, SDXL_CONFIG))

    for root in (host_dir, unets.host_root()):
        if root and complete(root):
            return root
    raise SystemExit(unets.MISSING_HOST.format(sources=unets.webui_sources()) + " (or pass --host-dir)")


def unet_params(root: str, model: str) -> dict[str, Any]:
    import yaml

    with open(os.path.join(root, SD15_CONFIG if model == "sd15" else SDXL_CONFIG)) as f:
        config = yaml.safe_load(f)["model"]["params"]
    params = dict((config["unet_config"] if model == "sd15" else config["network_config"])["params"])
    params["use_checkpoint"] = False
    if model == "sdxl":
        params["spatial_transformer_attn_type"] = "softmax"  # sgm's SDPA path (no xformers needed)
    return params


def build_unet(root: str, model: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    for sub in (LDM, SGM):
        path = os.path.join(root, sub)
        if path not in sys.path:
            sys.path.insert(0, path)
    if model == "sd15":
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    else:
        from sgm.modules.diffusionmodules.openaimodel import UNetModel
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in its dtype: SDXL in float32 would need ~10 GB before any cast
    try:
        with torch.device(device):
            unet = UNetModel(**unet_params(root, model))
    finally:
        torch.set_default_dtype(previous)
    if device.type != "meta":
        with torch.no_grad():  # SD zero-initialises output layers; random ones let every path carry signal
            for p in unet.parameters():
                if p.dim() > 1 and torch.count_nonzero(p) == 0:
                    p.normal_(std=0.02)
    if device.type == "cpu" and dtype != torch.float32:
        # ldm/sgm normalise in float32 (GroupNorm32 casts its input up), which CPU kernels accept only with float32
        # parameters; the host runs half precision on GPUs only
        for m in unet.modules():
            if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm):
                m.float()
    if model == "sd15":
        _use_sdpa(unet)
    return unet.eval().requires_grad_(False)


def _sdpa_forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None) -> torch.Tensor:
    """ldm CrossAttention through scaled_dot_product_attention (what the WebUI's SDP optimisation does)."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, inner = q.shape
    h = self.heads
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


def _use_sdpa(unet: torch.nn.Module) -> None:
    for m in unet.modules():
        if type(m).__name__ == "CrossAttention" and hasattr(m, "to_q"):
            m.forward = types.MethodType(_sdpa_forward, m)


# ---- inputs -----------------------------------------------------------------------------------------------------


def conditioning(model: str, batch: int | None, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dim = 768 if model == "sd15" else 2048
    shape = (77, dim) if batch is None else (batch, 77, dim)
    text = torch.randn(shape, generator=g).to(device, dtype)
    if model == "sd15":
        return text
    vector = torch.randn(shape[:-2] + (2816,), generator=g).to(device, dtype)
    return {"crossattn": text, "vector": vector}


def autocast(device: torch.device, dtype: torch.dtype):
    """The host runs half-precision UNets under autocast (its timestep embedding is float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def unet_call(unet: torch.nn.Module, model: str, dtype: torch.dtype, device: torch.device) -> Callable:
    def apply(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        with autocast(device, dtype):
            if model == "sd15":
                return unet(x.to(dtype), timesteps=t, context=cond.to(dtype)).float()
            return unet(x.to(dtype), timesteps=t, context=cond["crossattn"].to(dtype), y=cond["vector"].to(dtype)).float()

    return apply


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- measurements -----------------------------------------------------------------------------------------------


class Memory:
    """Peak memory during a block: GPU (max_memory_allocated) or this process's resident size (see PeakRSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = self.before_mib = 0.0
        self._rss: common.PeakRSS | None = None

    def __enter__(self) -> Memory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before_mib = torch.cuda.memory_allocated() / common.MIB
        else:
            self._rss = common.PeakRSS(os.getpid()).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / common.MIB
        else:
            assert self._rss is not None
            self._rss.__exit__()
            self.before_mib, self.peak_mib = self._rss.before_mib, self._rss.peak_mib


def measure_training(unet, model, dtype, device, size, steps) -> dict[str, Any]:
    latent = size // 8
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, latent, latent, generator=g)
    cond = conditioning(model, None, torch.device("cpu"), torch.float32)
    examples = [TrainExample(image, cond), TrainExample(torch.flip(image, dims=[2]), cond)]
    schedule = DiffusionSchedule(torch.linspace(0.9991, 0.0047, 1000))  # the shape of SD's alphas_cumprod
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32") if device.type == "cuda" else "fp32"
    apply = unet_call(unet, model, dtype, device)
    train_context(apply, unet, examples, TrainConfig(steps=1, seed=0, precision=precision), schedule, device=device)
    sync(device)
    with Memory(device) as mem:
        t0 = time.perf_counter()
        result = train_context(apply, unet, examples, TrainConfig(steps=steps, seed=0, precision=precision),
                               schedule, device=device)
        sync(device)
        seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "s_per_step": seconds / steps, "steps_per_s": steps / seconds,
            "seconds_for_300": seconds / steps * 300, "peak_mib": mem.peak_mib,
            "peak_above_start_mib": mem.peak_mib - mem.before_mib, "final_loss": result.losses[-1]}


def measure_ti_like(unet, model, dtype, device, size, steps, weight_grads: bool = False) -> dict[str, Any]:
    """Gradient to the text conditioning through the same UNet (a TI step without the text encoder); weights frozen,
    or with `weight_grads` trainable as A1111 leaves them (their gradients are computed, then dropped here)."""
    latent = size // 8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    cond = conditioning(model, 1, device, dtype)
    text = (cond if model == "sd15" else cond["crossattn"]).clone().float().requires_grad_()

    def step() -> None:
        c = text.to(dtype)
        with autocast(device, dtype):
            out = unet(x, timesteps=t, context=c) if model == "sd15" else unet(x, timesteps=t, context=c, y=cond["vector"])
        out.float().pow(2).mean().backward()
        text.grad = None
        if weight_grads:
            unet.zero_grad(set_to_none=True)

    unet.requires_grad_(weight_grads)
    with torch.enable_grad():
        step()
        sync(device)
        with Memory(device) as mem:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            seconds = time.perf_counter() - t0
    unet.requires_grad_(False)
    return {"steps": steps, "s_per_step": seconds / steps, "peak_mib": mem.peak_mib,
            "peak_above_start_mib": mem.peak_mib - mem.before_mib}


def measure_generation(unet, model, dtype, device, size, repeats) -> dict[str, Any]:
    """One CFG step (batch 2: cond, uncond) per call; conditions interleaved, ratios per repeat against no hooks."""
    latent = size // 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    cond = conditioning(model, 2, device, dtype)
    kwargs = {"context": cond} if model == "sd15" else {"context": cond["crossattn"], "y": cond["vector"]}
    from lib_anima.layout import find_sites

    sites = find_sites(unet)
    dim = sites[0].context_dim
    contexts = [ReferenceContext(tokens=torch.randn(len(sites), 4, dim, generator=torch.Generator().manual_seed(i)) * 0.5,
                                 arch=model.replace("15", "1"), site_names=[s.name for s in sites]) for i in range(4)]
    tracker = RowTracker()
    sessions = {
        "no hooks": None,
        "session, no context": InjectionSession(unet, [], tracker, sites=sites),
        "1 context": InjectionSession(unet, [Activation(contexts[0], 1.0)], tracker, sites=sites),
        "4 contexts": InjectionSession(unet, [Activation(c, 1.0) for c in contexts], tracker, sites=sites),
    }

    def once(session: InjectionSession | None) -> float:
        tracker.begin_step(1, 2, 0, 20)  # as the host's CFG denoiser announces each step: 1 cond row of 2
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            if session is None:
                unet(x, timesteps=t, **kwargs)
            else:
                with session:
                    unet(x, timesteps=t, **kwargs)
        sync(device)
        return time.perf_counter() - t0

    for s in sessions.values():  # warm-up (and the sessions' cached keys/values)
        once(s)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(repeats):
        for name in names[r % 4:] + names[:r % 4]:
            times[name].append(once(sessions[name]))
    out: dict[str, Any] = {"repeats": repeats, "s_per_call": {k: statistics.median(v) for k, v in times.items()}}
    base = times["no hooks"]
    for name in names[1:]:
        ratios = [a / b for a, b in zip(times[name], base, strict=True)]
        out[name] = {"ratio_median": statistics.median(ratios), "ratio_quartiles": common.quartiles(ratios)}
    return out


def count_flops(root: str, model: str, size: int) -> dict[str, Any]:
    """Arithmetic of one training step and of the context term at generation, counted by torch's FlopCounterMode
    on a meta-device UNet (no memory, no compute): the same on every machine."""
    from torch.utils.flop_counter import FlopCounterMode

    from lib_anima.layout import find_sites

    unet = build_unet(root, model, torch.float32, torch.device("meta"))
    sites = find_sites(unet)
    dim = sites[0].context_dim
    context = ReferenceContext(tokens=torch.zeros(len(sites), 4, dim), arch="sd1" if model == "sd15" else "sdxl",
                               site_names=[s.name for s in sites])
    latent = size // 8
    x = torch.empty(1, 4, latent, latent, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    cond = conditioning(model, 1, torch.device("meta"), torch.float32)
    kwargs = {"context": cond} if model == "sd15" else {"context": cond["crossattn"], "y": cond["vector"]}

    def flops(tokens: torch.Tensor | None, train: bool) -> int:
        session = None
        if tokens is not None:
            context.tokens = tokens  # meta tokens (the file checks ran on the zeros above)
            session = InjectionSession(unet, [Activation(context, 1.0)], sites=sites)  # every row conditional
        inp = x.clone().requires_grad_(train and tokens is None)
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
            if session is None:
                out = unet(inp, timesteps=t, **kwargs)
            else:
                with session:
                    out = unet(inp, timesteps=t, **kwargs)
            if train:
                out.sum().backward()
        return counter.get_total_flops()

    meta_tokens = torch.empty(len(sites), 4, dim, device="meta")
    train_ours = flops(meta_tokens.clone().requires_grad_(), True)
    train_bare = flops(None, True)
    gen_bare, gen_one = flops(None, False), flops(meta_tokens, False)
    term = gen_one - gen_bare
    return {"resolution": size, "train_step_gflop": train_ours / 1e9, "unet_fwd_bwd_gflop": train_bare / 1e9,
            "generation_row_gflop": gen_bare / 1e9, "context_term_gflop_per_row": term / 1e9,
            # a CFG step runs 2 rows; a positive context touches 1 of them
            "generation_overhead_percent_per_context": 100 * term / (2 * gen_bare)}


# ---- the benchmark ----------------------------------------------------------------------------------------------


def run_model(root: str, model: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    on_gpu = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype] if on_gpu else (
        torch.float32 if model == "sd15" else torch.bfloat16)  # SDXL in float32 needs ~10 GB of RAM
    size = NATIVE_PX[model] if on_gpu else args.cpu_resolution
    steps = args.steps if on_gpu else args.cpu_steps
    print(f"[bench] {model}: building the UNet ({dtype}, {device})", flush=True)
    t0 = time.perf_counter()
    unet = build_unet(root, model, dtype, device)
    n_params = sum(p.numel() for p in unet.parameters())
    out: dict[str, Any] = {"resolution": size, "dtype": str(dtype).replace("torch.", ""), "params": n_params,
                           "build_s": time.perf_counter() - t0}
    print(f"[bench] {model}: {n_params / 1e6:.0f} M parameters; training {steps} steps at {size} px", flush=True)
    out["train"] = measure_training(unet, model, dtype, device, size, steps)
    out["ti_like"] = measure_ti_like(unet, model, dtype, device, size, max(1, min(steps, 20)))
    out["ours/ti_like"] = {"s_per_step": out["train"]["s_per_step"] / out["ti_like"]["s_per_step"],
                           "peak_above_start": common.ratio(out["train"]["peak_above_start_mib"],
                                                            out["ti_like"]["peak_above_start_mib"])}
    if on_gpu or model == "sd15":  # weight gradients of SDXL would need another ~5 GB of RAM on the CPU path
        out["ti_like_weight_grads"] = measure_ti_like(unet, model, dtype, device, size, max(1, min(steps, 20)),
                                                      weight_grads=True)
        out["ours/ti_like_weight_grads"] = {
            "s_per_step": out["train"]["s_per_step"] / out["ti_like_weight_grads"]["s_per_step"],
            "peak_above_start": common.ratio(out["train"]["peak_above_start_mib"],
                                             out["ti_like_weight_grads"]["peak_above_start_mib"])}
    out["generation"] = measure_generation(unet, model, dtype, device, size,
                                           args.gen_repeats if on_gpu else args.cpu_gen_repeats)
    if on_gpu:
        out["goal_s"] = GOALS_S[model]
        out["goal_met"] = out["train"]["seconds_for_300"] <= GOALS_S[model]
    del unet
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    args = parse_args()
    started = common.begin()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(models) - set(NATIVE_PX):
        raise SystemExit(f"--models takes sd15, sdxl; got {args.models}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = host_sources(args.host_dir)
    if device.type != "cuda":
        print("[bench] NO CUDA DEVICE: GPU FIGURES ARE MISSING. Running the reduced CPU path (real SD1.5/SDXL "
              f"architectures at {args.cpu_resolution} px, {args.cpu_steps} steps, 300-step time extrapolated).",
              flush=True)
    results: dict[str, Any] = {"device": device.type, "gpu_figures": device.type == "cuda",
                               "settings": vars(args), "models": {}, "flops": {}}
    for model in models:
        results["flops"][model] = count_flops(root, model, NATIVE_PX[model])
    for model in models:
        if device.type != "cuda" and model == "sdxl" and _available_gib() < 12:
            results["models"][model] = {"skipped": f"only {_available_gib():.1f} GiB of RAM free; SDXL on the CPU "
                                                   "path needs about 12"}
            print(f"[bench] sdxl skipped: {results['models'][model]['skipped']}")
            continue
        try:
            results["models"][model] = run_model(root, model, args, device)
        except (RuntimeError, MemoryError) as e:  # keep the other model's figures
            results["models"][model] = {"skipped": f"failed: {type(e).__name__}: {e}"}
            print(f"[bench] {model} failed: {e}", flush=True)
    if device.type != "cuda":
        results["note"] = ("GPU figures missing: no CUDA device on this machine. CPU path at "
                           f"{args.cpu_resolution} px; the 300-step seconds are extrapolated from {args.cpu_steps} steps.")
    json_path, png_path = common.write_record("gpu", results, started, plot(results))
    report(results)
    print(f"[bench] wrote {json_path} and {png_path}")


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf


def report(results: dict[str, Any]) -> None:
    print()
    for model, f in results["flops"].items():
        print(f"{model} {f['resolution']} px arithmetic (FlopCounterMode): training step {f['train_step_gflop']:.0f} GFLOP "
              f"(UNet fwd+bwd {f['unet_fwd_bwd_gflop']:.0f}); context term at generation "
              f"{f['context_term_gflop_per_row']:.2f} GFLOP = {f['generation_overhead_percent_per_context']:.2f} % "
              "of a CFG step per context")
    if not results["gpu_figures"]:
        print("GPU FIGURES MISSING (no CUDA device). CPU path:")
    for model, r in results["models"].items():
        if "skipped" in r:
            print(f"{model}: skipped ({r['skipped']})")
            continue
        tr, ti, gen = r["train"], r["ti_like"], r["generation"]
        goal = f" (goal <= {r['goal_s']:.0f} s: {'met' if r['goal_met'] else 'NOT met'})" if "goal_s" in r else \
            " (extrapolated)"
        print(f"{model} {r['resolution']} px {r['dtype']}: {tr['s_per_step']:.3f} s/step, {tr['steps_per_s']:.2f} steps/s, "
              f"300 steps {tr['seconds_for_300']:.1f} s{goal}, peak {tr['peak_mib']:.0f} MiB "
              f"(+{tr['peak_above_start_mib']:.0f} above the weights)")
        print(f"  TI-like step {ti['s_per_step']:.3f} s, peak +{ti['peak_above_start_mib']:.0f} MiB; ours/TI-like "
              f"s/step {r['ours/ti_like']['s_per_step']:.3f}, peak {common.fmt(r['ours/ti_like']['peak_above_start'])}")
        tw = r.get("ti_like_weight_grads")
        if tw:
            print(f"  TI-like step with weight gradients (as A1111) {tw['s_per_step']:.3f} s, peak "
                  f"+{tw['peak_above_start_mib']:.0f} MiB; ours/that s/step "
                  f"{r['ours/ti_like_weight_grads']['s_per_step']:.3f}, peak "
                  f"{common.fmt(r['ours/ti_like_weight_grads']['peak_above_start'])}")
        parts = [f"{k} {gen[k]['ratio_median']:.3f}" for k in ("session, no context", "1 context", "4 contexts")]
        print(f"  generation per-step time / no hooks (median of {gen['repeats']}): " + ", ".join(parts))


def plot(results: dict[str, Any]):
    plt = common.pyplot()
    models = [m for m, r in results["models"].items() if "skipped" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for i, m in enumerate(models):
        r = results["models"][m]
        ax1.bar(i - width / 2, r["train"]["s_per_step"], width, color="C0", label="ours" if i == 0 else None)
        ax1.bar(i + width / 2, r["ti_like"]["s_per_step"], width, color="C1", label="TI-like" if i == 0 else None)
        gen = r["generation"]
        keys = ("session, no context", "1 context", "4 contexts")
        ax2.bar([i * 4 + j for j in range(3)], [gen[k]["ratio_median"] for k in keys], color=["C2", "C0", "C3"])
    ax1.set_xticks(range(len(models)), [f"{m} {results['models'][m]['resolution']} px" for m in models])
    ax1.set_title("training: seconds per step", fontsize=10)
    ax1.legend(fontsize=8)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xticks([i * 4 + j for i in range(len(models)) for j in range(3)],
                   [f"{m}\n{k}" for m in models for k in ("0 ctx", "1 ctx", "4 ctx")], fontsize=7)
    ax2.set_title("generation: per-step time / no hooks", fontsize=10)
    where = "CUDA" if results["gpu_figures"] else "CPU path - GPU FIGURES MISSING"
    fig.suptitle(f"real SD1.5 / SDXL architectures, random weights ({where})")
    return fig


if __name__ == "__main__":
    main()
