"""The host's X/Y/Z plot with the Anima axes, over HTTP (``script_name: "x/y/z plot"``)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration import webui_client as client

AXES = ("Anima context", "Anima scale", "Anima mode", "Anima start", "Anima end", "Anima sites")
PLAIN = {"prompt": "a photo of a dog", "steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler a",
         "cfg_scale": 7}


def _axis_types(img2img: bool = False) -> list[str]:
    """The plot's type list (X type's choices): script_args name an axis by its index in it."""
    r = client.get("/sdapi/v1/script-info")
    assert r.status_code == 200, r.text
    (plot,) = [s for s in r.json() if s["name"] == "x/y/z plot" and s["is_img2img"] == img2img]
    return plot["args"][0]["choices"]


def _axis(types: list[str], label: str, values: str | list[str]) -> list:
    """[type index, text values, dropdown values] for one axis (dropdown axes take a list)."""
    index = types.index(label) if label else 0
    return [index, values, []] if isinstance(values, str) else [index, "", values]


def _plot_args(x: list, y: list, z: list | None = None, csv_mode: bool = False) -> list:
    # the plot's ui() order: 3 axes, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
    # vary_seeds_x/y/z, margin_size, csv_mode; no legend: cells sit at plain multiples of the image size
    return [*x, *y, *(z or [0, "", []]), False, True, False, False, False, False, False, 0, csv_mode]


def _plot(x: list, y: list, z: list | None = None, anima_args: list | None = None, **kw) -> client.Result:
    body = {**PLAIN, "script_name": "x/y/z plot", "script_args": _plot_args(x, y, z, **kw)}
    return client.txt2img(anima_args=anima_args, **body)


def _cells(result: client.Result, nx: int, ny: int, nz: int = 1) -> list[np.ndarray]:
    """The cells cut out of the grid (images[0]), checked against the lone images that follow it."""
    assert len(result.png_b64) == 1 + nx * ny * nz, "the grid first, then one image per cell"
    grid = result.pixels(0)
    cells = []
    for iz in range(nz):
        for iy in range(ny):
            for ix in range(nx):
                cell = grid[iy * 64:(iy + 1) * 64, (iz * nx + ix) * 64:(iz * nx + ix + 1) * 64]
                lone = result.pixels(1 + len(cells))
                assert np.array_equal(cell, lone), f"grid cell {len(cells)} differs from its lone image"
                cells.append(cell)
    assert grid.shape[:2] == (ny * 64, nz * nx * 64)
    return cells


def test_axes_are_in_the_plot_type_list(webui):
    for img2img in (False, True):
        types = _axis_types(img2img)
        assert all(label in types for label in AXES), types[-12:]


def test_scale_and_mode_axes(webui, ctx):
    types = _axis_types()
    plain = client.txt2img(**PLAIN).pixels()
    result = _plot(_axis(types, "Anima scale", "0, 0.5, 1"), _axis(types, "Anima mode", ["positive", "negative"]),
                   anima_args=[True, ctx["name"], 1.0, "positive", 0.0, 1.0, ""])
    cells = _cells(result, 3, 2)
    infotexts = result.info["infotexts"]
    for row, mode in enumerate(("positive", "negative")):
        zero, half, full = cells[row * 3:row * 3 + 3]
        assert np.array_equal(zero, plain), f"{mode}: the scale-0 cell must be the plain image, byte for byte"
        d_half, d_full = client.mean_diff(half, plain), client.mean_diff(full, plain)
        assert 0 < d_half < d_full, f"{mode}: the change must grow with the scale ({d_half:.2f}, {d_full:.2f})"
        assert "Anima 1:" not in infotexts[1 + row * 3], "a scale-0 cell applies (and records) no context"
        assert f"scale: 0.5, mode: {mode}" in infotexts[2 + row * 3]
        assert f"scale: 1, mode: {mode}" in infotexts[3 + row * 3]
    assert "X Type: Anima scale" in infotexts[0] and "Y Type: Anima mode" in infotexts[0]
    assert client.status()["hooks_installed"] == 0


def test_context_sites_and_end_axes_enable_the_closed_panel(webui, ctx):
    """No anima args at all (the panel closed): naming a context on an axis turns its first unit on."""
    types = _axis_types()
    name = ctx["name"]
    plain = client.txt2img(**PLAIN).pixels()
    result = _plot(_axis(types, "Anima context", ["None", name]), _axis(types, "Anima sites", ["all", "fine"]),
                   _axis(types, "Anima end", "1, 0.5"))
    cells = _cells(result, 2, 2, 2)
    for iz, end in enumerate((1.0, 0.5)):
        for iy, sites in enumerate(("all", "fine")):
            without, with_context = cells[iz * 4 + iy * 2:iz * 4 + iy * 2 + 2]
            assert np.array_equal(without, plain), "context None: the plain image"
            panel = client.txt2img(anima_args=[True, name, 1.0, "positive", 0.0, end, sites], **PLAIN).pixels()
            assert np.array_equal(with_context, panel), f"sites {sites}, end {end}: as the panel makes it"
            assert not np.array_equal(with_context, plain)


def test_img2img_plot(webui, ctx):
    """The same axes under img2img (its pixels depend on the host's RNG history, so the infotexts are compared)."""
    types = _axis_types(img2img=True)
    init = client.txt2img(**PLAIN).png_b64[0]
    result = client.img2img(init, "a photo of a dog", script_name="x/y/z plot",
                            script_args=_plot_args(_axis(types, "Anima scale", "0, 0.75"), [0, "", []]),
                            alwayson_scripts={"anima": {"args": [True, ctx["name"], 1.0, "negative", 0.0, 1.0, ""]}})
    infotexts = result.info["infotexts"]
    assert len(result.png_b64) == 3 and "X Type: Anima scale" in infotexts[0]
    assert "Anima 1:" not in infotexts[1] and "scale: 0.75, mode: negative" in infotexts[2]


@pytest.mark.parametrize(("label", "values", "csv_mode", "message"), [
    ("Anima scale", "0, 5", False, "Anima scale: scale must be from 0 to 4"),
    ("Anima mode", ["positive", "sideways"], False, "Anima mode: mode must be one of positive, negative"),
    ("Anima context", ["None", "no_such_context"], False, "Anima context: unknown context 'no_such_context'"),
    ("Anima start", "0, 1.5", False, "Anima start: start must be from 0 to 1"),
    ("Anima end", "0", False, "Anima end: start (0) must be before end (0)"),
    ("Anima sites", 'fine, "1,x"', True, "Anima sites: site weights"),
])
def test_bad_axis_values_stop_the_plot_before_it_generates(webui, ctx, label, values, csv_mode, message):
    """The host calls an axis's confirm before the first cell; a value that failed only inside a cell would be
    logged by the host and give an empty cell in a 200 answer, so an error answer means nothing was generated."""
    types = _axis_types()
    body = {**PLAIN, "script_name": "x/y/z plot",
            "script_args": _plot_args(_axis(types, label, values), [0, "", []], csv_mode=csv_mode),
            "alwayson_scripts": {"anima": {"args": [True, ctx["name"], 1.0, "positive", 0.0, 1.0, ""]}}}
    r = client.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 500, r.text[:300]
    error = r.json()
    assert error["error"] == "RuntimeError" and message in error["errors"], error
    assert client.status()["hooks_installed"] == 0
