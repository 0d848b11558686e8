"""The v2 quality benchmark's world, text encoder and goals arithmetic are deterministic and mean what they say
(no training, no model download; < 2 s)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from benchmarks.quality import data as v1
from benchmarks.quality.v2 import data
from benchmarks.quality.v2 import scoring as goals
from benchmarks.quality.v2.methods import OneShotConfig, _checkpoints
from benchmarks.quality.v2.model import Emphasis, ModelConfig, TextEncoder

MASK_SHA16 = "a076d890e2ff59b0"  # the masked character's loss mask (a change must be deliberate)


def test_no_word_names_a_held_out_character():
    assert len(data.TEST_CHARACTERS) >= 5 and data.DEV_CHARACTER not in data.TEST_CHARACTERS
    assert len(set(data.HELD_OUT)) == len(data.HELD_OUT)
    for c in data.HELD_OUT:
        assert c not in data.NAMES and c not in data.NAMED
    # the language has no attribute words at all: a character is reachable by its name or not at all
    attribute_words = set(v1.SHAPES) | set(v1.COLOURS) | set(v1.TEXTURES)
    assert not attribute_words & set(data.VOCAB)
    assert set(data.NAMES.values()) <= set(data.VOCAB) and len(set(data.NAMES.values())) == len(data.NAMED)
    # every training scene shows a named character, so no caption ever describes a held-out one
    training = data.training_scenes()
    assert all(s.character in data.NAMES for s in training)
    assert len(training) == len(data.NAMED) * len(v1.BACKGROUNDS) * len(v1.OBJECTS)


def test_every_attribute_of_a_held_out_character_is_seen_elsewhere():
    for c in data.HELD_OUT:
        for i in range(3):
            assert any(n[i] == c[i] for n in data.NAMED)
        # and each pair of its attributes too (so the combination, not a part of it, is what is new)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert any(n[i] == c[i] and n[j] == c[j] for n in data.NAMED), (c, i, j)


def test_captions_and_dropout_are_deterministic():
    s = data.training_scenes()[5]
    assert data.caption(s) == [data.NAMES[s.character], "on", s.background, "with", s.object]
    a = [data.dropped_caption(s, data.caption_rng(0, 1)) for _ in range(3)]
    b = [data.dropped_caption(s, data.caption_rng(0, 1)) for _ in range(3)]
    assert a == b
    rng = data.caption_rng(3)
    many = [data.dropped_caption(s, rng) for _ in range(1000)]
    assert 0.05 < sum(not w for w in many) / 1000 < 0.15  # unconditional
    assert 0.2 < sum(bool(w) and w[0] != data.NAMES[s.character] for w in many) / 1000 < 0.45  # setting only
    assert max(len(w) for w in many) == 5 and 1 + 8 + 4 < data.SEQ_LEN  # <bos> + 8 learned vectors + setting fit


def test_reference_and_mask():
    for c in data.HELD_OUT:
        s, image = data.reference(c)
        assert s.character == c and s.background == data.REFERENCE_BACKGROUND and s.object == "nothing"
        assert np.array_equal(image, v1.render(s, 0))
    mask = data.character_mask(data.MASKED_CHARACTER)
    assert mask.shape == (1, 16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert 16 <= int(mask.sum()) <= 128  # the character covers part of the picture
    assert hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16] == MASK_SHA16


def test_bank_is_deterministic():
    a, b = data.picture_bank(8, 3), data.picture_bank(8, 3)
    assert torch.equal(a.images, b.images) and a.scenes == b.scenes
    assert all(s.character in data.NAMES for s in a.scenes)


def test_text_encoder_inversion_goes_through_it_and_emphasis_is_the_hosts():
    torch.manual_seed(0)
    enc = TextEncoder(ModelConfig()).eval()
    setting = data.reference_setting()
    v = torch.randn(4, 64)
    with torch.no_grad():
        z0 = enc([[v, *setting]])
        z1 = enc([[v + 1.0, *setting]])
        plain = enc([[Emphasis(v, 1.0), *setting]])
        weighted = enc([[Emphasis(v, 1.5), *setting]])
    assert z0.shape == (1, data.SEQ_LEN, 64)
    assert torch.equal(z0[:, 0], z1[:, 0])  # <bos> is before the word (causal)
    assert not torch.allclose(z0[:, 5:], z1[:, 5:])  # the setting words' states depend on the learned word
    assert torch.allclose(plain, z0, atol=1e-6)
    assert float(weighted.mean()) == pytest.approx(float(z0.mean()), abs=1e-5)  # the host restores the mean
    assert not torch.allclose(weighted, z0)
    with pytest.raises(ValueError, match="pad"):
        enc([[torch.randn(10, 64), *setting]])


# ---- goals ---------------------------------------------------------------------------------------------------------


def sweep(points):
    return [{"scale": s, "similarity": sim, "adherence": adh} for s, sim, adh in points]


def cv(points):
    return [{"step": i + 1, "seconds": t, "scales": sweep(ps)} for i, (t, ps) in enumerate(points)]


def test_character_goals():
    base = {"similarity": 0.3, "adherence": 1.0}
    sweeps = {
        "ours": {"positive": sweep([(0, 0.3, 1), (0.5, 0.7, 0.95), (1, 0.9, 0.5)])},
        "ti": {"positive": sweep([(0, 0.3, 1), (1, 0.45, 0.92)])},
        "finetune": {"positive": sweep([(0, 0.3, 1), (1, 0.9, 0.3)])},
    }
    curves = {
        "ours": cv([(1.0, [(0.5, 0.4, 1), (1, 0.5, 0.95)]), (2.0, [(0.5, 0.65, 0.95), (1, 0.9, 0.5)])]),
        "ti": cv([(1.0, [(0.5, 0.3, 1), (1, 0.35, 1)]), (30.0, [(0.5, 0.4, 1), (1, 0.62, 0.8)])]),
        "finetune": cv([(1.0, [(1, 0.9, 0.3)])]),
    }
    g = goals.character_goals(base, sweeps, curves)
    assert g["adherence_floor"] == 0.9 and g["finetune_gain"] == pytest.approx(0.6)
    assert g["half_gain_similarity"] == pytest.approx(0.6)
    ours, ti = g["methods"]["ours"], g["methods"]["ti"]
    assert ours["best_within_floor"]["scale"] == 0.5 and ours["gain_fraction_of_finetune"] == pytest.approx(0.667)
    assert ti["gain_fraction_of_finetune"] == pytest.approx(0.25)
    assert ours["seconds_to_half_gain"] == 2.0  # 0.65 at scale 0.5 (scale 1's 0.9 breaks the floor)
    assert ti["seconds_to_half_gain"] is None  # 0.62 only below the floor
    assert g["goal_half_gain"] and g["goal_10x"]  # TI never gets there within the budget
    assert g["ti_best_along_training"] == 0.4
    assert ours["seconds_to_ti_best"] == 1.0 and ti["seconds_to_ti_best"] == 30.0
    assert g["ti_over_ours_ti_best"] == 30.0


def test_character_goals_fail_when_the_numbers_do():
    base = {"similarity": 0.3, "adherence": 1.0}
    sweeps = {m: {"positive": sweep([(0, 0.3, 1), (1, 0.5, 0.95)])} for m in ("ours", "ti")}
    sweeps["finetune"] = {"positive": sweep([(1, 0.9, 0.5)])}
    curves = {"ours": cv([(5.0, [(1, 0.61, 0.95)])]), "ti": cv([(20.0, [(1, 0.6, 0.95)])])}
    g = goals.character_goals(base, sweeps, curves)
    assert g["methods"]["ours"]["gain_fraction_of_finetune"] == pytest.approx(0.333) and not g["goal_half_gain"]
    assert g["ti_over_ours_half_gain"] == 4.0 and not g["goal_10x"]  # both get there, TI only 4x slower


def test_summary_and_checkpoints():
    assert goals.summary([1.0, None, 3.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "missing": 1}
    assert goals.summary([None]) == {"median": None, "min": None, "max": None, "missing": 1}
    assert _checkpoints(OneShotConfig(first_checkpoint=5, checkpoint_growth=2.0))[:4] == [5, 10, 20, 40]
    assert _checkpoints(OneShotConfig(first_checkpoint=10, checkpoint_growth=2.0, max_steps=50)) == [10, 20, 40, 50]


def test_learning_rate_trials_judge_as_along_training():
    from benchmarks.quality.v2.run import choose_lr, trial_value

    floor, base = 0.9, 0.3
    c = cv([(1.0, [(0.5, 0.5, 0.95), (1, 0.8, 0.5)]), (2.0, [(0.5, 0.6, 0.5), (1, 0.9, 0.4)])])
    # ours / TI: scale 0.5 counts at the first checkpoint, the second has none within the floor (-> the base's)
    assert trial_value("ours", c, floor, base) == pytest.approx((0.5 + 0.3) / 2)
    assert trial_value("finetune", c, floor, base) == 0.9  # the upper bound: no floor
    pick = choose_lr([{"lr": 0.1, "value": 0.3}, {"lr": 0.01, "value": 0.3}, {"lr": 0.03, "value": 0.2}])
    assert pick == {"lr": 0.01, "value": 0.3, "tied": [0.01, 0.1], "at_grid_edge": True}
    assert choose_lr([{"lr": 0.1, "value": 0.3}, {"lr": 0.01, "value": 0.2}, {"lr": 1.0, "value": 0.1}]) == {
        "lr": 0.1, "value": 0.3, "tied": [], "at_grid_edge": False}


def test_pretrain_stages_keep_earlier_cache_keys():
    from dataclasses import replace

    from benchmarks.quality.v2.model import PretrainConfig, cache_path

    two = replace(PretrainConfig(), stage3_steps=0)
    # the two-stage model's key is the one it had before a third stage existed (its cache stays valid)
    assert cache_path(ModelConfig(), two).endswith("base-a9a68ffec44983e0.pt")
    assert cache_path(ModelConfig(), PretrainConfig()) != cache_path(ModelConfig(), two)
