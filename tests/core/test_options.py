"""The training options model (lib_anima/options.py): one set of types, bounds and defaults for the API, the tab
and the run. Pydantic 1 here (the A1111 venv); the Forge phase runs the same model on pydantic 2 over HTTP."""

from __future__ import annotations

import pytest

from lib_anima.errors import ArgumentError
from lib_anima.options import LIMITS, PYDANTIC_2, TrainOptions, default_of, dump, field_names, parse
from lib_anima.train import TrainConfig


def _schema() -> dict:
    return (TrainOptions.model_json_schema() if PYDANTIC_2 else TrainOptions.schema())["properties"]


def test_defaults_are_the_trainers():
    options = parse(TrainOptions, {"name": "fox"})
    assert (options.steps, options.n_tokens, options.batch_size, options.grad_accumulation) == (
        TrainConfig.steps, TrainConfig.n_tokens, TrainConfig.batch_size, TrainConfig.grad_accumulation)
    assert float(options.learning_rate) == TrainConfig.lr
    assert dump(options)["name"] == "fox" and default_of("sweep") is True


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_every_bound_is_in_the_schema_and_enforced(name):
    low, high = LIMITS[name]
    prop = _schema()[name]
    assert (prop["minimum"], prop["maximum"], prop["type"]) == (low, high, "integer")
    assert prop["description"] or name == "preview_negative_prompt"
    for value in (low, high if name != "resolution" else 4096):
        assert getattr(parse(TrainOptions, {"name": "n", name: value}), name) == value
    for value in (low - 1, high + 1):
        with pytest.raises(ArgumentError, match=name):
            parse(TrainOptions, {"name": "n", name: value})


@pytest.mark.parametrize("bad", [{"steps": "300"}, {"steps": True}, {"steps": 3.5}, {"flip": "yes"}, {"flip": 1},
                                 {"resolution": 100}, {"stepz": 10}, {"learning_rate": True}, {"prompt": 5},
                                 {"weights": None}, {}])
def test_wrong_types_unknown_fields_and_a_missing_name_are_refused_by_name(bad):
    values = {"name": "n", **bad} if bad else {}
    with pytest.raises(ArgumentError) as raised:
        parse(TrainOptions, values)
    field = next(iter(bad), "name")
    assert f"{field}:" in str(raised.value), str(raised.value)


def test_a_rate_may_be_a_number_or_a_schedule():
    assert float(parse(TrainOptions, {"name": "n", "learning_rate": 0.01}).learning_rate) == 0.01  # v1 keeps "0.01"
    assert parse(TrainOptions, {"name": "n", "learning_rate": "0.01:10, 1e-3"}).learning_rate == "0.01:10, 1e-3"


def test_images_or_a_dataset_and_one_mask_per_image():
    options = parse(TrainOptions, {"name": "n"})
    with pytest.raises(ArgumentError, match="exactly one"):
        options.check_inputs(0, 0)
    options.check_inputs(2, 0)
    options.check_inputs(2, 2)
    with pytest.raises(ArgumentError, match="1 masks for 2 images"):
        options.check_inputs(2, 1)
    with pytest.raises(ArgumentError, match="exactly one"):
        parse(TrainOptions, {"name": "n", "dataset_dir": "/data"}).check_inputs(1, 0)


def test_the_tab_and_the_api_share_the_fields():
    """The tab's form (ui_train.FORM_FIELDS) is every option but the API-only preview/log extras, plus image/mask:
    checked from the source text, because ui_train imports Gradio and the host."""
    import ast
    import pathlib

    source = pathlib.Path(__file__).parents[2] / "lib_anima" / "webui" / "ui_train.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    form = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FORM_FIELDS")
    options = set(field_names())
    assert set(form) - {"image", "mask"} <= options
    assert options - set(form) == {"preview_negative_prompt", "preview_steps", "preview_seed"}
