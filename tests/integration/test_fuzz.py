"""The fuzz corpus (tests/data/fuzz_corpus.json) against the real host: malformed requests to every anima route
and to txt2img/img2img, and malformed prompt strings. Each must get a clear 4xx (with a `detail`) or a visible
warning (``Anima warnings`` in the infotext); never a 500 or a traceback; and the server must answer a normal
request afterwards with no hook left installed.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from lib_anima.context import TOKENS_KEY, ReferenceContext
from tests.integration import webui_client as client

CORPUS_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "fuzz_corpus.json")
with open(CORPUS_PATH, encoding="utf8") as _f:
    CORPUS = json.load(_f)
LONG_NAME = "n" * 300
VICTIM = "itest_fuzz_victim"
MIN_REQUESTS, MIN_PROMPTS = 150, 50  # the corpus has 198 and 64: a shrunken or unloaded one must fail


# ---- generated bodies ---------------------------------------------------------------------------------------------


def _png(mode: str = "RGB", size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    if mode == "I;16":
        image = Image.fromarray((np.arange(size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0]) * 16), "I;16")
    else:
        image = Image.new(mode, size)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _context(tokens: torch.Tensor | None = None) -> ReferenceContext:
    sites = [f"s{i}" for i in range(16)]
    return ReferenceContext(tokens=torch.zeros(16, 2, 768) if tokens is None else tokens, arch="sd1", site_names=sites)


def _replace_tokens(data: bytes, tensor: torch.Tensor) -> bytes:
    """A context file whose tokens are replaced by `tensor` (header kept consistent by safetensors itself)."""
    from safetensors.torch import load, save

    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + header_len])["__metadata__"]
    tensors = load(data)
    tensors[TOKENS_KEY] = tensor
    return save(tensors, metadata=meta)


def _generators() -> dict[str, bytes]:
    ok = _context().to_bytes()
    nan_data = bytearray(ok)
    (header_len,) = struct.unpack("<Q", ok[:8])
    nan_data[8 + header_len:8 + header_len + 4] = struct.pack("<f", math.nan)
    return {
        "garbage": b"this is not a file of any kind \x00\x01\x02" * 10,
        "empty": b"",
        "text": b"not json {",
        "context_ok": ok,
        "context_truncated": ok[: len(ok) - 1000],
        "context_nan": bytes(nan_data),
        "context_int": _replace_tokens(ok, torch.zeros(16, 2, 768, dtype=torch.int32)),
        "context_rank2": _replace_tokens(ok, torch.zeros(16, 2 * 768)),
        "huge_body": b"\x00" * (64 * 1024 * 1024 + 1),
        "png_rgb": _png(),
        "png_i16": _png("I;16"),
        "png_la": _png("LA"),
        "png_p": _png("P"),
        "png_1": _png("1"),
        "png_rgba": _png("RGBA"),
        "png_1x1": _png("RGB", (1, 1)),
        "png_truncated": _png("RGB", (256, 256))[:200],
        "png_bomb": _png_header_only(200_000, 200_000),
        "png_9000": _png_header_only(9000, 9000),
        "png_4096": _png_header_only(4096, 4096),
        "gif": _png("P", fmt="GIF"),
        "tiff": _png("RGB", fmt="TIFF"),
    }


GENERATED = _generators()


def _expand(value, ctx_name: str):
    """Placeholders in the corpus → values."""
    if isinstance(value, str):
        if value == "$INF":
            return math.inf
        if value == "$NAN":
            return math.nan
        if value.startswith("$B64:"):
            return base64.b64encode(GENERATED[value[5:]]).decode()
        return (value.replace("$UCTX", ctx_name.upper()).replace("$CTX", ctx_name)
                .replace("$VICTIM", VICTIM).replace("$LONG", LONG_NAME))
    if isinstance(value, list):
        return [_expand(v, ctx_name) for v in value]
    if isinstance(value, dict):
        return {_expand(k, ctx_name): _expand(v, ctx_name) for k, v in value.items()}
    return value


# ---- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def victim(ctx):
    """A throwaway context the rename/preview entries may hit (the test context stays untouched)."""
    data = client.get(f"/anima/v1/contexts/{ctx['name']}/file").content
    r = requests.post(f"{client.URL}/anima/v1/contexts/{VICTIM}/file?overwrite=true", data=data,
                      headers={"content-type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 201, r.text
    yield VICTIM
    client.post("/anima/v1/refresh")
    requests.delete(f"{client.URL}/anima/v1/contexts/{VICTIM}", timeout=60)
    requests.delete(f"{client.URL}/anima/v1/contexts/fz_upload", timeout=60)


def _send(entry: dict, ctx_name: str) -> requests.Response:
    url = client.URL + _expand(entry["path"], ctx_name)
    kwargs: dict = {"timeout": 300}
    headers = {}
    if "json" in entry:
        kwargs["data"] = json.dumps(_expand(entry["json"], ctx_name))  # allow_nan: sends Infinity / NaN as asked
        headers["content-type"] = "application/json"
    elif "raw" in entry:
        kwargs["data"] = GENERATED.get(entry["raw"], entry["raw"].encode())
        headers["content-type"] = entry.get("content_type", "application/octet-stream")
    elif "multipart" in entry:
        kwargs["files"] = {field: ("upload.bin", GENERATED[kind]) for field, kind in entry["multipart"].items()}
    if "content_type" in entry and "raw" not in entry:
        headers["content-type"] = entry["content_type"]
    return requests.request(entry["method"], url, headers=headers, **kwargs)


def _check(entry: dict, r: requests.Response) -> None:
    what = f"{entry['name']}: {r.status_code} {r.text[:300]}"
    assert r.status_code != 500 and r.status_code < 500, what
    assert "Traceback" not in r.text and 'File "' not in r.text, what
    expect = entry["expect"]
    if expect == "4xx":
        assert 400 <= r.status_code < 500, what
    elif isinstance(expect, int):
        assert r.status_code == expect, what
    elif expect in ("warning", "ok"):
        assert 200 <= r.status_code < 300, what
        info = r.json().get("info") if "json" in r.headers.get("content-type", "") else None
        if info is not None:
            infotext = json.loads(info)["infotexts"][0]
            assert ("Anima warnings" in infotext) == (expect == "warning"), f"{entry['name']}: {infotext[-400:]}"
    if 400 <= r.status_code < 500 and r.headers.get("content-type", "").startswith("application/json"):
        detail = r.json().get("detail")
        assert detail, f"{entry['name']}: a 4xx without a detail saying why"


@pytest.mark.parametrize("entry", CORPUS["requests"], ids=[e["name"] for e in CORPUS["requests"]])
def test_request(ctx, victim, entry):
    _check(entry, _send(entry, ctx["name"]))


@pytest.mark.parametrize("entry", CORPUS["prompts"], ids=range(len(CORPUS["prompts"])))
def test_prompt(ctx, entry):
    body = {"prompt": _expand(entry["prompt"], ctx["name"]), "steps": 1, "width": 64, "height": 64, "seed": 11}
    r = requests.post(client.URL + "/sdapi/v1/txt2img", data=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=300)
    _check({"name": repr(entry["prompt"][:80]), "expect": entry["expect"]}, r)
    assert client.status()["hooks_installed"] == 0


def test_server_is_fine_afterwards(ctx):
    """Runs after the corpus (file order): a normal request still works, with the context, and no hook is left."""
    assert client.status()["hooks_installed"] == 0
    plain = client.txt2img()
    with_ctx = client.txt2img(f"a photo of a dog <anima:{ctx['name']}:1>")
    assert "Anima warnings" not in with_ctx.infotext and f"name: {ctx['name']}" in with_ctx.infotext
    assert client.mean_diff(plain.pixels(), with_ctx.pixels()) > 1.0
    listing = client.get("/anima/v1/contexts").json()
    assert ctx["name"] in [c["name"] for c in listing["contexts"]]
    assert not [n for n in os.listdir(listing["directory"]) if n.startswith(".anima-")], "temporary files left"
    assert "fz_upload" not in [c["name"] for c in listing["contexts"]], "a bad upload was stored"


def test_corpus_is_loaded_and_counted():
    """The corpus itself, independent of which tests ran or in what order: an empty or short one fails here
    (an empty parametrization would otherwise just skip)."""
    requests_, prompts = CORPUS.get("requests") or [], CORPUS.get("prompts") or []
    malformed = sum(entry["expect"] != "ok" for entry in [*requests_, *prompts])
    print(f"\nreliability: fuzz inputs {len(requests_) + len(prompts)} ({len(requests_)} requests, "
          f"{len(prompts)} prompts), malformed {malformed}")
    assert len(requests_) >= MIN_REQUESTS and len(prompts) >= MIN_PROMPTS, (
        f"{CORPUS_PATH}: {len(requests_)} requests and {len(prompts)} prompts; at least {MIN_REQUESTS} and "
        f"{MIN_PROMPTS} expected")
    assert len({entry["name"] for entry in requests_}) == len(requests_), "request names must be unique"


def test_corpus_reaches_every_anima_route(webui):
    """Every route the app has gets malformed input from the corpus (a new route without fuzz entries fails)."""
    spec = client.get("/openapi.json").json()
    routes = {(method.upper(), path) for path, ops in spec["paths"].items() if path.startswith("/anima/") for method in ops}
    import re

    def matches(route: tuple[str, str], entry: dict) -> bool:
        pattern = "^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(route[1])) + r"(\?.*)?$"
        return entry["method"].upper() == route[0] and re.match(pattern, _expand(entry["path"], "x")) is not None

    missing = sorted(r for r in routes if not any(matches(r, e) for e in CORPUS["requests"]))
    assert not missing, f"no fuzz entry for {missing}"
