"""Generation overhead: per-step sampling time with the extension installed but no context, with 1 context and
with 4 contexts, against the same WebUI without the extension.

    python -m benchmarks.gen_overhead                 # starts two hosts: with and without the extension
    python -m benchmarks.gen_overhead --url http://127.0.0.1:7860 --baseline-url http://127.0.0.1:7861

Two hosts from the same offline A1111 (same model, settings, threads) are measured interleaved: every repeat
runs each condition once in a rotating order. The per-step time of a condition in a repeat is
``(t(steps_hi) - t(steps_lo)) / (steps_hi - steps_lo)`` over two txt2img calls that differ only in the step
count, so prompt encoding, VAE decoding and HTTP cancel out. Ratios are taken per repeat against the
extension-less host's time of the same repeat; the median and quartiles over the repeats are reported. The
contexts' conditions are also given against "installed, no context" (no hook, so the host's own code path) of
the same repeat: the same server process, which leaves out differences between two processes (core placement,
memory layout) that show up as a few per cent either way in "installed, no context" against the other host.

Contexts are untrained (``POST /anima/v1/contexts``): the cost of the injection does not depend on the values.
Each context is checked to be applied (its ``Anima N`` infotext entry) before timing.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks import common

CONDITIONS = ("disabled", "none", "one", "four")
LABELS = {"disabled": "extension not installed", "none": "installed, no context",
          "one": "1 context", "four": "4 contexts"}
N_CONTEXTS = {"none": 0, "one": 1, "four": 4}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running WebUI WITH this extension (default: start one)")
    ap.add_argument("--baseline-url", help="a running WebUI WITHOUT this extension (default: start one)")
    ap.add_argument("--host-dir", default=os.path.join(common.DEFAULT_HOSTS, "gen"))
    ap.add_argument("--baseline-host-dir", default=os.path.join(common.DEFAULT_HOSTS, "gen-baseline"))
    ap.add_argument("--port", type=int, default=0, help="0: a free one from 7950 (baseline: the next free one)")
    ap.add_argument("--threads", type=int, default=1, help=common.THREADS_HELP)
    ap.add_argument("--ckpt", default=None, help="checkpoint of hosts started here (tiny, tiny_xl, tiny_v2)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps-lo", type=int, default=2)
    ap.add_argument("--steps-hi", type=int, default=22)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sampler", default="Euler")
    return ap.parse_args()


def payload(args: argparse.Namespace, steps: int, n_contexts: int) -> dict[str, Any]:
    tags = "".join(f" <anima:anima-bench-gen-{i}:1>" for i in range(n_contexts))
    return {
        "prompt": "a photo of a red fox in the snow" + tags, "negative_prompt": "", "steps": steps,
        "width": args.resolution, "height": args.resolution, "sampler_name": args.sampler, "cfg_scale": 7.0,
        "seed": 1, "batch_size": 1, "n_iter": 1, "save_images": False, "send_images": False,
    }


def timed_txt2img(url: str, body: dict[str, Any], pid: int | None = None) -> tuple[float, float | None, dict]:
    """Wall seconds, the server's CPU seconds (None without its pid) and the answer of one txt2img call."""
    cpu0 = common.process_cpu_seconds(pid) if pid else None
    t0 = time.perf_counter()
    r = common.call(url, "/sdapi/v1/txt2img", body, timeout=3600)
    wall = time.perf_counter() - t0
    cpu1 = common.process_cpu_seconds(pid) if pid else None
    return wall, None if cpu0 is None or cpu1 is None else cpu1 - cpu0, r


def check_applied(url: str, args: argparse.Namespace, n_contexts: int) -> None:
    _, _, r = timed_txt2img(url, payload(args, args.steps_lo, n_contexts))
    info = r.get("info", "")
    applied = sum(f'"Anima {i + 1}:' in info or f"Anima {i + 1}:" in info for i in range(4))
    if applied != n_contexts or "Anima warnings" in info:
        raise RuntimeError(f"expected {n_contexts} applied context(s), the infotext says: {info[:800]}")


def main() -> None:
    args = parse_args()
    if args.steps_hi <= args.steps_lo:
        raise SystemExit("--steps-hi must be greater than --steps-lo")
    started = common.begin()
    port = args.port or common.free_port()
    base_port = common.free_port(port + 1) if not args.port else args.port + 1
    specs = [(args.url, args.host_dir, port, True), (args.baseline_url, args.baseline_host_dir, base_port, False)]
    per_step: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    cpu_per_step: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    with common.hosts(specs, threads=args.threads or None, ckpt=args.ckpt) as (ext, base):
        print(f"[bench] with the extension: {ext.url}; without: {base.url}")
        status = common.call(ext.url, "/anima/v1/status")
        for i in range(4):
            common.call(ext.url, "/anima/v1/contexts", {"name": f"anima-bench-gen-{i}", "n_tokens": 4, "seed": i,
                                                        "overwrite": True})
        try:
            urls = {"disabled": base.url, "none": ext.url, "one": ext.url, "four": ext.url}
            pids = {"disabled": base.pid, "none": ext.pid, "one": ext.pid, "four": ext.pid}
            for c in CONDITIONS:  # warm-up, untimed; also checks the contexts are applied
                timed_txt2img(urls[c], payload(args, args.steps_hi, N_CONTEXTS.get(c, 0)))
                if c != "disabled":
                    check_applied(ext.url, args, N_CONTEXTS[c])
            for r in range(args.repeats):
                order = CONDITIONS[r % 4:] + CONDITIONS[:r % 4]
                for c in order:
                    n = N_CONTEXTS.get(c, 0)
                    lo, cpu_lo, _ = timed_txt2img(urls[c], payload(args, args.steps_lo, n), pids[c])
                    hi, cpu_hi, _ = timed_txt2img(urls[c], payload(args, args.steps_hi, n), pids[c])
                    per_step[c].append((hi - lo) / (args.steps_hi - args.steps_lo))
                    if cpu_lo is not None and cpu_hi is not None:
                        cpu_per_step[c].append((cpu_hi - cpu_lo) / (args.steps_hi - args.steps_lo))
                line = ", ".join(f"{c} {per_step[c][-1] * 1000:.1f}" for c in CONDITIONS)
                print(f"[bench] repeat {r + 1}/{args.repeats}: ms/step {line}", flush=True)
            threads = common.host_threads(ext)
        finally:
            for i in range(4):
                try:
                    common.call(ext.url, f"/anima/v1/contexts/anima-bench-gen-{i}", method="DELETE")
                except RuntimeError:
                    pass
    summary = summarize(per_step)
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("url", "baseline_url")} | {
            "urls_given": bool(args.url or args.baseline_url), "host_torch_threads": threads,
            "model_architecture": status.get("model_architecture"), "cfg_scale": 7.0, "batch_size": 1},
        "summary": summary, "per_step_s": per_step,
        "cpu_summary": summarize(cpu_per_step) if all(cpu_per_step.values()) else None,
        "cpu_per_step_s": cpu_per_step,
        "cpu_note": "the server process's CPU seconds (all threads) per step, same difference method: less "
                    "sensitive than wall time to other load on a shared machine",
    }
    json_path, png_path = common.write_record("gen_overhead", results, started, plot(per_step, cpu_per_step, args))
    report(summary, args, "wall time")
    if results["cpu_summary"]:
        report(results["cpu_summary"], args, "server CPU time")
    print(f"[bench] wrote {json_path} and {png_path}")


def summarize(per_step: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = per_step["disabled"]
    for c in CONDITIONS:
        values = per_step[c]
        entry: dict[str, Any] = {"median_s_per_step": common.median(values), "quartiles_s": common.quartiles(values)}
        if c != "disabled":
            ratios = [common.ratio(a, b) for a, b in zip(values, base, strict=False)]
            entry["ratio_median"] = common.median(ratios)
            entry["ratio_quartiles"] = common.quartiles(ratios)
            entry["ratio_of_medians"] = common.ratio(common.median(values), common.median(base))
            entry["overhead_percent"] = None if entry["ratio_median"] is None else (entry["ratio_median"] - 1) * 100
        if c in ("one", "four"):  # against the same server process with no context: no host-to-host difference
            same = [common.ratio(a, b) for a, b in zip(values, per_step["none"], strict=False)]
            entry["ratio_vs_none_median"] = common.median(same)
            entry["ratio_vs_none_quartiles"] = common.quartiles(same)
        out[c] = entry
    return out


def report(summary: dict[str, Any], args: argparse.Namespace, what: str) -> None:
    print(f"\nper-step sampling {what}, {args.resolution} px, {args.sampler}, batch 1 with CFG, steps "
          f"{args.steps_lo} vs {args.steps_hi}, {args.repeats} interleaved repeats")
    print(f"{'condition':<26}{'ms/step':>9}{'ratio (median)':>16}{'quartiles':>18}")
    for c in CONDITIONS:
        s = summary[c]
        ms = None if s["median_s_per_step"] is None else s["median_s_per_step"] * 1000
        q = s.get("ratio_quartiles")
        quart = "" if not q else f"{q[0]:.3f}-{q[1]:.3f}"
        print(f"{LABELS[c]:<26}{common.fmt(ms, 1):>9}{common.fmt(s.get('ratio_median')) if c != 'disabled' else '1':>16}"
              f"{quart:>18}")
    print("the injection alone, against the same server with no context (no host-to-host difference):")
    for c in ("one", "four"):
        q = summary[c].get("ratio_vs_none_quartiles")
        quart = "" if not q else f"{q[0]:.3f}-{q[1]:.3f}"
        print(f"{LABELS[c]:<26}{'':>9}{common.fmt(summary[c].get('ratio_vs_none_median')):>16}{quart:>18}")


def plot(per_step: dict[str, list[float]], cpu_per_step: dict[str, list[float]], args: argparse.Namespace):
    plt = common.pyplot()
    panels = [("wall", per_step)] + ([("server CPU", cpu_per_step)] if all(cpu_per_step.values()) else [])
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 * (1 + len(panels)), 4))
    axes[0].boxplot([[v * 1000 for v in per_step[c]] for c in CONDITIONS], showfliers=True)
    axes[0].set_xticks(range(1, 5), [LABELS[c] for c in CONDITIONS], rotation=15)
    axes[0].set_title("wall ms per sampling step (boxes: repeats)", fontsize=10)
    for ax, (what, values) in zip(axes[1:], panels, strict=True):
        ratios = [[common.ratio(a, b) for a, b in zip(values[c], values["disabled"], strict=False)]
                  for c in CONDITIONS[1:]]
        ax.boxplot(ratios, showfliers=True)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(1.03, color="C3", lw=0.8, ls="--", label="+3 %")
        ax.set_xticks(range(1, 4), [LABELS[c] for c in CONDITIONS[1:]], rotation=15)
        ax.set_title(f"{what} per step / extension not installed", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"generation overhead, {args.resolution} px, {args.sampler}, {args.repeats} interleaved repeats")
    return fig


if __name__ == "__main__":
    main()
