"""A training's log folder: ``<log>/<date>/<name>/`` in the host's textual-inversion layout (images/, contexts/,
loss CSV, settings), the resumable state with the request it was made from, and what a resume must match."""

from __future__ import annotations

import csv
import datetime
import glob
import json
import os

from modules import paths, shared

from lib_anima.errors import ArgumentError
from lib_anima.fileio import atomic_write_bytes
from lib_anima.options import dump
from lib_anima.train import TrainState, TrainStateFileError
from lib_anima.webui.train_inputs import TrainRequest

STATE_FILE = "anima_state.safetensors"
REQUEST_FILE = "anima_request.json"
LOSS_FILE = "anima_loss.csv"


def log_root(req: TrainRequest) -> str:
    return os.path.abspath(req.log_directory or os.path.join(paths.data_path, "textual_inversion"))


class RunFolder:
    """``<log>/<date>/<name>/``: the host's textual-inversion layout (images/, contexts/, loss CSV, settings)."""

    def __init__(self, req: TrainRequest):
        self.name = req.name
        self.path = os.path.join(log_root(req), datetime.datetime.now().strftime("%Y-%m-%d"), req.name)
        os.makedirs(self.path, exist_ok=True)

    def sweep_path(self, step: int) -> str:
        return os.path.join(self.path, f"anima_sweep-{step}.png")

    def image_path(self, step: int) -> str:
        os.makedirs(os.path.join(self.path, "images"), exist_ok=True)
        return os.path.join(self.path, "images", f"anima-{self.name}-{step}.png")

    def checkpoint_path(self, step: int) -> str:
        os.makedirs(os.path.join(self.path, "contexts"), exist_ok=True)
        return os.path.join(self.path, "contexts", f"{self.name}-{step}.safetensors")

    def log_loss(self, step: int, loss: float, lr: float) -> None:
        path = os.path.join(self.path, LOSS_FILE)
        new = not os.path.exists(path)
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "loss", "learn_rate"])
            writer.writerow([step, f"{loss:.7f}", f"{lr:g}"])

    def save_state(self, state: TrainState, request: dict) -> None:
        state.save(os.path.join(self.path, STATE_FILE))
        atomic_write_bytes(os.path.join(self.path, REQUEST_FILE), json.dumps(request, indent=2).encode())

    def save_settings(self, settings: dict) -> None:
        if not getattr(shared.opts, "save_training_settings_to_txt", True):
            return
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        atomic_write_bytes(os.path.join(self.path, f"anima-settings-{stamp}.json"),
                           json.dumps(settings, indent=2, default=str).encode())


def find_resume_state(req: TrainRequest) -> tuple[TrainState, dict, str]:
    """The newest saved state of a run named ``req.name`` under the log folder, with its request record."""
    pattern = os.path.join(glob.escape(log_root(req)), "*", glob.escape(req.name), STATE_FILE)
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise ArgumentError(f"nothing to resume: no saved training state for {req.name!r} under {log_root(req)}")
    path = found[-1]
    try:
        state = TrainState.load(path)
    except TrainStateFileError as e:
        raise ArgumentError(f"the saved training state {path} cannot be used: {e}") from None
    record_path = os.path.join(os.path.dirname(path), REQUEST_FILE)
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    return state, record, path


def request_record(req: TrainRequest, size: int, fingerprint: str, seed: int) -> dict:
    fields = dump(req, exclude={"images", "masks"})
    fields.update(images=len(req.images), masks=sum(m is not None for m in req.masks), resolution=size,
                  seed=seed, data=fingerprint)
    return fields


def check_resume(req: TrainRequest, record: dict, fingerprint: str) -> None:
    for key in ("n_tokens", "weights", "batch_size", "grad_accumulation"):
        if key in record and record[key] != getattr(req, key):
            raise ArgumentError(f"cannot resume: {key} was {record[key]!r} in the saved run, now {getattr(req, key)!r}")
    if record.get("data") and record["data"] != fingerprint:
        raise ArgumentError("cannot resume: the training images, masks or captions differ from the saved run's")

