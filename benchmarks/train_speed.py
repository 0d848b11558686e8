"""Training speed and memory on a real A1111: our context training against the host's textual inversion (TI) and
hypernetwork (HN) training, on the same reference image, resolution, batch (1) and step count.

    python -m benchmarks.train_speed                       # starts its own host (benchmarks/.hosts/train)
    python -m benchmarks.train_speed --url http://127.0.0.1:7860 --steps 100 --resolution 512

The three run interleaved, in a rotating order, for ``--rounds`` rounds (at least 5) after a short untimed warm-up
round, so drift of a shared machine falls on all three alike. Per run:

* total seconds: the wall time of the HTTP call (set-up, encoding, the steps, saving);
* seconds per step: the steady rate between the first and the last step seen by polling ``/sdapi/v1/progress``
  (all three count steps in ``state.job_no``), i.e. without set-up and saving; wall time / steps if polling saw
  too few steps;
* CPU seconds per step: the server process's CPU time over the call / steps (less sensitive to other load);
* peak memory: the server process's peak resident memory during the call minus its level just before (see
  :class:`benchmarks.common.PeakRSS`); on a CUDA host also the GPU's, from the host's ``/sdapi/v1/memory``.

Prints, per method and for the ``ours/TI``, ``ours/HN`` ratios (< 1: ours is faster), the median and the range
(lowest–highest) over the rounds — not the best round; the ratios are taken round by round (the runs of a round
are neighbours in time), and writes
``benchmarks/results/train_speed/latest.{json,png}``.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common

METHODS = ("ti", "hn", "ours")
MIN_ROUNDS = 5
KEYS = ("s_per_step", "total_s", "cpu_s_per_step", "peak_rss_delta_mib", "gpu_peak_mib")
LABELS = {"ti": "host textual inversion", "hn": "host hypernetwork", "ours": "anima context (ours)"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running WebUI with this extension and --api (default: start one)")
    ap.add_argument("--host-dir", default=os.path.join(common.DEFAULT_HOSTS, "train"),
                    help="host folder to set up / start when no --url (default: %(default)s)")
    ap.add_argument("--port", type=int, default=0, help="port of a host started here (0: a free one from 7950)")
    ap.add_argument("--threads", type=int, default=1, help=common.THREADS_HELP)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--n-tokens", type=int, default=4, help="our tokens per site = TI vectors per token")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds, at least %(default)s")
    ap.add_argument("--only", default=",".join(METHODS), help="comma separated subset of ti,hn,ours")
    return ap.parse_args()


# ---- one training run of each kind ------------------------------------------------------------------------------


def _host_fields(steps: int, size: int, data_root: str, log_dir: str, template: str) -> dict[str, Any]:
    """The arguments the host's TI and HN trainers share: batch 1, no previews, one save at the end."""
    return {
        "batch_size": 1, "gradient_step": 1, "data_root": data_root, "log_directory": log_dir,
        "training_width": size, "training_height": size, "varsize": False, "steps": steps,
        "clip_grad_mode": "disabled", "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0,
        "latent_sampling_method": "once", "use_weight": False, "create_image_every": 0,
        # A1111 1.10.1 writes its settings file into a folder made only when a save or image interval is set
        "template_filename": template, "preview_from_txt2img": False, "preview_prompt": "",
        "preview_negative_prompt": "", "preview_steps": 20, "preview_sampler_name": "Euler a",
        "preview_cfg_scale": 7.0, "preview_seed": -1, "preview_width": size, "preview_height": size,
    }


def clear_loaded_networks(url: str) -> None:
    """Untimed, before every timed run: the host keeps a hypernetwork it trained loaded (applied in every
    cross-attention, for TI's and our training too, ~3x slower per step here) until a generation loads the
    prompt's networks; one tiny txt2img without any puts every method on the same clean host."""
    common.call(url, "/sdapi/v1/txt2img", {"prompt": "a photo", "steps": 1, "width": 64, "height": 64, "seed": 1})


def prepare_ti(url: str, name: str, args: argparse.Namespace) -> None:
    info = common.call(url, "/sdapi/v1/create/embedding", {
        "name": name, "num_vectors_per_token": args.n_tokens, "overwrite_old": True, "init_text": "*"})["info"]
    if "error" in info:
        raise RuntimeError(f"create/embedding: {info}")
    common.call(url, "/sdapi/v1/refresh-embeddings", {})


def run_ti(url: str, name: str, args: argparse.Namespace, data_root: str, log_dir: str) -> None:
    payload = {"id_task": f"bench-{name}", "embedding_name": name, "learn_rate": "0.005",
               "save_embedding_every": args.steps, "save_image_with_stored_embedding": False,
               **_host_fields(args.steps, args.resolution, data_root, log_dir, "subject.txt")}
    _check_host_answer(common.call(url, "/sdapi/v1/train/embedding", payload, timeout=7200)["info"])


def prepare_hn(url: str, name: str, args: argparse.Namespace) -> None:
    info = common.call(url, "/sdapi/v1/create/hypernetwork", {
        "name": name, "enable_sizes": [768, 320, 640, 1024, 1280], "overwrite_old": True,
        "layer_structure": "1, 2, 1", "activation_func": "linear", "weight_init": "Normal",
        "add_layer_norm": False, "use_dropout": False})["info"]
    if "error" in info:
        raise RuntimeError(f"create/hypernetwork: {info}")


def run_hn(url: str, name: str, args: argparse.Namespace, data_root: str, log_dir: str) -> None:
    payload = {"id_task": f"bench-{name}", "hypernetwork_name": name, "learn_rate": "0.00001",
               "save_hypernetwork_every": args.steps,
               **_host_fields(args.steps, args.resolution, data_root, log_dir, "hypernetwork.txt")}
    _check_host_answer(common.call(url, "/sdapi/v1/train/hypernetwork", payload, timeout=7200)["info"])


def _check_host_answer(info: str) -> None:
    # the host answers 200 with the error in the text ("train embedding complete: ... error: None" when fine)
    if "error: None" not in info:
        raise RuntimeError(f"the host's trainer failed: {info}")


def run_ours(url: str, name: str, args: argparse.Namespace, image_b64: str) -> None:
    common.call(url, "/anima/v1/train", {
        "name": name, "images": [image_b64], "prompt": "a photo of a subject", "steps": args.steps,
        "learning_rate": "5e-3", "n_tokens": args.n_tokens, "resolution": args.resolution, "flip": False,
        "seed": 1, "overwrite": True, "sweep": False}, timeout=7200)  # the host trains no sweep either


def measure(host: common.Host, args: argparse.Namespace, job: Callable[[], None]) -> dict[str, Any]:
    gpu_before = _gpu_peak(host.url)
    cpu0 = common.process_cpu_seconds(host.pid) if host.pid else None
    memory = common.PeakRSS(host.pid) if host.pid else None
    with common.ProgressPoller(host.url) as poller, (memory or _nothing()):
        t0 = time.perf_counter()
        job()
        total = time.perf_counter() - t0
    cpu1 = common.process_cpu_seconds(host.pid) if host.pid else None
    steady = poller.seconds_per_step(args.steps)
    out = {
        "total_s": total, "s_per_step": steady if steady is not None else total / args.steps,
        "s_per_step_from": "progress polling" if steady is not None else "wall time / steps",
        "cpu_s_per_step": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / args.steps,
        "peak_rss_delta_mib": memory.delta_mib if memory else None,
        "peak_rss_mib": memory.peak_mib if memory else None,
    }
    gpu_after = _gpu_peak(host.url)
    if gpu_after is not None:
        out["gpu_peak_mib"] = gpu_after  # the host's CUDA peak so far (it is never reset; see the README)
        out["gpu_peak_grew"] = gpu_before is not None and gpu_after > gpu_before
    return out


def _gpu_peak(url: str) -> float | None:
    try:
        cuda = common.call(url, "/sdapi/v1/memory", timeout=30).get("cuda") or {}
        peak = (cuda.get("allocated") or {}).get("peak")
        return None if peak is None else float(peak) / common.MIB
    except (RuntimeError, ValueError, TypeError, AttributeError):
        return None


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---- the benchmark ----------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds {args.rounds}: at least {MIN_ROUNDS} (a median and range of fewer say little)")
    started = common.begin()
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    work = tempfile.mkdtemp(prefix="anima-bench-train-")
    png = common.reference_png(max(args.resolution, 64))
    data_root = os.path.join(work, "dataset")
    os.makedirs(data_root)
    with open(os.path.join(data_root, "subject.png"), "wb") as f:
        f.write(png)
    image_b64 = base64.b64encode(png).decode()
    specs = [(args.url, args.host_dir, args.port, True)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    threads = None
    try:
        with common.hosts(specs, threads=args.threads or None) as (host,):
            print(f"[bench] host {host.url} (pid {host.pid}, torch threads {common.host_threads(host) or 'default'})")
            jobs = _jobs(host.url, args, data_root, os.path.join(work, "log"), image_b64)
            warm = argparse.Namespace(**{**vars(args), "steps": 3})
            warm_jobs = _jobs(host.url, warm, data_root, os.path.join(work, "log"), image_b64)
            for m in methods:  # untimed: first calls load code paths, caches and the trainers' modules
                warm_jobs[m][0]("warmup")
                warm_jobs[m][1]("warmup")
            for r in range(args.rounds):
                order = methods[r % len(methods):] + methods[:r % len(methods)]
                for m in order:
                    jobs[m][0](f"r{r}")
                    clear_loaded_networks(host.url)
                    result = measure(host, args, lambda m=m, r=r: jobs[m][1](f"r{r}"))
                    result["round"] = r
                    runs[m].append(result)
                    print(f"[bench] round {r + 1}/{args.rounds} {m:>4}: {result['s_per_step']:.3f} s/step, "
                          f"total {result['total_s']:.1f} s, peak +{common.fmt(result['peak_rss_delta_mib'], 0)} MiB",
                          flush=True)
            threads = common.host_threads(host)
            _cleanup(host, methods)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "url"} | {"url_given": bool(args.url),
               "host_torch_threads": threads, "batch_size": 1, "flip": False},
               "memory_method": common.PeakRSS.__doc__.split("\n\n")[0].strip() + " (server process)",
               "summary": summary, "runs": runs}
    json_path, png_path = common.write_record("train_speed", results, started, plot(runs, summary, args))
    report(summary, args)
    print(f"[bench] wrote {json_path} and {png_path}")


def _jobs(url: str, args: argparse.Namespace, data_root: str, log_dir: str,
          image_b64: str) -> dict[str, tuple[Callable, Callable]]:
    """Per method: (untimed preparation, the timed training call), each taking a run tag."""
    return {
        "ti": (lambda tag: prepare_ti(url, f"anima-bench-ti-{tag}", args),
               lambda tag: run_ti(url, f"anima-bench-ti-{tag}", args, data_root, log_dir)),
        "hn": (lambda tag: prepare_hn(url, f"anima-bench-hn-{tag}", args),
               lambda tag: run_hn(url, f"anima-bench-hn-{tag}", args, data_root, log_dir)),
        "ours": (lambda tag: None, lambda tag: run_ours(url, f"anima-bench-ours-{tag}", args, image_b64)),
    }


def _cleanup(host: common.Host, methods: list[str]) -> None:
    """Remove what the runs made in a host this script started (a --url host keeps them: its files, its call)."""
    if not host.dir:
        return
    for sub in ("embeddings", os.path.join("models", "hypernetworks")):
        folder = os.path.join(host.dir, sub)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith("anima-bench-"):
                os.remove(os.path.join(folder, name))
    if "ours" in methods:
        for ctx in (common.call(host.url, "/anima/v1/contexts") or {}).get("contexts", []):
            if str(ctx.get("name", "")).startswith("anima-bench-"):
                try:
                    common.call(host.url, f"/anima/v1/contexts/{ctx['name']}", method="DELETE")
                except RuntimeError:
                    pass


def spread(values: list[float | None]) -> dict[str, float | None]:
    """Median and range (lowest, highest) of the measured values; None where there are none."""
    xs = [v for v in values if v is not None]
    return {"median": common.median(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method and key: the median over the rounds (and ``<key>_range``: [lowest, highest]); per ratio
    ``ours/<other>``: the ratio of the medians and, round by round, ``<key>_by_round`` with its median and range."""
    out: dict[str, Any] = {}
    for m, rs in runs.items():
        out[m] = {}
        for k in KEYS:
            sp = spread([r.get(k) for r in rs])
            out[m][k] = sp["median"]
            out[m][f"{k}_range"] = [sp["min"], sp["max"]]
    ours = out.get("ours")
    for other in ("ti", "hn"):
        if ours is None or other not in out:
            continue
        r: dict[str, Any] = {k: common.ratio(ours[k], out[other][k]) for k in KEYS}
        for k in ("s_per_step", "cpu_s_per_step", "total_s"):
            by_round = [common.ratio(a.get(k), b.get(k)) for a, b in zip(runs["ours"], runs[other], strict=False)]
            r[f"{k}_by_round"] = by_round
            r[f"{k}_by_round_spread"] = spread(by_round)
        out[f"ours/{other}"] = r
    return out


def _range(s: dict[str, Any], key: str, digits: int) -> str:
    lo, hi = s.get(f"{key}_range", [None, None])
    return f"{common.fmt(s[key], digits)} ({common.fmt(lo, digits)}–{common.fmt(hi, digits)})"


def report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\ntraining speed, {args.resolution} px, batch 1, {args.steps} steps; median (lowest–highest) of "
          f"{args.rounds} interleaved rounds")
    print(f"{'method':<24}{'s/step':>22}{'CPU s/step':>22}{'total s':>20}{'peak +MiB':>16}")
    for m in METHODS:
        s = summary.get(m)
        if s:
            print(f"{LABELS[m]:<24}{_range(s, 's_per_step', 3):>22}{_range(s, 'cpu_s_per_step', 3):>22}"
                  f"{_range(s, 'total_s', 1):>20}{_range(s, 'peak_rss_delta_mib', 0):>16}")
    for other in ("ti", "hn"):
        r = summary.get(f"ours/{other}")
        if r:
            w, c = r["s_per_step_by_round_spread"], r["cpu_s_per_step_by_round_spread"]
            speed = {k: common.ratio(1.0, w[k]) for k in ("median", "min", "max")}
            print(f"ours/{other.upper()} per round: s/step {common.fmt(w['median'])} ({common.fmt(w['min'])}–"
                  f"{common.fmt(w['max'])}), i.e. ours {common.fmt(speed['median'], 2)}x as fast "
                  f"({common.fmt(speed['max'], 2)}–{common.fmt(speed['min'], 2)}x); CPU s/step {common.fmt(c['median'])} "
                  f"({common.fmt(c['min'])}–{common.fmt(c['max'])}); peak memory {common.fmt(r['peak_rss_delta_mib'])}")


def plot(runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], args: argparse.Namespace):
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    methods = [m for m in METHODS if m in runs]
    for i, m in enumerate(methods):
        values = [r["s_per_step"] for r in runs[m]]
        ax1.scatter([i] * len(values), values, color="grey", s=12, zorder=3)
        ax1.bar(i, summary[m]["s_per_step"] or 0, color=f"C{i}")
        mem = summary[m]["peak_rss_delta_mib"]
        ax2.bar(i, mem or 0, color=f"C{i}")
    for ax, title in ((ax1, "seconds per step (median, dots: rounds)"), (ax2, "peak RSS above start (MiB)")):
        ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=15)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"training on the host's model, {args.resolution} px, batch 1, {args.steps} steps, "
                 f"{args.rounds} interleaved rounds (bars: median, dots: each round)")
    return fig


if __name__ == "__main__":
    main()
