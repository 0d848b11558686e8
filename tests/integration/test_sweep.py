"""The scale sweep after a training run, over HTTP: the jobs API's record and grid, the file in the log folder."""

from __future__ import annotations

import base64
import io
import os
import time

import numpy as np
from PIL import Image

from tests.integration import webui_client as client

LABELS = ["scale 0", "scale 0.5", "scale 1", "scale 1.5", "scale 1 negative"]
TRAIN = {"prompt": "a red fox", "steps": 3, "resolution": 64, "overwrite": True, "seed": 11, "preview_steps": 4}


def _reference() -> str:
    return client.txt2img("a red fox", seed=3).png_b64[0]


def _finished_job(body: dict) -> dict:
    r = client.post("/anima/v1/train/jobs", body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.time() + 600
    while time.time() < deadline:
        job = client.get(f"/anima/v1/train/jobs/{job_id}?sweep=true").json()
        if job["state"] not in ("queued", "running"):
            assert job["state"] == "finished", job
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.float64)


def test_sweep_after_training(webui):
    job = _finished_job({**TRAIN, "name": "itest_sweep", "images": [_reference()]})  # sweep: on by default
    result, record = job["result"], job["result"]["sweep"]
    assert record["labels"] == LABELS
    assert (record["prompt"], record["seed"], record["steps"], record["width"], record["height"]) == (
        "a red fox", 11, 4, 64, 64), "the training prompt, one seed (the run's), the preview steps, the training size"
    assert 0 < record["seconds"] <= result["seconds"], "the sweep's time counts in the run's"
    assert os.path.dirname(record["path"]) == result["log_directory"]
    grid = Image.open(io.BytesIO(base64.b64decode(job["sweep"])))
    with Image.open(record["path"]) as saved:
        assert np.array_equal(_pixels(saved), _pixels(grid)), "the saved grid is the one the API returns"
        assert "Seed: 11" in saved.info["parameters"] and saved.info["parameters"].startswith("a red fox")
    pixels = _pixels(grid)
    band = grid.height - 64
    assert grid.width == 5 * 64 and band > 0, grid.size
    cells = [pixels[band:, i * 64:(i + 1) * 64] for i in range(5)]
    for i in range(5):
        assert (pixels[:band, i * 64:(i + 1) * 64] < 128).any(), f"no label over cell {i}"
    plain = client.txt2img("a red fox", seed=11, steps=4, width=64, height=64).pixels()
    assert np.array_equal(cells[0], plain), "the scale-0 cell is a plain render with the same seed, prompt, size, steps"
    diffs = [client.mean_diff(cell, plain) for cell in cells[1:]]
    assert 0 < diffs[0] < diffs[1] < diffs[2], f"positive cells must move away from the plain image with scale: {diffs}"
    assert diffs[3] > 0, "the negative cell applies the context"
    assert client.get(f"/anima/v1/train/jobs/{job['id']}").json()["sweep"] is None, "base64 only on request"
    assert client.status()["hooks_installed"] == 0


def test_sweep_can_be_turned_off(webui):
    job = _finished_job({**TRAIN, "name": "itest_no_sweep", "images": [_reference()], "sweep": False})
    assert job["result"]["sweep"] is None and job["sweep"] is None
    assert not [f for f in os.listdir(job["result"]["log_directory"]) if f.startswith("anima_sweep")]
