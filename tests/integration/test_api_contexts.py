"""The context routes over HTTP on the real host: list with metadata and preview URL, get, refresh, upload
(raw, multipart, JSON base64), download, rename, delete, preview; documented in /docs; loaded once."""

from __future__ import annotations

import base64
import hashlib
import io
import os

import pytest
import requests
from PIL import Image

from tests.integration import webui_client as client

A = "/anima/v1"


def _png(color=(200, 30, 30), size=(24, 24), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else None).save(out, format="PNG")
    return out.getvalue()


def _upload(name: str, data: bytes, how: str = "raw", overwrite: bool = False) -> requests.Response:
    url = f"{client.URL}{A}/contexts/{name}/file" + ("?overwrite=true" if overwrite else "")
    if how == "raw":
        return requests.post(url, data=data, headers={"content-type": "application/octet-stream"}, timeout=60)
    if how == "multipart":
        return requests.post(url, files={"file": (f"{name}.safetensors", data)}, timeout=60)
    return requests.post(url, json={"data": base64.b64encode(data).decode()}, timeout=60)


def _names() -> list[str]:
    return [c["name"] for c in client.get(f"{A}/contexts").json()["contexts"]]


@pytest.fixture()
def folder(ctx) -> str:
    return client.get(f"{A}/contexts").json()["directory"]


@pytest.fixture()
def cleanup():
    names: list[str] = []
    yield names
    for name in names:
        requests.delete(f"{client.URL}{A}/contexts/{name}", timeout=60)


def test_listing_has_the_metadata(ctx, folder):
    listing = client.get(f"{A}/contexts").json()
    entry = next(c for c in listing["contexts"] if c["name"] == ctx["name"])
    assert entry["architecture"] == "sd1" and entry["sites"] == 16 and entry["context_dim"] == 768
    assert entry["n_tokens"] == 4 and entry["hash"] == entry["sha256"][:12] == ctx["hash"]
    assert entry["training"]["base_model"] == "tiny" and "created" in entry["training"]
    path = os.path.join(folder, ctx["name"] + ".safetensors")
    assert entry["size"] == os.path.getsize(path)
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == entry["sha256"]
    assert client.get(f"{A}/contexts/{ctx['name']}").json() == entry


@pytest.mark.forks
def test_download_upload_round_trip(ctx, cleanup):
    r = client.get(f"{A}/contexts/{ctx['name']}/file")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert f'filename="{ctx["name"]}.safetensors"' in r.headers["content-disposition"]
    data = r.content
    assert hashlib.sha256(data).hexdigest()[:12] == ctx["hash"]
    for how in ("raw", "multipart", "json"):
        name = f"itest_up_{how}"
        cleanup.append(name)
        requests.delete(f"{client.URL}{A}/contexts/{name}", timeout=60)
        up = _upload(name, data, how)
        assert up.status_code == 201, up.text
        assert up.json()["sha256"][:12] == ctx["hash"] and up.json()["name"] == name
        again = _upload(name, data, how)
        assert again.status_code == 409 and "already exists" in again.json()["detail"]
        assert _upload(name, data, how, overwrite=True).status_code == 201
    # an uploaded context works at once, like the original
    a = client.txt2img(f"a photo of a dog <anima:{ctx['name']}:1>")
    b = client.txt2img("a photo of a dog <anima:itest_up_raw:1>")
    assert (a.pixels() == b.pixels()).all() and "Anima warnings" not in b.infotext


@pytest.mark.forks
def test_bad_upload_changes_nothing(ctx, folder):
    before = sorted(os.listdir(folder))
    data = client.get(f"{A}/contexts/{ctx['name']}/file").content
    for bad in (data[:-10], b"", b"x" * 100, data.replace(b"sd1", b"sd9")):
        r = _upload(ctx["name"], bad, overwrite=True)  # even with overwrite, the good file must survive
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith(("the uploaded file", "'data'")) or "empty" in r.json()["detail"]
    assert sorted(os.listdir(folder)) == before
    assert client.get(f"{A}/contexts/{ctx['name']}").json()["hash"] == ctx["hash"]


@pytest.mark.forks
def test_preview_rename_delete(ctx, folder, cleanup):
    data = client.get(f"{A}/contexts/{ctx['name']}/file").content
    cleanup.extend(["itest_ren_a", "itest_ren_b"])
    for name in ("itest_ren_a", "itest_ren_b"):
        requests.delete(f"{client.URL}{A}/contexts/{name}", timeout=60)
    assert _upload("itest_ren_a", data).status_code == 201
    assert client.get(f"{A}/contexts/itest_ren_a").json()["preview"] is None

    r = requests.post(f"{client.URL}{A}/contexts/itest_ren_a/preview", data=_png(),
                      headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    preview_url = r.json()["preview"]
    assert preview_url.startswith("/sd_extra_networks/thumb?filename=")  # the host's own route for card images
    image = Image.open(io.BytesIO(client.get(preview_url).content))
    assert image.size == (24, 24) and image.getpixel((3, 3))[:3] == (200, 30, 30)
    assert client.get(f"{A}/contexts/itest_ren_a/preview").content == client.get(preview_url).content
    with open(os.path.join(folder, "itest_ren_a.json"), "w", encoding="utf8") as f:
        f.write('{"description": "kept with the context"}')

    r = client.post(f"{A}/contexts/itest_ren_a/rename", {"new_name": "itest_ren_b"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "itest_ren_b" and "itest_ren_b.png" in r.json()["preview"]
    assert not [n for n in os.listdir(folder) if n.startswith("itest_ren_a")]
    assert sorted(n for n in os.listdir(folder) if n.startswith("itest_ren_b")) == [
        "itest_ren_b.json", "itest_ren_b.png", "itest_ren_b.safetensors"]
    assert "itest_ren_a" not in _names() and "itest_ren_b" in _names()
    moved = client.txt2img("a dog <anima:itest_ren_b:1>")
    assert "Anima warnings" not in moved.infotext
    gone = client.txt2img("a dog <anima:itest_ren_a:1>")
    assert "Anima warnings" in gone.infotext and "itest_ren_a" in gone.infotext

    r = client.post(f"{A}/contexts/itest_ren_b/rename", {"new_name": ctx["name"]})
    assert r.status_code == 409
    r = requests.delete(f"{client.URL}{A}/contexts/itest_ren_b", timeout=60)
    assert r.status_code == 200 and sorted(r.json()["files"]) == [
        "itest_ren_b.json", "itest_ren_b.png", "itest_ren_b.safetensors"]
    assert not [n for n in os.listdir(folder) if n.startswith("itest_ren_b")]
    assert requests.delete(f"{client.URL}{A}/contexts/itest_ren_b", timeout=60).status_code == 404
    assert client.get(f"{A}/contexts/itest_ren_b").status_code == 404
    deleted = client.txt2img("a dog <anima:itest_ren_b:1>")
    assert "Anima warnings" in deleted.infotext


@pytest.mark.forks
def test_refresh_reports_bad_files_dropped_into_the_folder(ctx, folder):
    good = client.get(f"{A}/contexts/{ctx['name']}/file").content
    (header_len,) = __import__("struct").unpack("<Q", good[:8])
    nan = good[: 8 + header_len] + b"\x00\x00\xc0\x7f" + good[8 + header_len + 4:]  # first token value NaN
    files = {"itest_drop_nan": nan, "itest_drop_zero": b"", "itest_drop_cut": good[: len(good) // 2],
             "itest_drop_ok": good}
    try:
        for name, data in files.items():
            with open(os.path.join(folder, name + ".safetensors"), "wb") as f:
                f.write(data)
        listing = client.post(f"{A}/refresh").json()
        assert "NaN" in listing["errors"]["itest_drop_nan"]
        assert "empty" in listing["errors"]["itest_drop_zero"]
        assert "truncated" in listing["errors"]["itest_drop_cut"]
        names = [c["name"] for c in listing["contexts"]]
        assert "itest_drop_ok" in names and ctx["name"] in names
        assert not {"itest_drop_nan", "itest_drop_zero", "itest_drop_cut"} & set(names)
        for name in ("itest_drop_nan", "itest_drop_cut"):
            r = client.get(f"{A}/contexts/{name}")
            assert r.status_code == 400 and f"{name}.safetensors" in r.json()["detail"]
            result = client.txt2img(f"a dog <anima:{name}:1>")
            assert "Anima warnings" in result.infotext and name in result.infotext
    finally:
        for name in files:
            os.remove(os.path.join(folder, name + ".safetensors"))
        client.post(f"{A}/refresh")


def test_contexts_are_loaded_once(ctx, cleanup):
    data = client.get(f"{A}/contexts/{ctx['name']}/file").content
    cleanup.append("itest_once")
    assert _upload("itest_once", data, overwrite=True).status_code == 201
    before = client.status()["context_loads"]
    for i in range(6):
        name = ctx["name"] if i % 2 else "itest_once"
        client.txt2img(f"a dog <anima:{name}:0.5>", steps=1)
    assert client.status()["context_loads"] - before <= 2  # one per context (0 for one already loaded)


@pytest.mark.forks
def test_routes_are_documented(webui):
    spec = client.get("/openapi.json").json()
    for path, method in [("/anima/v1/contexts", "get"), ("/anima/v1/contexts", "post"), ("/anima/v1/refresh", "post"),
                         ("/anima/v1/contexts/{name}", "get"), ("/anima/v1/contexts/{name}", "delete"),
                         ("/anima/v1/contexts/{name}/rename", "post"), ("/anima/v1/contexts/{name}/file", "get"),
                         ("/anima/v1/contexts/{name}/file", "post"), ("/anima/v1/contexts/{name}/preview", "post"),
                         ("/anima/v1/status", "get")]:
        operation = spec["paths"][path][method]
        assert "anima" in operation["tags"], (path, method)
        assert operation.get("description"), f"{method} {path} has no description in /docs"
    upload = spec["paths"]["/anima/v1/contexts/{name}/file"]["post"]["requestBody"]["content"]
    assert {"application/octet-stream", "multipart/form-data", "application/json"} <= set(upload)
    assert client.get("/docs").status_code == 200


@pytest.mark.forks
def test_generation_args_are_checked_before_the_queue(ctx):
    """A bad alwayson_scripts.anima is a 422 naming the problem, in the host's error shape, before any work."""
    body = {"prompt": "a dog", "steps": 1, "width": 64, "height": 64,
            "alwayson_scripts": {"anima": {"args": [{"units": [{"name": ctx["name"], "scale": 9}]}]}}}
    r = client.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 422
    assert r.json()["detail"] == "alwayson_scripts.anima.args: anima unit 1: scale must be from 0 to 4, got 9"
    assert r.json()["error"] == "HTTPException"
    ok = client.post("/sdapi/v1/txt2img", {**body, "alwayson_scripts": {"anima": {"args": [{"units": [{"name": ctx["name"]}]}]}}})
    assert ok.status_code == 200


def test_requests_without_anima_are_not_parsed(ctx):
    """The generation check parses a body only when its bytes could concern anima (a JSON escape could spell it)."""
    def parsed_by(send) -> int:
        before = client.status()["checked_requests"]
        send()
        return client.status()["checked_requests"] - before

    plain = {"prompt": "a dog", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"other": {"args": []}}}
    assert parsed_by(lambda: client.txt2img("a dog", steps=1)) == 0
    assert parsed_by(lambda: client.post("/sdapi/v1/txt2img", plain)) == 0
    assert parsed_by(lambda: client.txt2img(f"a dog <anima:{ctx['name']}:1>", steps=1)) == 1
    escaped = b'{"prompt": "a dog <\\u0061nima:' + ctx["name"].encode() + b':1>", "steps": 1, "width": 64, "height": 64}'
    r = requests.post(client.URL + "/sdapi/v1/txt2img", data=escaped, headers={"content-type": "application/json"},
                      timeout=300)
    assert r.status_code == 200 and f"name: {ctx['name']}" in r.json()["info"]
    assert parsed_by(lambda: requests.post(client.URL + "/sdapi/v1/txt2img", data=escaped.replace(b"1>", b"9>"),
                                           headers={"content-type": "application/json"}, timeout=300)) == 1
