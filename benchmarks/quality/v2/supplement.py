"""A second look at one method at a FIXED learning rate, against the main run's base and fine-tune.

    python -m benchmarks.quality.v2.supplement --method ti --lr 0.01 [--jobs 2]

The main run (:mod:`.run`) chooses each method's rate by short trials on the dev character; where the trials
cannot tell the rates apart (all tied), the lowest is taken. This trains the given method at the given rate on
each test character under the same budget, draws it along training (scales 0.5 and 1) and across the scales in
the positive mode exactly as the main run does, and judges it against the base similarity, adherence floor and
fine-tune gain recorded in ``results/quality_v2/latest.json`` (same model, classifier, seeds). Writes
``results/quality_v2/supplement_<method>_<lr>.json``. Nothing of the main record is changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import replace

import torch

from benchmarks.quality.scoring import ClassifierConfig, load_or_train_classifier
from benchmarks.quality.v2 import data, methods
from benchmarks.quality.v2 import scoring as goals
from benchmarks.quality.v2.model import ModelConfig, PretrainConfig, load_or_pretrain
from lib_anima.fileio import atomic_write_text

_STATE: dict = {}


def _one(character: data.Character) -> dict:
    from benchmarks.quality.v2.run import SCALES, curve

    st = _STATE
    torch.set_num_threads(1)
    drawer, one, main = st["drawer"], st["one"], st["main"][data.slug(character)]
    run = methods.TRAINERS[st["method"]](drawer.model, character, one, log=st["log"])
    cv = curve(drawer, character, run, drawer.evaluation.curve_seeds)
    pts = []
    for s in SCALES:
        sc, _ = drawer.point(character, st["method"], run.final.artefact, s, "positive", drawer.evaluation.seeds,
                             run.extra)
        pts.append({"scale": s, **sc})
    g = main["goals"]
    floor, ft_gain, base_sim = g["adherence_floor"], g["finetune_gain"], main["base"]["similarity"]
    best = goals.best_within(pts, floor)
    vals = goals.checkpoint_values(cv, floor)
    ok = [v["value"] for v in vals if v["value"] is not None]
    out = {"character": data.slug(character), "base_similarity": base_sim, "adherence_floor": floor,
           "finetune_gain": ft_gain, "steps": run.final.step, "seconds": round(run.final.seconds, 2),
           "positive": pts, "best_within_floor": best,
           "gain_fraction_of_finetune": round((best["similarity"] - base_sim) / ft_gain, 3) if best and ft_gain > 0
           else 0.0,
           "best_along_training": max(ok) if ok else None,
           "seconds_to_half_gain": goals.first_reaching(vals, g["half_gain_similarity"]),
           "main_run": {m: {k: g["methods"][m].get(k) for k in ("gain_fraction_of_finetune", "seconds_to_half_gain",
                                                               "best_along_training")} for m in ("ours", "ti")},
           "curve": cv}
    st["log"](f"{out['character']}: best within floor {best and round(best['similarity'], 3)}, "
              f"{out['gain_fraction_of_finetune']} of the FT gain, best along training {out['best_along_training']}, "
              f"to half {out['seconds_to_half_gain']} s")
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.quality.v2.run import OUT, Drawer, EvalConfig, _commit, _log, _map

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=sorted(methods.TRAINERS), required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--record", default=os.path.join(OUT, "latest.json"), help="the main run's record")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    commit = _commit()
    log = _log(start, f"{args.method} lr {args.lr:g}: ")
    record = json.load(open(args.record))
    if record.get("quick"):
        raise SystemExit("the record is a --quick one")
    cfg = record["config"]
    pre = PretrainConfig(**cfg["pretrain"])
    model, _ = load_or_pretrain(ModelConfig(**{**cfg["model"], "channel_mult": tuple(cfg["model"]["channel_mult"]),
                                               "attention_resolutions": tuple(cfg["model"]["attention_resolutions"])}),
                                pre, log)
    classifier, _ = load_or_train_classifier(ClassifierConfig(**cfg["classifier"]), log)
    drawer = Drawer(model, classifier, EvalConfig(**cfg["eval"]))
    one = replace(methods.OneShotConfig(**cfg["one_shot"]), **{f"lr_{args.method}": args.lr})
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    _STATE.update(drawer=drawer, one=one, method=args.method, log=log,
                  main={c["slug"]: c for c in record["characters"]})
    characters = [c for c in data.TEST_CHARACTERS if data.slug(c) in _STATE["main"]]
    rows = _map(_one, characters, args.jobs)
    summary = {k: goals.summary([r[k] for r in rows])
               for k in ("gain_fraction_of_finetune", "seconds_to_half_gain", "best_along_training")}
    log(f"median (range): {summary}")
    out = {"benchmark": "quality_v2_supplement", "method": args.method, "lr": args.lr,
           "main_record": {"created": record["created"], "commit": record["commit"],
                           "lr_chosen_by_trials": cfg["one_shot"][f"lr_{args.method}"]},
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "command": "python -m benchmarks.quality.v2.supplement " + " ".join(sys.argv[1:] if argv is None else argv),
           "characters": rows, "summary": summary, "total_seconds": round(time.perf_counter() - start, 1)}
    path = os.path.join(os.path.dirname(args.record), f"supplement_{args.method}_{args.lr:g}.json")
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
