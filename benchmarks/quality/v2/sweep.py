"""The defaults sweep (ours only): the extension's UI defaults (batch 1, lr 5e-3, 4 tokens per site, all sites)
and one change at a time — learning rate, tokens per site, sites preset — each trained up to 400
steps (batch 1) with checkpoints, drawn at scales 0.5 and 1 along the way, on the dev character and the first test
characters (``--sweep-characters``, default 1). Reports, per configuration, the step and CPU time at which the similarity within
the adherence floor first reaches base + 50 % of the way to 1.0 (a fixed target: no fine-tune is run here) and
its best value. Writes ``benchmarks/results/quality_v2/sweep.json``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from benchmarks.quality.scoring import ClassifierConfig, load_or_train_classifier
from benchmarks.quality.v2 import data, methods
from benchmarks.quality.v2 import scoring as goals
from benchmarks.quality.v2.model import CACHE, ModelConfig, PretrainConfig, load_or_pretrain
from lib_anima.fileio import atomic_write_text

DEFAULTS = {"lr": 5e-3, "n_tokens": 4, "weights": "all"}  # lib_anima.train.TrainConfig / the training tab
VARIANTS = [
    {}, {"lr": 1.5e-3}, {"lr": 1.5e-2}, {"lr": 5e-2}, {"lr": 1.5e-1},
    {"n_tokens": 1}, {"n_tokens": 8},
    {"weights": "coarse"}, {"weights": "middle"}, {"weights": "fine"},
]


_STATE: dict = {}


def _one(item: tuple[int, data.Character]) -> dict:
    from benchmarks.quality.v2.run import curve

    i, c = item
    st = _STATE
    torch.set_num_threads(st["threads"])
    drawer, steps = st["drawer"], st["steps"]
    cfg = {**DEFAULTS, **VARIANTS[i]}
    one = methods.OneShotConfig(budget_s=10**9, batch_size=1, n_tokens=cfg["n_tokens"], lr_ours=cfg["lr"],
                                weights=cfg["weights"], max_steps=steps, first_checkpoint=10, checkpoint_growth=2.0)
    base = drawer.score(st["base_images"], st["pairs"], c)
    target = base["similarity"] + 0.5 * (1.0 - base["similarity"])
    run = methods.train_ours(drawer.model, c, one, log=st["log"])
    cv = curve(drawer, c, run, drawer.evaluation.curve_seeds)
    vals = goals.checkpoint_values(cv, goals.floor_of(base))
    reached = next((v for v in vals if v["value"] is not None and v["value"] >= target), None)
    ok = [v["value"] for v in vals if v["value"] is not None]
    st["log"](f"{VARIANTS[i] or 'defaults'} {data.slug(c)}: best {max(ok) if ok else None}, "
              f"target {target:.3f} at step {reached and reached['step']}")
    return {"character": data.slug(c), "base_similarity": base["similarity"], "target": round(target, 4),
            "step_to_target": reached and reached["step"], "seconds_to_target": reached and reached["seconds"],
            "best": max(ok) if ok else None, "seconds_per_step": round(run.final.seconds / run.final.step, 4),
            "values": vals, "curve": cv}


def main(args: argparse.Namespace) -> int:
    from benchmarks.quality.v2.run import OUT, Drawer, EvalConfig, _commit, _log

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    commit = _commit()
    log = _log(start, "sweep: ")
    pre, cls, evaluation, steps = PretrainConfig(), ClassifierConfig(), EvalConfig(curve_seeds=1), 400
    if args.quick:
        pre, cls = PretrainConfig(steps=20, bank=256, stage2_steps=10, stage3_steps=5), ClassifierConfig(steps=20, bank=256)
        evaluation, steps = EvalConfig(curve_seeds=1, sampler_steps=3), 10
    model, _ = load_or_pretrain(ModelConfig(), pre, log)
    classifier, _ = load_or_train_classifier(cls, log)
    drawer = Drawer(model, classifier, evaluation)
    base_images, pairs = drawer.draw("base", None, 0.0, "positive", evaluation.curve_seeds)
    characters = [data.DEV_CHARACTER, *data.TEST_CHARACTERS[: max(0, args.sweep_characters)]]
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    _STATE.update(drawer=drawer, base_images=base_images, pairs=pairs, steps=steps, threads=args.threads, log=log)
    items = [(i, c) for i in range(len(VARIANTS)) for c in characters]
    from benchmarks.quality.v2.run import _map

    done = dict(zip(items, _map(_one, items, args.jobs), strict=True))
    rows = []
    for i, variant in enumerate(VARIANTS):
        per = [done[(i, c)] for c in characters]
        rows.append({"config": {**DEFAULTS, **variant}, "changed": variant or "defaults", "characters": per,
                     "step_to_target": goals.summary([p["step_to_target"] for p in per]),
                     "seconds_to_target": goals.summary([p["seconds_to_target"] for p in per]),
                     "best": goals.summary([p["best"] for p in per])})
        log(f"{variant or 'defaults'}: steps to target {rows[-1]['step_to_target']}, best {rows[-1]['best']}")
    folder = args.out or (os.path.join(CACHE, "quick") if args.quick else OUT)
    out = os.path.join(folder, "sweep_quick.json" if args.quick else "sweep.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit, "threads": args.threads, "jobs": args.jobs,
              "command": "python -m benchmarks.quality.v2.run " + " ".join(sys.argv[1:]), "pretrain": asdict(pre),
              "defaults": DEFAULTS, "max_steps": steps, "batch_size": 1, "rows": rows, "quick": args.quick,
              "total_seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(argparse.Namespace(threads=1, jobs=1, quick=True, out=None, sweep_characters=0)))
