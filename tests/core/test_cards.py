"""What an Extra Networks card and its ✎ editor show of a context's file: every value is HTML text."""

from __future__ import annotations

import pytest

from lib_anima import cards
from lib_anima.errors import ArgumentError

PAYLOADS = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "a <lora:x:1> fox & \"friends\""]


def test_metadata_table_rows_are_escaped():
    training = {"prompt": PAYLOADS[0], "base_model": PAYLOADS[1], "steps": 12, "learning_rate": "5e-3",
                "created": {"when": "<b>now</b>"}, "unlisted": "<i>not shown</i>"}
    rows = cards.table_rows([("Filename: ", "it's & <x>.safetensors"), ("Hash: ", None),
                             *cards.context_rows("sd1", 16, 4, 768, training)])
    html = "".join(f"<td>{value}</td>" for _, value in rows)
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    values = dict(rows)
    assert values["Training prompt: "] == "&lt;img src=x onerror=alert(1)&gt;"
    assert values["Training base model: "] == "&lt;script&gt;alert(2)&lt;/script&gt;"
    assert values["Training steps: "] == "12" and values["Sites × tokens × dim: "] == "16 × 4 × 768"
    assert values["Filename: "] == "it&#x27;s &amp; &lt;x&gt;.safetensors"
    assert "Hash: " not in values and "Training unlisted: " not in values


def test_an_ordinary_prompt_shows_as_written():
    (row,) = cards.table_rows([("Training prompt: ", PAYLOADS[2])])
    assert row[1] == "a &lt;lora:x:1&gt; fox &amp; &quot;friends&quot;"  # the browser shows <lora:x:1>


def test_description_fallback_escaped_only_when_the_host_treats_descriptions_as_html():
    training = {"prompt": PAYLOADS[0]}
    assert cards.fallback_description(training, description_is_html=False) == PAYLOADS[0]  # the host escapes it
    assert cards.fallback_description(training, description_is_html=True) == "&lt;img src=x onerror=alert(1)&gt;"
    assert cards.fallback_description({"prompt": 5}, description_is_html=False) == "5"
    assert cards.search_terms(["sd1", "", None, PAYLOADS[1]]) == ["sd1", "&lt;script&gt;alert(2)&lt;/script&gt;"]


def test_user_metadata_values_are_checked_with_the_file_named():
    assert cards.user_scale({"preferred weight": 0.7}, 1.0, "x.json") == 0.7
    assert cards.user_scale({"preferred weight": 0}, 1.5, "x.json") == 1.5  # the host's "not set"
    assert cards.user_mode({}, "negative", "x.json") == "negative"
    with pytest.raises(ArgumentError, match=r"'preferred weight' in x.json must be a number"):
        cards.user_scale({"preferred weight": "abc"}, 1.0, "x.json")
    with pytest.raises(ArgumentError, match=r"'mode' in x.json must be one of"):
        cards.user_mode({"mode": "<b>"}, "positive", "x.json")
