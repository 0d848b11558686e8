"""Quality benchmark: does a reference context capture a character from one picture?

    python -m benchmarks.quality.run            # from the repository root, venv active

Pre-trains (once, cached) a small pixel-space text-to-image diffusion model on a synthetic world, holds out one
character, learns it from ONE picture with (a) the extension's reference context, (b) textual inversion and
(c) a full UNet fine-tune under the same training wall-clock budget, then draws it in new settings at scales
0 … 2 in both modes and scores reference similarity and prompt adherence with a classifier. Writes
``benchmarks/results/quality/latest.json``, ``latest.png`` (plot) and ``latest_grid.png``, and prints the goals.
See benchmarks/README.md for what this can and cannot say about real Stable Diffusion models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from benchmarks.quality import data, methods, plot
from benchmarks.quality.model import CACHE, REPO, ModelConfig, PretrainConfig, SampleSpec, ToyModel, load_or_pretrain
from benchmarks.quality.model import sample_batched as draw
from benchmarks.quality.scoring import Classifier, ClassifierConfig, load_or_train_classifier, score
from lib_anima.fileio import atomic_write_text
from lib_anima.inject import Activation

SCALES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
MODES = ("positive", "negative")
OUT = os.path.join(REPO, "benchmarks", "results", "quality")


@dataclass(frozen=True)
class EvalConfig:
    seeds: int = 4  # pictures per new setting in the scale sweep (9 settings)
    curve_seeds: int = 2  # per setting at each training checkpoint
    sampler_steps: int = 20
    guidance: float = 3.0


def _log(start: float) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)

    return log


# ---- drawing with each method --------------------------------------------------------------------------------------


@dataclass
class Generator:
    """Draws the held-out character in new settings with one method's artefact at a scale and mode."""

    model: ToyModel
    evaluation: EvalConfig

    def settings(self, seeds: int) -> tuple[list[tuple[str, str]], list[int]]:
        """Seed-major order: the first 9 pictures are seed 0 in every setting (the grid's row)."""
        base = data.new_settings()
        pairs = [s for _ in range(seeds) for s in base]
        return pairs, [1000 + i for i in range(len(pairs))]

    def _draw(self, cond: list, uncond: list, seeds: list[int], activations=(), model: ToyModel | None = None):
        spec = SampleSpec(cond, uncond, seeds)
        return draw(model or self.model, spec, activations=activations, steps=self.evaluation.sampler_steps,
                    guidance=self.evaluation.guidance)

    def images(self, method: str, artefact, scale: float, mode: str, seeds: int, extra: dict | None = None):
        pairs, seed_list = self.settings(seeds)
        prompts = [data.setting_words(b, o) for b, o in pairs]
        empty: list[list] = [[] for _ in pairs]
        if method == "base":
            return self._draw(prompts, empty, seed_list), pairs
        if method == "ours":  # the extension's own injection; scale 0 installs no hook at all (= base)
            act = Activation(artefact, scale=scale, mode=mode)
            return self._draw(prompts, empty, seed_list, [act]), pairs
        if method == "ti":  # the word's vectors × scale, like A1111's (word:scale) emphasis
            word = artefact * scale
            if mode == "positive":
                return self._draw([[word, *p] for p in prompts], empty, seed_list), pairs
            return self._draw(prompts, [[word] for _ in pairs], seed_list), pairs
        if method == "finetune":
            tuned = methods.interpolated(self.model, artefact, scale)
            word = (extra or {})["identifier"]
            return self._draw([[word, *p] for p in prompts], empty, seed_list, model=tuned), pairs
        raise ValueError(method)


def _score(classifier: Classifier, images: torch.Tensor, pairs) -> dict[str, float]:
    return score(classifier, images, data.HELD_OUT, pairs)


# ---- the benchmark ---------------------------------------------------------------------------------------------


def sanity(model: ToyModel, classifier: Classifier, evaluation: EvalConfig) -> dict:
    """How well the base model draws what its caption says (seen characters), and the held-out one from words."""
    scenes = data.training_scenes()[::23]  # 32 seen characters in all settings
    spec = SampleSpec([data.caption(s) for s in scenes], [[] for _ in scenes], [2000 + i for i in range(len(scenes))])
    images = draw(model, spec, steps=evaluation.sampler_steps, guidance=evaluation.guidance)
    logits = classifier(images)
    agree = {k: round(float(sum(int(logits[k][i].argmax()) == s.labels()[k] for i, s in enumerate(scenes)) / len(scenes)), 4)
             for k in data.ATTRIBUTES}
    pairs = data.new_settings()
    words = [data.character_words(data.Scene(*data.HELD_OUT, b, o)) + data.setting_words(b, o) for b, o in pairs]
    text_images = draw(model, SampleSpec(words, [[] for _ in pairs], [1000 + i for i in range(len(pairs))]),
                       steps=evaluation.sampler_steps, guidance=evaluation.guidance)
    return {"seen_full_caption_agreement": agree, "held_out_from_words": _score(classifier, text_images, pairs),
            "_text_images": text_images}


def time_curve(gen: Generator, classifier: Classifier, run: methods.Run, seeds: int) -> list[dict]:
    out = []
    for cp in run.checkpoints:
        images, pairs = gen.images(run.method, cp.artefact, 1.0, "positive", seeds, run.extra)
        s = _score(classifier, images, pairs)
        out.append({"step": cp.step, "seconds": round(cp.seconds, 2), "wall": round(cp.wall, 2), "similarity": s["similarity"],
                    "adherence": s["adherence"]})
    return out


LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # a factor ~3 apart: brackets both methods (0.1 was the best of 0.005-0.1)


def select_lr(method: str, model: ToyModel, gen: Generator, classifier: Classifier, one: methods.OneShotConfig,
              grid: tuple[float, ...], trial_budget: float, log: Callable[[str], None]) -> tuple[float, list[dict]]:
    """The learning rate each one-shot method gets: a short trial per rate, scored by the mean similarity over its
    checkpoints (spaced geometrically in steps, so a rate that gets there sooner scores higher)."""
    trainer = methods.TRAINERS[method]
    trials = []
    for lr in grid:
        run = trainer(model, replace(one, budget_s=trial_budget, **{f"lr_{method}": lr}), log)
        curve = time_curve(gen, classifier, run, seeds=1)
        sims = [p["similarity"] for p in curve]
        trials.append({"lr": lr, "mean_similarity": round(sum(sims) / len(sims), 4), "peak_similarity": max(sims),
                       "steps": run.final.step, "curve": curve})
        log(f"  {method} lr {lr:g}: mean similarity {trials[-1]['mean_similarity']:.3f}, peak {max(sims):.3f}")
    best = max(trials, key=lambda t: t["mean_similarity"])
    return best["lr"], trials


def first_reaching(curve: list[dict], target: float, floor: float | None = None) -> float | None:
    """Training time of the first checkpoint with similarity >= `target` (and adherence >= `floor` when given)."""
    for p in curve:
        if p["similarity"] >= target and (floor is None or p.get("adherence", 1.0) >= floor):
            return p["seconds"]
    return None


def _ratio(t_ti: float | None, t_ours: float | None) -> float | None:
    return round(t_ti / t_ours, 2) if t_ours and t_ti else None


def _time_to_same_similarity(time_curves: dict, floor: float | None) -> dict:
    """The highest similarity both ours and TI reach along training (at checkpoints within `floor`, if given),
    and the training time each needs for it."""
    def peak(curve: list[dict]) -> float | None:
        ok = [p["similarity"] for p in curve if floor is None or p.get("adherence", 1.0) >= floor]
        return max(ok) if ok else None

    peaks = {m: peak(c) for m, c in time_curves.items()}
    if peaks["ours"] is None or peaks["ti"] is None:
        return {"peaks": peaks, "target": None, "seconds": {"ours": None, "ti": None}, "ti_over_ours": None}
    target = min(peaks["ours"], peaks["ti"])
    seconds = {m: first_reaching(time_curves[m], target, floor) for m in ("ours", "ti")}
    return {"peaks": peaks, "target": round(target, 4), "seconds": seconds,
            "ti_over_ours": _ratio(seconds["ti"], seconds["ours"])}


def goals(base: dict, curves: dict, time_curves: dict, budget: float) -> dict:
    """The issue's goals, computed from the measurements (never assumed).

    * adherence floor: 90 % of the base model's adherence; a method's best point is its highest similarity at a
      positive scale > 0 that keeps adherence at or above the floor.
    * the fine-tune's gain: its highest similarity over all scales minus the base's (the upper bound).
    * equal time: the three runs end at the same training budget; ours beats TI when its best point within
      the floor is higher.
    * time to the same similarity (scale 1, positive, along training): the highest similarity both ours and TI
      reach at checkpoints that keep adherence within the floor, and the training time each needs for it (the
      goal); the same without the floor is reported beside it. Also for fixed fractions of the fine-tune's gain.
    """
    floor = 0.9 * base["adherence"]

    def best_within(method: str) -> dict | None:
        ok = [p for p in curves[method]["positive"] if p["adherence"] >= floor and p["scale"] > 0]
        return max(ok, key=lambda p: p["similarity"]) if ok else None

    ft_gain = max(p["similarity"] for p in curves["finetune"]["positive"]) - base["similarity"]
    ours_best, ti_best = best_within("ours"), best_within("ti")
    ours_gain = ours_best["similarity"] - base["similarity"] if ours_best else 0.0
    ti_gain = ti_best["similarity"] - base["similarity"] if ti_best else 0.0
    fraction = ours_gain / ft_gain if ft_gain > 0 else float("nan")

    within = _time_to_same_similarity(time_curves, floor)
    anyway = _time_to_same_similarity(time_curves, None)
    ladder = []
    for f in (0.25, 0.5, 0.75, 0.9):
        level = base["similarity"] + f * ft_gain
        times = {m: first_reaching(c, level, floor) for m, c in time_curves.items()}
        ladder.append({"fraction_of_finetune_gain": f, "similarity": round(level, 4), "seconds": times,
                       "ti_over_ours": _ratio(times["ti"], times["ours"])})
    return {
        "adherence_floor": round(floor, 4),
        "finetune_best_gain": round(ft_gain, 4),
        "ours_best_within_adherence": ours_best,
        "ti_best_within_adherence": ti_best,
        "ours_gain_fraction_of_finetune": round(fraction, 3),
        "ti_gain_fraction_of_finetune": round(ti_gain / ft_gain, 3) if ft_gain > 0 else None,
        "goal_half_of_finetune_gain": bool(fraction >= 0.5),
        "ours_beats_ti_at_equal_time": bool(ours_gain > ti_gain),
        "peak_similarity_along_training": within["peaks"],
        "final_similarity_along_training": {m: c[-1]["similarity"] for m, c in time_curves.items()},
        "same_similarity_target": within["target"],
        "seconds_to_target": within["seconds"],
        "time_ratio_ti_over_ours": within["ti_over_ours"],
        "goal_10x_faster_than_ti": bool(within["ti_over_ours"] and within["ti_over_ours"] >= 10),
        "ignoring_adherence": anyway,
        "seconds_to_fraction_of_finetune_gain": ladder,
        "budget_s": budget,
    }


def rescore(path: str, log: Callable[[str], None]) -> int:
    """Recompute the goals and the plot of a written record from its measured curves (no training, no drawing)."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    record["goals"] = goals(record["base"], record["curves"], record["time_curves"], record["goals"]["budget_s"])
    record["rescored"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    plot.plot(record, os.path.splitext(path)[0] + ".png")
    report(record, log)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine a second OpenMP thread that has to wait "
                        "for a busy core makes steps many times slower, and unevenly so between methods)")
    parser.add_argument("--clock", choices=sorted(methods.CLOCKS), default="cpu",
                        help="clock of the training budget: cpu = this process's CPU seconds (default; with one "
                        "thread equal to wall seconds on an idle core, and not inflated by other jobs), wall")
    parser.add_argument("--budget", type=float, default=methods.OneShotConfig.budget_s,
                        help="training budget per one-shot method, seconds on --clock")
    parser.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in LR_GRID),
                        help="learning rates tried for ours and TI before the main runs (comma-separated; empty: "
                        "use the configured lr_ours / lr_ti)")
    parser.add_argument("--trial-budget", type=float, default=20.0, help="training budget of each learning-rate trial")
    parser.add_argument("--rescore", metavar="JSON", help="only recompute the goals and plot of a written record")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (results are meaningless); writes quick.*")
    parser.add_argument("--out", default=None, help=f"output folder (default {os.path.relpath(OUT, REPO)}; "
                        "--quick: benchmarks/.cache/quality/quick)")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, _log(time.perf_counter()))
    if args.out is None:
        args.out = os.path.join(CACHE, "quick") if args.quick else OUT
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    log = _log(start)

    model_config = ModelConfig()
    pre, cls, one, evaluation = PretrainConfig(), ClassifierConfig(), methods.OneShotConfig(budget_s=args.budget, clock=args.clock), EvalConfig()
    if args.quick:
        pre, cls = PretrainConfig(steps=20), ClassifierConfig(steps=20, bank=256)
        one, evaluation = methods.OneShotConfig(budget_s=3.0, clock=args.clock), EvalConfig(seeds=1, curve_seeds=1, sampler_steps=4)
    model, pre_record = load_or_pretrain(model_config, pre, log)
    classifier, cls_record = load_or_train_classifier(cls, log)
    log(f"classifier accuracy (clean): {cls_record['accuracy_clean']}")
    gen = Generator(model, evaluation)

    checks = sanity(model, classifier, evaluation)
    text_images = checks.pop("_text_images")
    log(f"base model, seen characters with full captions, classifier agreement: {checks['seen_full_caption_agreement']}")

    base_images, pairs = gen.images("base", None, 0.0, "positive", evaluation.seeds)
    base = _score(classifier, base_images, pairs)
    log(f"base (setting prompt only): similarity {base['similarity']:.3f}, adherence {base['adherence']:.3f}")

    # The first optimizer built in a process imports torch._dynamo (seconds): do it before any clock runs.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    grid = tuple(float(x) for x in args.lr_grid.split(",") if x.strip())
    lr_trials: dict[str, list[dict]] = {}
    if grid:
        trial_budget = min(args.trial_budget, one.budget_s)
        for name in ("ours", "ti"):
            log(f"learning rate for {name}: trials of {trial_budget:g} s at {', '.join(f'{x:g}' for x in grid)}")
            lr, lr_trials[name] = select_lr(name, model, gen, classifier, one, grid, trial_budget, log)
            one = replace(one, **{f"lr_{name}": lr})
            log(f"  {name}: lr {lr:g}")
    runs = {}
    for name, trainer in methods.TRAINERS.items():
        log(f"training {name} (budget {one.budget_s:g} s)")
        runs[name] = trainer(model, one, log)

    log("similarity along training (scale 1, positive)")
    time_curves = {m: time_curve(gen, classifier, r, evaluation.curve_seeds) for m, r in runs.items()}

    log("scale sweep")
    curves: dict[str, dict[str, list[dict]]] = {}
    grid_rows = [("reference (one picture)", data.to_uint8(data.to_tensor(data.reference()[1]))),
                 ("base: setting words only", data.to_uint8(base_images[:9])),
                 ("base: character in words", data.to_uint8(text_images))]
    for name, run in runs.items():
        curves[name] = {}
        for mode in MODES if name != "finetune" else ("positive",):
            points = []
            for scale in SCALES:
                images, pairs = gen.images(name, run.final.artefact, scale, mode, evaluation.seeds, run.extra)
                s = _score(classifier, images, pairs)
                points.append({"scale": scale, **s})
                if scale in (0.5, 1.0, 2.0) and (mode == "positive" or scale == 1.0):
                    sign = "+" if mode == "positive" else "-"
                    grid_rows.append((f"{name} {sign}{scale:g}", data.to_uint8(images[:9])))
            curves[name][mode] = points
            log(f"  {name} {mode}: " + ", ".join(f"{p['scale']:g}: sim {p['similarity']:.3f} adh {p['adherence']:.3f}"
                                                   for p in points))

    result_goals = goals(base, curves, time_curves, one.budget_s)
    record = {
        "clock": one.clock,
        "benchmark": "quality",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.quality.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg())},
        "held_out": dict(zip(data.CHARACTER_KEYS, data.HELD_OUT, strict=True)),
        "reference_setting": methods.reference_setting(),
        "new_settings": data.new_settings(),
        "config": {"model": asdict(model_config), "pretrain": asdict(pre), "classifier": asdict(cls),
                   "one_shot": asdict(one), "eval": asdict(evaluation)},
        "pretrain": pre_record, "classifier": cls_record, "sanity": checks,
        "base": base, "curves": curves, "time_curves": time_curves,
        "runs": {m: {"steps": r.final.step, "seconds": round(r.final.seconds, 2), "wall": round(r.final.wall, 2),
                     "loss_last_10": round(r.extra["loss_last_10"], 5)} for m, r in runs.items()},
        "lr_trials": lr_trials,
        "goals": result_goals,
        "total_seconds": round(time.perf_counter() - start, 1),
        "quick": args.quick,
    }
    stem = "quick" if args.quick else "latest"
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, f"{stem}.json"), json.dumps(record, indent=1, default=_plain) + "\n")
    plot.plot(record, os.path.join(args.out, f"{stem}.png"))
    plot.grid(grid_rows, os.path.join(args.out, f"{stem}_grid.png"),
              columns=[f"{b}+{o}" for b, o in data.new_settings()])
    report(record, log)
    log(f"wrote {os.path.relpath(os.path.join(args.out, stem), REPO)}.json / .png / _grid.png")
    return 0


def _plain(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def report(record: dict, log: Callable[[str], None]) -> None:
    g, base = record["goals"], record["base"]
    one = record["config"]["one_shot"]
    log(f"learning rates: ours {one['lr_ours']:g}, TI {one['lr_ti']:g}"
        + (" (chosen by trials)" if record["lr_trials"] else " (configured)") + f", fine-tune {one['lr_finetune']:g}")
    ob, tb = g["ours_best_within_adherence"], g["ti_best_within_adherence"]
    log(f"base: similarity {base['similarity']:.3f}, adherence {base['adherence']:.3f} (floor {g['adherence_floor']:.3f})")
    log(f"fine-tune best similarity gain: {g['finetune_best_gain']:+.3f}")
    if ob:
        log(f"ours best within the adherence floor: scale {ob['scale']:g}, similarity {ob['similarity']:.3f}, "
            f"adherence {ob['adherence']:.3f} -> {g['ours_gain_fraction_of_finetune']:.2f} of the fine-tune's gain "
            f"(goal >= 0.5: {'met' if g['goal_half_of_finetune_gain'] else 'NOT met'})")
    else:
        log("ours: no scale keeps adherence within 10 % of base (goal NOT met)")
    log(f"textual inversion best within the floor: {tb and round(tb['similarity'], 3)}; ours beats TI at equal time: "
        f"{'yes' if g['ours_beats_ti_at_equal_time'] else 'NO'}")
    log(f"time to the highest similarity both reach within the floor, {g['same_similarity_target']}: ours "
        f"{g['seconds_to_target']['ours']} s, TI {g['seconds_to_target']['ti']} s -> TI/ours {g['time_ratio_ti_over_ours']} "
        f"(goal >= 10: {'met' if g['goal_10x_faster_than_ti'] else 'NOT met'})")
    a = g["ignoring_adherence"]
    log(f"  the same ignoring adherence, {a['target']}: ours {a['seconds']['ours']} s, TI {a['seconds']['ti']} s "
        f"-> TI/ours {a['ti_over_ours']}")
    for row in g["seconds_to_fraction_of_finetune_gain"]:
        t = row["seconds"]
        log(f"time to {row['fraction_of_finetune_gain']:.0%} of the fine-tune's gain (similarity {row['similarity']:.3f}): "
            f"ours {t['ours']} s, TI {t['ti']} s, fine-tune {t['finetune']} s -> TI/ours {row['ti_over_ours']} "
            f"(None: not reached within {g['budget_s']:g} s with adherence within the floor)")


if __name__ == "__main__":
    raise SystemExit(main())
