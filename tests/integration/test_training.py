"""Training from one reference image through /anima/v1/train on the real host."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from safetensors.torch import load_file

from tests.integration import webui_client as client
from tests.integration.webui_client import mean_diff, txt2img


def test_train_from_one_image(webui):
    before = txt2img()
    reference = txt2img("a red fox", seed=3).png_b64[0]
    r = client.post("/anima/v1/train", {"name": "itest_trained", "images": [reference], "prompt": "a red fox",
                                        "steps": 12, "resolution": 64, "overwrite": True, "seed": 5})
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["steps"] == 12 and not summary["interrupted"]
    info = client.get("/anima/v1/contexts/itest_trained").json()
    assert (info["architecture"], info["sites"], info["n_tokens"], info["context_dim"]) == ("sd1", 16, 4, 768)
    record = info["training"]
    assert record["steps"] == 12 and record["prompt"] == "a red fox" and record["references"] == 1
    assert record["base_model"] == "tiny"
    after = txt2img()
    assert after.png_b64 == before.png_b64, "training must leave the model exactly as it was"
    assert mean_diff(txt2img("a photo of a dog <anima:itest_trained:2>").pixels(), after.pixels()) > 0.5
    assert client.status()["hooks_installed"] == 0


@pytest.mark.forks
def test_train_refuses_overwrite_and_bad_input(webui):
    reference = txt2img("a red fox", seed=3).png_b64[0]
    body = {"name": "itest_trained_once", "images": [reference], "steps": 2, "resolution": 64, "overwrite": True,
            "sweep": False}
    assert client.post("/anima/v1/train", body).status_code == 200
    listing_before = client.get("/anima/v1/contexts/itest_trained_once").json()
    again = client.post("/anima/v1/train", {**body, "overwrite": False})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    assert client.get("/anima/v1/contexts/itest_trained_once").json()["hash"] == listing_before["hash"]
    assert client.post("/anima/v1/train", {**body, "images": ["not base64!"]}).status_code == 400
    assert client.post("/anima/v1/train", {**body, "name": "../escape"}).status_code == 400


# ---- the full trainer: jobs, interrupt/resume, dataset, masks, schedule, other architectures ---------------------

# no scale sweep after these runs (test_sweep.py tests it; test_train_from_one_image runs it with the defaults)
BASE = {"resolution": 64, "overwrite": True, "seed": 11, "prompt": "a red fox", "sweep": False}


def _reference() -> str:
    return txt2img("a red fox", seed=3).png_b64[0]


def _tokens(name: str):
    directory = client.get("/anima/v1/contexts").json()["directory"]
    return load_file(os.path.join(directory, f"{name}.safetensors"))["anima.tokens"]


def _wait(job_id: str, until, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/anima/v1/train/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach the expected state: {job}")


@pytest.mark.forks
def test_resume_equals_uninterrupted_run(webui):
    reference = _reference()
    body = {**BASE, "images": [reference], "learning_rate": "0.02:2, 0.01"}
    straight = client.post("/anima/v1/train", {**body, "name": "itest_straight", "steps": 4})
    assert straight.status_code == 200, straight.text
    first = client.post("/anima/v1/train", {**body, "name": "itest_resumed", "steps": 2})
    assert first.status_code == 200, first.text
    resumed = client.post("/anima/v1/train", {**body, "name": "itest_resumed", "steps": 4, "resume": True,
                                              "overwrite": False})
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["steps"] == 4
    a, b = _tokens("itest_straight"), _tokens("itest_resumed")
    assert float((a - b).abs().max()) < 1e-5
    log = resumed.json()["log_directory"]
    with open(os.path.join(log, "anima_loss.csv"), encoding="utf-8") as f:
        rows = f.read().splitlines()
    assert rows[0] == "step,loss,learn_rate" and rows[-1].startswith("4,")
    lrs = {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows[1:]}
    assert lrs[1] == 0.02 and lrs[3] == 0.01, "the host's schedule syntax: 0.02 until step 2, then 0.01"


def test_resume_refuses_different_images(webui):
    body = {**BASE, "images": [_reference()], "name": "itest_resume_other", "steps": 1}
    assert client.post("/anima/v1/train", body).status_code == 200
    other = txt2img("a blue whale", seed=8).png_b64[0]
    r = client.post("/anima/v1/train", {**body, "images": [other], "steps": 2, "resume": True})
    assert r.status_code == 400 and "differ" in r.json()["detail"]


@pytest.mark.forks
def test_job_poll_interrupt_409_and_queued_generation(webui):
    before = txt2img()
    reference = _reference()  # made before the job: a generation would wait for the job's queue lock
    start = client.post("/anima/v1/train/jobs", {**BASE, "images": [reference], "name": "itest_job",
                                                 "steps": 400, "save_every": 1})
    assert start.status_code == 202, start.text
    job_id = start.json()["id"]
    running = _wait(job_id, lambda j: j["step"] >= 1)
    assert running["state"] == "running" and running["steps"] == 400 and running["loss"] is not None
    second = client.post("/anima/v1/train/jobs", {**BASE, "images": [reference], "name": "itest_job2", "steps": 2})
    assert second.status_code == 409 and "already running" in second.json()["detail"]
    # while it runs: a malformed request is still told what is wrong (400); a good one is refused as busy (409)
    assert client.post("/anima/v1/train", {**BASE, "images": ["x"], "name": "itest_job3"}).status_code == 400
    busy = client.post("/anima/v1/train", {**BASE, "images": [reference], "name": "itest_job3", "steps": 2})
    assert busy.status_code == 409 and "already running" in busy.json()["detail"]
    generated = {}
    queued = threading.Thread(target=lambda: generated.update(result=txt2img()))
    queued.start()  # waits for the queue lock, i.e. for the job to end
    time.sleep(2)
    assert queued.is_alive(), "a generation must wait while training holds the queue lock"
    interrupted = client.post(f"/anima/v1/train/jobs/{job_id}/interrupt").json()
    assert interrupted["id"] == job_id
    done = _wait(job_id, lambda j: j["state"] not in ("queued", "running"))
    assert done["state"] == "interrupted", done
    assert 1 <= done["result"]["steps"] < 400
    queued.join(300)
    assert generated["result"].png_b64 == before.png_b64, "a generation queued behind training must be unaffected by it"
    assert os.path.exists(os.path.join(done["result"]["log_directory"], "anima_state.safetensors"))
    assert client.get("/anima/v1/contexts/itest_job").json()["training"]["interrupted"] is True
    assert client.status()["hooks_installed"] == 0
    assert client.get("/anima/v1/train/jobs/nope").status_code == 404


def test_interrupt_button_path_for_the_sync_route(webui):
    """The host's own Interrupt (POST /sdapi/v1/interrupt) stops a training started over the sync route."""
    result = {}
    body = {**BASE, "images": [_reference()], "name": "itest_sync_interrupt", "steps": 400}
    thread = threading.Thread(target=lambda: result.update(r=client.post("/anima/v1/train", body)))
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline:
        progress = client.get("/sdapi/v1/progress?skip_current_image=true").json()
        if progress["state"]["job"] == "anima-train" and progress["state"]["job_no"] >= 1:
            break
        time.sleep(0.5)
    client.post("/sdapi/v1/interrupt")
    thread.join(300)
    summary = result["r"].json()
    assert result["r"].status_code == 200 and summary["interrupted"] and summary["steps"] < 400


@pytest.mark.forks
def test_mask_and_preview_and_bad_schedule(webui):
    reference = _reference()
    import base64
    import io

    from PIL import Image

    def png(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    black = png(Image.new("L", (64, 64), 0))
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    body = {**BASE, "images": [reference], "name": "itest_masked", "steps": 2}
    r = client.post("/anima/v1/train", {**body, "masks": [black]})
    assert r.status_code == 400 and "zero everywhere" in r.json()["detail"]
    r = client.post("/anima/v1/train", {**body, "masks": [png(half)], "preview_every": 1, "preview_steps": 2})
    assert r.status_code == 200, r.text
    images = os.listdir(os.path.join(r.json()["log_directory"], "images"))
    assert "anima-itest_masked-1.png" in images and "anima-itest_masked-2.png" in images
    bad = client.post("/anima/v1/train", {**body, "learning_rate": "0.01:abc"})
    assert bad.status_code == 400 and "learning rate" in bad.json()["detail"]
    assert client.post("/anima/v1/train", {**body, "masks": [black, black]}).status_code == 400


@pytest.mark.forks
def test_dataset_directory_with_templates(webui):
    from PIL import Image

    if not client.HOST_DIR:
        pytest.skip("WEBUI_HOST_DIR is not set: the dataset must live inside the host's data dir")
    root = os.path.join(client.HOST_DIR, "anima-itest-dataset")
    os.makedirs(root, exist_ok=True)
    Image.new("RGB", (80, 64), (200, 30, 30)).save(os.path.join(root, "01-red square.png"))
    Image.new("RGB", (64, 64), (30, 30, 200)).save(os.path.join(root, "b.png"))
    with open(os.path.join(root, "b.txt"), "w", encoding="utf-8") as f:
        f.write("a blue tile")
    body = {"name": "itest_dataset", "dataset_dir": root, "template": "subject_filewords.txt", "steps": 2,
            "resolution": 64, "overwrite": True, "name_text": "sks", "sweep": False}
    r = client.post("/anima/v1/train", body)
    assert r.status_code == 200, r.text
    record = client.get("/anima/v1/contexts/itest_dataset").json()["training"]
    assert record["references"] == 2 and record["dataset"] == "anima-itest-dataset"
    assert client.post("/anima/v1/train", {**body, "dataset_dir": "/etc"}).status_code == 400
    assert client.post("/anima/v1/train", {**body, "template": "nope.txt"}).status_code == 400
    assert client.post("/anima/v1/train", {**body, "images": [_reference()]}).status_code == 400
    assert "subject_filewords.txt" in client.get("/anima/v1/train/templates").json()


@pytest.mark.parametrize(("checkpoint", "arch", "dim"), [("tiny_xl", "sdxl", 1024), ("tiny_v2", "sd2", 1024)])
def test_train_on_other_architectures(webui, checkpoint, arch, dim):
    client.set_checkpoint(checkpoint)
    try:
        reference = txt2img("a red fox", seed=3).png_b64[0]
        before = txt2img()
        r = client.post("/anima/v1/train", {**BASE, "images": [reference], "name": f"itest_{arch}", "steps": 2,
                                            "sweep": True, "preview_steps": 2})
        assert r.status_code == 200, r.text
        assert len(r.json()["sweep"]["labels"]) == 5, "the scale sweep renders on this architecture too"
        info = client.get(f"/anima/v1/contexts/itest_{arch}").json()
        assert (info["architecture"], info["context_dim"]) == (arch, dim)
        assert txt2img().png_b64 == before.png_b64
        changed = txt2img(f"a photo of a dog <anima:itest_{arch}:2>")
        assert changed.png_b64 != before.png_b64
    finally:
        client.set_checkpoint("tiny")


# ---- request checks before any work: sizes, names, every 400/409 before a job exists -------------------------------


def _png_b64(size: tuple[int, int] = (8, 8)) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 20, 20)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _header_only_png(width: int, height: int) -> str:
    """A PNG that claims width x height but holds no pixels: only a check of the headers can refuse it cheaply."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def _job_ids() -> set[str]:
    return {job["id"] for job in client.get("/anima/v1/train/jobs").json()}


def test_image_count_and_pixels_are_bounded_before_decoding(webui):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TrainBody"]["properties"]
    assert schema["images"]["maxItems"] == 64 and schema["masks"]["maxItems"] == 64  # shown in /docs
    body = {**BASE, "name": "itest_limits", "steps": 1}
    too_many = client.post("/anima/v1/train", {**body, "images": [_png_b64()] * 65})
    assert too_many.status_code == 422 and "64" in too_many.text
    # five 4096 x 4096 images: each allowed alone, together over the budget; refused from their headers alone
    # (these hold no pixel data, so decoding one would fail with a 400 instead)
    huge = client.post("/anima/v1/train/jobs", {**body, "images": [_header_only_png(4096, 4096)] * 5})
    assert huge.status_code == 413, huge.text
    assert "pixels together" in huge.json()["detail"]
    over = client.post("/anima/v1/train", {**body, "images": [_header_only_png(8192, 4096)]})
    assert over.status_code == 400 and "8192x4096" in over.json()["detail"]


def test_training_body_size_is_bounded_before_it_is_read(webui):
    """A declared body over the limit is answered at once (413), before the server reads or parses it."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(client.URL)
    for path in ("/anima/v1/train", "/anima/v1/train/jobs"):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(512 * 1024 * 1024))
            conn.endheaders(b'{"name": "itest_body", "images": ["')  # the rest never comes
            response = conn.getresponse()
            assert response.status == 413, (path, response.status)
            assert "at most" in json.loads(response.read())["detail"]
        finally:
            conn.close()


def test_jobs_refuse_up_front_what_the_sync_route_refuses(webui):
    """409 / 400 before a job exists: a taken name, a bad schedule, a missing resume state, a bad template."""
    client.create_context("itest_taken")
    reference = _png_b64((64, 64))
    body = {**BASE, "images": [reference], "steps": 2}
    before = _job_ids()
    taken = client.post("/anima/v1/train/jobs", {**body, "name": "itest_taken", "overwrite": False})
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"], taken.text
    for bad in ({"learning_rate": "0.01:abc"}, {"resume": True, "name": "itest_never_trained"},
                {"images": [], "dataset_dir": "/etc"}):
        r = client.post("/anima/v1/train/jobs", {**body, "name": "itest_job_bad", **bad})
        assert r.status_code == 400, (bad, r.text)
    assert _job_ids() == before, "a refused request must not leave a job behind"
    assert client.get("/anima/v1/contexts/itest_taken").status_code == 200


def test_status_comes_from_the_error_not_its_words(webui):
    """A learning rate that reads "already exists" is a bad value (400), not a name conflict (409)."""
    body = {**BASE, "images": [_png_b64((64, 64))], "name": "itest_words", "steps": 2, "learning_rate": "already exists"}
    for route in ("/anima/v1/train", "/anima/v1/train/jobs"):
        r = client.post(route, body)
        assert r.status_code == 400 and "learning rate" in r.json()["detail"], (route, r.text)


@pytest.mark.forks
def test_options_are_bounded_typed_and_described_in_the_schema(webui):
    """One options model behind the body: its bounds and descriptions show in /docs, and a value outside them, a
    wrong type or a misspelt option is refused with 422 naming the field, before any job exists."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TrainBody"]["properties"]
    assert (schema["steps"]["minimum"], schema["steps"]["maximum"], schema["steps"]["default"]) == (1, 100_000, 300)
    assert schema["resolution"]["multipleOf"] == 8 and schema["n_tokens"]["maximum"] == 75
    assert all(schema[name].get("description") for name in ("steps", "learning_rate", "weights", "sweep"))
    body = {**BASE, "images": [_png_b64((64, 64))], "name": "itest_bounds", "steps": 2}
    before = _job_ids()
    for bad, field in (({"steps": 0}, "steps"), ({"n_tokens": 76}, "n_tokens"), ({"resolution": 100}, "resolution"),
                       ({"batch_size": "2"}, "batch_size"), ({"flip": "no"}, "flip"), ({"stepz": 5}, "stepz")):
        for route in ("/anima/v1/train", "/anima/v1/train/jobs"):
            r = client.post(route, {**body, **bad})
            assert r.status_code == 422 and field in r.text, (bad, route, r.status_code, r.text)
    assert _job_ids() == before
    assert client.get("/anima/v1/contexts/itest_bounds").status_code == 404
