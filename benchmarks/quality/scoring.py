"""Scores: how much a picture shows the reference character, and how much it shows what the prompt asked for.

A small CNN classifier, trained on the synthetic pictures (all scenes: it is the measuring instrument, not a
generator, so it may know the held-out character), predicts each attribute. From its probabilities:

* **similarity** = the mean over pictures of the mean probability of the reference's shape, colour and texture
  (1: every picture is unmistakably the character; chance ≈ 1/4, 1/4, 1/3).
* **match** = the share of pictures whose predicted shape, colour and texture all equal the reference's.
* **adherence** = the mean over pictures of the mean probability of the *prompted* background and object.

The classifier is trained with noise, blur and colour jitter so that the slightly soft, noisy pictures of a
small diffusion model are judged by what they show, and it is cached beside the base model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.quality import data
from benchmarks.quality.model import CACHE, REPO, cache_key, data_fingerprint


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 1500
    batch_size: int = 64
    bank: int = 6000  # pictures rendered once and re-augmented every step
    lr: float = 2e-3
    seed: int = 1
    version: int = 2


class Classifier(torch.nn.Module):
    """Four conv layers to 4×4, then one head per attribute (position matters: the object is in a corner)."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 32, 64, 64, 96]
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(chans, chans[1:], strict=False)):
            layers += [torch.nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), torch.nn.GroupNorm(8, b),
                       torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(96 * 16, 128),
                                            torch.nn.SiLU())
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(128, len(v)) for k, v in data.ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, a little blur and colour jitter, each of random strength per picture (images in [-1, 1])."""
    n = images.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    amount = torch.rand(n, 1, 1, 1, generator=gen)
    out = images + amount * (blurred - images)
    out = out * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)) + 0.1 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    # grain up to std 0.25: the toy model's pictures keep some of their initial noise
    out = out + torch.randn(out.shape, generator=gen) * 0.25 * torch.rand(n, 1, 1, 1, generator=gen)
    return out.clamp(-1, 1)


def train_classifier(config: ClassifierConfig, log: Callable[[str], None] = print) -> tuple[Classifier, dict]:
    torch.manual_seed(config.seed)
    scenes = data.all_scenes()
    bank = data.sample_batch(scenes, config.bank, config.seed, 0, dropout=False)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * (1 - step / config.steps)
        idx = torch.randint(0, config.bank, (config.batch_size,), generator=gen)
        logits = model(augment(bank.images[idx], gen))
        loss = sum(F.cross_entropy(logits[k], bank.labels[k][idx]) for k in data.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            log(f"  classifier step {step + 1}/{config.steps}: loss {float(loss.detach()):.3f}")
    model.eval().requires_grad_(False)
    held = data.sample_batch(scenes, 1000, config.seed + 1000, 0, dropout=False)
    gen_eval = torch.Generator().manual_seed(7)
    record = {
        "accuracy_clean": accuracy(model, held.images, held.labels),
        "accuracy_augmented": accuracy(model, augment(held.images, gen_eval), held.labels),
    }
    return model, record


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    logits = model(images)
    return {k: round(float((logits[k].argmax(1) == labels[k]).float().mean()), 4) for k in data.ATTRIBUTES}


def load_or_train_classifier(config: ClassifierConfig, log: Callable[[str], None] = print) -> tuple[Classifier, dict]:
    import json

    path = os.path.join(CACHE, f"classifier-{cache_key(config, data_fingerprint())}.pt")
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = Classifier()
        model.load_state_dict(saved["state"])
        log(f"classifier from cache {os.path.relpath(path, REPO)}")
        return model.eval().requires_grad_(False), dict(json.loads(saved["record"]), cached=True)
    log("training the attribute classifier; cached afterwards")
    model, record = train_classifier(config, log)
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"state": model.state_dict(), "record": json.dumps(record)}, tmp)
    os.replace(tmp, path)
    return model, dict(record, cached=False)


# ---- the scores --------------------------------------------------------------------------------------------------


@torch.no_grad()
def probabilities(model: Classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.softmax(1) for k, v in model(images).items()}


def _target_probability(probs: dict[str, torch.Tensor], key: str, values: Sequence[str]) -> torch.Tensor:
    index = torch.tensor([data.ATTRIBUTES[key].index(v) for v in values])
    return probs[key].gather(1, index[:, None]).squeeze(1)


def similarity(probs: dict[str, torch.Tensor], character: tuple[str, str, str]) -> float:
    """Mean probability of the character's shape, colour and texture, averaged over pictures."""
    n = probs["shape"].shape[0]
    parts = [_target_probability(probs, key, [value] * n) for key, value in zip(data.CHARACTER_KEYS, character, strict=True)]
    return float(torch.stack(parts).mean())


def match_rate(probs: dict[str, torch.Tensor], character: tuple[str, str, str]) -> float:
    """Share of pictures whose most likely shape, colour and texture are all the character's."""
    ok = torch.ones(probs["shape"].shape[0], dtype=torch.bool)
    for key, value in zip(data.CHARACTER_KEYS, character, strict=True):
        ok &= probs[key].argmax(1) == data.ATTRIBUTES[key].index(value)
    return float(ok.float().mean())


def adherence(probs: dict[str, torch.Tensor], settings: Sequence[tuple[str, str]]) -> float:
    """Mean probability of each picture's prompted background and object."""
    bg = _target_probability(probs, "background", [s[0] for s in settings])
    obj = _target_probability(probs, "object", [s[1] for s in settings])
    return float(((bg + obj) / 2).mean())


def attribute_agreement(probs: dict[str, torch.Tensor], key: str, value: str) -> float:
    """Share of pictures whose most likely `key` is `value` (for the per-attribute breakdown)."""
    return float((probs[key].argmax(1) == data.ATTRIBUTES[key].index(value)).float().mean())


def score(model: Classifier, images: torch.Tensor, character: tuple[str, str, str],
          settings: Sequence[tuple[str, str]]) -> dict[str, float]:
    probs = probabilities(model, images)
    out = {
        "similarity": similarity(probs, character),
        "match": match_rate(probs, character),
        "adherence": adherence(probs, settings),
    }
    for key, value in zip(data.CHARACTER_KEYS, character, strict=True):
        out[f"{key}_agree"] = attribute_agreement(probs, key, value)
    out["background_agree"] = float(np.mean([
        float(probs["background"][i].argmax() == data.BACKGROUNDS.index(s[0])) for i, s in enumerate(settings)
    ]))
    out["object_agree"] = float(np.mean([
        float(probs["object"][i].argmax() == data.OBJECTS.index(s[1])) for i, s in enumerate(settings)
    ]))
    return {k: round(v, 4) for k, v in out.items()}
