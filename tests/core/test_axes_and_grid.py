"""The X/Y/Z axes' effect on the panel's arguments, their value checks, and the sweep's labelled grid (host-free)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_anima.errors import ArgumentError
from lib_anima.grid import labelled_row
from lib_anima.units import check_axis_value, units_with_axes

# the panel's positional args as the host passes them with the panel closed and unit 1 filled in
PANEL_OFF = [False, "fox", 0.8, "negative", 0.0, 1.0, "", "None", 1.0, "positive", 0.0, 1.0, ""]


def test_axes_set_the_first_unit_of_an_enabled_panel():
    args = [True, "fox", 1.0, "positive", 0.0, 1.0, "", "cat", 0.5, "positive", 0.0, 1.0, ""]
    units = units_with_axes(args, {"scale": 0.25, "mode": "negative", "weights": "fine"})
    assert [(u.name, u.scale, u.mode, u.weights) for u in units] == [("fox", 0.25, "negative", "fine"),
                                                                      ("cat", 0.5, "positive", "")]


def test_a_context_axis_enables_the_panel_with_the_units_other_values():
    assert units_with_axes(PANEL_OFF, {}) == []
    assert units_with_axes(PANEL_OFF, {"scale": 2.0}) == [], "without a named context the axes change nothing"
    (unit,) = units_with_axes(PANEL_OFF, {"name": "wolf"})
    assert (unit.name, unit.scale, unit.mode) == ("wolf", 0.8, "negative")
    assert units_with_axes(PANEL_OFF, {"name": "None"}) == []


def test_none_turns_off_only_the_first_unit():
    args = [True, "fox", 1.0, "positive", 0.0, 1.0, "", "cat", 0.5, "positive", 0.0, 1.0, ""]
    assert [u.name for u in units_with_axes(args, {"name": "None"})] == ["cat"]


def test_axes_on_named_args():
    args = [{"units": [{"name": "fox", "scale": 0.5}, {"name": "cat"}]}]
    units = units_with_axes(args, {"scale": 1.5, "start": 0.2})
    assert [(u.name, u.scale, u.start) for u in units] == [("fox", 1.5, 0.2), ("cat", 1.0, 0.0)]
    assert [u.name for u in units_with_axes(args, {"name": "None"})] == ["cat"]
    assert [(u.name, u.end) for u in units_with_axes([{"units": []}], {"name": "wolf", "end": 0.5})] == [("wolf", 0.5)]


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("scale", "0.5", 0.5), ("mode", "Negative", "negative"), ("start", 0.3, 0.3), ("end", 0.7, 0.7),
    ("weights", "fine", "fine"), ("weights", "1,0,1", "1,0,1"), ("name", "None", "None"), ("name", " fox ", "fox"),
])
def test_axis_values_accepted(field, value, expected):
    assert check_axis_value(field, value) == expected


@pytest.mark.parametrize(("field", "value"), [
    ("scale", 5), ("scale", -0.1), ("scale", "abc"), ("scale", float("nan")), ("mode", "sideways"),
    ("start", 1.0), ("start", -0.5), ("end", 0.0), ("end", 1.5), ("weights", "bogus"), ("weights", "1,x"),
    ("name", "../x"), ("name", "a/b"),
])
def test_axis_values_refused(field, value):
    with pytest.raises(ArgumentError):
        check_axis_value(field, value)


def test_labelled_row_keeps_cells_at_the_bottom_with_a_label_over_each():
    cells = [Image.new("RGB", (64, 48), (40 * i, 200, 100)) for i in range(5)]
    labels = ["scale 0", "scale 0.5", "scale 1", "scale 1.5", "scale 1 negative"]
    grid = np.asarray(labelled_row(cells, labels))
    band = grid.shape[0] - 48
    assert grid.shape[1] == 5 * 64 and band > 0
    for i, cell in enumerate(cells):
        assert np.array_equal(grid[band:, i * 64:(i + 1) * 64], np.asarray(cell)), f"cell {i} moved or changed"
        assert (grid[:band, i * 64:(i + 1) * 64] < 128).any(), f"no label drawn over cell {i}"
    with pytest.raises(ValueError):
        labelled_row(cells, labels[:4])
    with pytest.raises(ValueError):
        labelled_row([*cells[:4], Image.new("RGB", (32, 32))], labels)
