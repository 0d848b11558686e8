"""Small HTTP helpers for talking to the running WebUI in integration tests."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import requests
from PIL import Image

URL = os.environ.get("ANIMA_WEBUI_URL", "").rstrip("/")
HOST_DIR = os.environ.get("WEBUI_HOST_DIR", "")
TIMEOUT = 300


def post(path: str, body: dict | None = None, **kw) -> requests.Response:
    return requests.post(URL + path, json=body, timeout=TIMEOUT, **kw)


def get(path: str, **kw) -> requests.Response:
    return requests.get(URL + path, timeout=TIMEOUT, **kw)


class Result:
    def __init__(self, payload: dict):
        self.payload = payload
        self.png_b64 = payload["images"]
        self.info = json.loads(payload["info"])

    @property
    def infotext(self) -> str:
        return self.info["infotexts"][0]

    def pixels(self, index: int = 0) -> np.ndarray:
        image = Image.open(io.BytesIO(base64.b64decode(self.png_b64[index]))).convert("RGB")
        return np.asarray(image).astype(np.float64)


def txt2img(prompt: str = "a photo of a dog", anima_args: list | None = None, **overrides) -> Result:
    body = {"prompt": prompt, "steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler a",
            "cfg_scale": 7}
    body.update(overrides)
    if anima_args is not None:
        body.setdefault("alwayson_scripts", {})["anima"] = {"args": anima_args}
    r = post("/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text[:2000]
    return Result(r.json())


def img2img(init: str, prompt: str, **overrides) -> Result:
    body = {"prompt": prompt, "init_images": [init], "steps": 4, "width": 64, "height": 64, "seed": 99,
            "denoising_strength": 0.6, "sampler_name": "Euler a"}
    body.update(overrides)
    r = post("/sdapi/v1/img2img", body)
    assert r.status_code == 200, r.text[:2000]
    return Result(r.json())


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def create_context(name: str, **fields) -> dict:
    body = {"name": name, "seed": 7, "std": 1.0, "overwrite": True, **fields}
    r = post("/anima/v1/contexts", body)
    assert r.status_code == 200, r.text
    return r.json()


def status() -> dict:
    r = get("/anima/v1/status")
    assert r.status_code == 200, r.text
    return r.json()


def hooks_seen_during(action: Callable[[], object], every: float = 0.05) -> list[int]:
    """`hooks_installed` from the status route, polled while `action` runs (a generation), in the order seen."""
    seen: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(status()["hooks_installed"])
            time.sleep(every)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        action()
    finally:
        done.set()
        poller.join()
    return seen


def generation_in_flight(prompt: str, steps: int, hooks: int = 17) -> tuple[threading.Thread, dict]:
    """A 64 px txt2img of `steps` steps in a thread, returned once the status route shows its `hooks` installed
    (sampling with the context has begun); the response lands in the dict under "r"."""
    result: dict = {}

    def run() -> None:
        result["r"] = post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": steps, "width": 64, "height": 64,
                                                 "seed": 1})

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 60
    while status()["hooks_installed"] < hooks and time.time() < deadline:
        time.sleep(0.05)
    assert status()["hooks_installed"] >= hooks, "sampling with the context did not start"
    return worker, result


def last_rows() -> dict:
    """Which rows of each UNet call of the last generation were cond / uncond / left alone (the host runs with
    --anima-debug-rows: tests/run.sh starts it so), and whether each context reached a call."""
    r = get("/anima/v1/debug/rows")
    assert r.status_code == 200, "the host must run with --anima-debug-rows (tests/run.sh starts it so)"
    return r.json()


def assert_rows(expected: dict[int, tuple[list[int], list[int]]]) -> list[dict]:
    """Every UNet call of the last generation has, for its batch size, the expected (cond rows, uncond rows), and
    nothing unplaced; returns the calls."""
    calls = last_rows()["calls"]
    assert calls, "no UNet call was recorded"
    for call in calls:
        assert call["batch"] in expected, call
        assert (call["cond"], call["uncond"], call["unplaced"]) == (*expected[call["batch"]], []), call
    return calls


def set_checkpoint(name: str) -> None:
    r = post("/sdapi/v1/options", {"sd_model_checkpoint": name})
    assert r.status_code == 200, r.text


def upload_context(name: str, data: bytes) -> dict:
    r = requests.post(f"{URL}/anima/v1/contexts/{name}/file?overwrite=true", data=data,
                      headers={"content-type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def delete_context(name: str) -> None:
    requests.delete(f"{URL}/anima/v1/contexts/{name}", timeout=60)


def with_training(data: bytes, training: dict) -> bytes:
    """A context file with its ``anima.training`` metadata replaced (what anyone could put in a shared file)."""
    import struct

    from safetensors.torch import load, save

    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + header_len])["__metadata__"]
    meta["anima.training"] = json.dumps(training)
    return save(load(data), metadata=meta)
