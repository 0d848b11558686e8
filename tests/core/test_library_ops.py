"""Library file operations (delete, rename, import) and the checks behind the HTTP API (names, directories,
images, script arguments, the generation-request guard)."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib

import pytest
import torch
from PIL import Image

from lib_anima.context import ReferenceContext
from lib_anima.errors import ArgumentError
from lib_anima.images import decode_base64, image_size, open_image
from lib_anima.library import ContextExistsError, ContextLibrary, UnknownContextError
from lib_anima.names import MAX_NAME_BYTES, check_directory, name_problem
from lib_anima.units import MAX_UNITS, units_from_script_args
from lib_anima.webui.api_guard import generation_problem

SITES = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(16)]


def ctx(seed: int = 0) -> ReferenceContext:
    g = torch.Generator().manual_seed(seed)
    return ReferenceContext(tokens=torch.randn(16, 4, 64, generator=g), arch="sd1", site_names=SITES)


@pytest.fixture()
def library(tmp_path) -> ContextLibrary:
    ctx(1).save(str(tmp_path / "a.safetensors"))
    ctx(2).save(str(tmp_path / "b.safetensors"))
    lib = ContextLibrary(str(tmp_path))
    lib.refresh()
    return lib


def _files(lib: ContextLibrary) -> list[str]:
    return sorted(os.listdir(lib.directory))


# ---- delete / rename / import ------------------------------------------------------------------------------------


def test_delete_removes_the_file_and_its_sidecars(library):
    folder = library.directory
    for suffix in (".png", ".preview.jpg", ".json"):
        open(os.path.join(folder, "a" + suffix), "wb").close()
    open(os.path.join(folder, "ab.png"), "wb").close()  # another context's preview: untouched
    removed = library.delete("a")
    assert sorted(os.path.basename(p) for p in removed) == ["a.json", "a.png", "a.preview.jpg", "a.safetensors"]
    assert _files(library) == ["ab.png", "b.safetensors"]
    assert library.names() == ["b"]
    with pytest.raises(UnknownContextError):
        library.delete("a")
    for bad in ("../b", "/etc/passwd", "b\x00", ""):
        with pytest.raises(ArgumentError):
            library.delete(bad)
    assert _files(library) == ["ab.png", "b.safetensors"]


def test_delete_a_broken_file(library):
    with open(os.path.join(library.directory, "broken.safetensors"), "wb") as f:
        f.write(b"junk")
    library.refresh()
    assert "broken" in library.errors()
    library.delete("broken")
    library.refresh()
    assert library.errors() == {}


def test_rename_moves_sidecars_and_refuses_to_clobber(library):
    folder = library.directory
    open(os.path.join(folder, "a.png"), "wb").close()
    open(os.path.join(folder, "b.json"), "wb").close()
    sha_a = library.info("a").sha256
    with pytest.raises(ContextExistsError, match="already exists"):
        library.rename("a", "b")
    assert _files(library) == ["a.png", "a.safetensors", "b.json", "b.safetensors"]
    info = library.rename("a", "c")
    assert info.sha256 == sha_a  # the same file under a new name
    assert _files(library) == ["b.json", "b.safetensors", "c.png", "c.safetensors"]
    assert library.names() == ["b", "c"]
    # overwrite: b's own metadata sidecar must not stay with the context that replaced it
    library.rename("c", "b", overwrite=True)
    assert _files(library) == ["b.png", "b.safetensors"]
    assert library.info("b").sha256 == sha_a
    with pytest.raises(UnknownContextError):
        library.rename("nope", "x")
    for bad in ("../x", "x/y", "CON", "a" * 101, "x\ud800"):
        with pytest.raises(ArgumentError):
            library.rename("b", bad)
    assert library.rename("b", "b").sha256 == sha_a


def test_import_checks_before_writing(library):
    before = _files(library)
    cases = {
        b"": "empty",
        b"garbage": "not a safetensors file",
        ctx(3).to_bytes()[:-100]: "truncated or corrupt",
        _with_nan(ctx(3).to_bytes()): "NaN",
    }
    for data, words in cases.items():
        with pytest.raises(ArgumentError, match=words):
            library.import_bytes("new", data)
        assert _files(library) == before, f"{words}: the folder changed"
    with pytest.raises(ContextExistsError):
        library.import_bytes("a", ctx(3).to_bytes())
    assert library.import_bytes("new", ctx(3).to_bytes()).sha256 == library.info("new").sha256
    assert torch.equal(library.load("new").tokens, ctx(3).tokens)
    info = library.import_bytes("new", ctx(4).to_bytes(), overwrite=True)
    assert torch.equal(library.load("new").tokens, ctx(4).tokens) and info.sha256 == library.load("new").sha256


def _with_nan(data: bytes) -> bytes:
    """A valid file whose first token value is NaN (the header stays right)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    start = 8 + header_len
    return data[:start] + struct.pack("<f", float("nan")) + data[start + 4:]


def test_concurrent_imports_of_one_name_have_one_winner(library):
    results: list[str] = []
    barrier = threading.Barrier(6)

    def upload(seed: int) -> None:
        barrier.wait()
        try:
            library.import_bytes("race", ctx(seed).to_bytes())
            results.append("ok")
        except ContextExistsError:
            results.append("exists")

    threads = [threading.Thread(target=upload, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["exists"] * 5 + ["ok"]
    assert [n for n in _files(library) if n.startswith(".")] == []


def test_contexts_are_loaded_once_per_file_version(library):
    for _ in range(50):
        for name in ("a", "b"):
            library.load(name)
    assert library.load_count == 2


# ---- names and directories ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, words", [
    ("😺" * 51, "bytes in UTF-8"), ("evil\u202egnp.exe", "invisible"), ("zero\u200bwidth", "invisible"),
    ("dot.", "ends with '.'"), ("x\ud800", "UTF-8"), ("\x00", "control"), ("a" * 10_000, "10000 characters"),
])
def test_more_bad_names(name, words):
    assert words in name_problem(name)


def test_longest_names_fit_the_file_system(tmp_path):
    name = "é" * (MAX_NAME_BYTES // 2)
    assert name_problem(name) is None
    ctx().save(str(tmp_path / (name + ".safetensors")))
    open(tmp_path / (name + ".preview.jpeg"), "wb").close()


def test_check_directory(tmp_path):
    root = tmp_path / "root"
    (root / "set").mkdir(parents=True)
    os.symlink(tmp_path, root / "escape")
    assert check_directory(str(root / "set"), [str(root)]) == os.path.realpath(root / "set")
    for bad, words in [(str(tmp_path), "outside"), (str(root / "set" / ".." / ".."), "outside"),
                       (str(root / "escape"), "outside"), ("/etc", "outside"), ("x\x00", "NUL"), ("", "non-empty"),
                       (None, "non-empty"), ("x\ud800", "UTF-8"), ("a" * 5000, "4096")]:
        with pytest.raises(ArgumentError, match=words):
            check_directory(bad, [str(root)])
    # the hint (how to allow more folders) follows only the "outside" refusal
    with pytest.raises(ArgumentError, match=r"outside the allowed folders .*; pass --roots$"):
        check_directory("/etc", [str(root)], outside_hint="pass --roots")
    with pytest.raises(ArgumentError, match="NUL") as refused:
        check_directory("x\x00", [str(root)], outside_hint="pass --roots")
    assert "--roots" not in str(refused.value)


# ---- images --------------------------------------------------------------------------------------------------------


def _png(mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format="PNG")
    return out.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (no pixel data needed to be refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, words", [
    ("", "empty"), ("!!!", "not valid base64"), ("abc", "not valid base64"), (5, "base64 string"),
    ("data:image/png;base64,", "empty"), (base64.b64encode(b"hello").decode(), "not an image"),
    (base64.b64encode(_bomb_png(100_000, 100_000)).decode(), "pixels"),
    (base64.b64encode(_bomb_png(9000, 9000)).decode(), "pixels"),
    (base64.b64encode(_png()[:40]).decode(), "truncated|not an image"),
])
def test_bad_images(data, words):
    with pytest.raises(ArgumentError, match=words):
        open_image(decode_base64(data, "x"), "x")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "I", "1"])
def test_image_modes_are_read(mode):
    raw = _png(mode, (5, 3))
    assert image_size(raw)[:2] == (5, 3)
    assert open_image(decode_base64("data:image/png;base64," + base64.b64encode(raw).decode())).size == (5, 3)


# ---- script args and the request guard ---------------------------------------------------------------------------

BAD_ARGS = [
    "not a list", 5, [{"units": "x"}], [{"units": [5]}], [{"units": [{"scale": 1}]}], [{"units": [{"name": "x", "bogus": 1}]}],
    [{"units": [{"name": "x", "scale": "abc"}]}], [{"units": [{"name": "x", "scale": 1e309}]}],
    [{"units": [{"name": "x", "scale": -1}]}], [{"units": [{"name": "x", "mode": "sideways"}]}],
    [{"units": [{"name": "x", "start": 0.9, "end": 0.1}]}], [{"units": [{"name": "x", "weights": ["a"]}]}],
    [{"units": [{"name": "x", "weights": {"a": 1}}]}], [{"units": [{"name": "../x"}]}], [{"enabled": "maybe", "units": []}],
    [{"units": [{"name": f"c{i}"} for i in range(MAX_UNITS + 1)]}], [{"unknown": 1}], [{"units": [{"name": "x", "weights": "1," * 3000}]}],
    [True, "x", "abc"], [True, 5], [True, "x", 1, "bad mode"], [True, "x", 1, "positive", 2, 1], [{"a": 1}, 5],
    [[1, 2]], [True, ["x"]], [{}], [True, "x", None, None, None, None, {"w": 1}], [{"units": [{"name": None}]}],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=range(len(BAD_ARGS)))
def test_bad_script_args_are_argument_errors(args):
    with pytest.raises(ArgumentError):
        units_from_script_args(args)
    problem = generation_problem({"prompt": "x", "alwayson_scripts": {"anima": {"args": args}}})
    if isinstance(args, list) and args and not isinstance(args[0], (dict, list)) and len(args) > 19:
        return
    assert problem and "alwayson_scripts.anima" in problem


@pytest.mark.parametrize("body", [
    {"prompt": "x"}, {"prompt": "x", "alwayson_scripts": {"other": 5}}, [1, 2], "text",
    {"prompt": "x", "alwayson_scripts": {"anima": {}}}, {"prompt": "x", "alwayson_scripts": {"anima": {"args": []}}},
    {"prompt": "x", "alwayson_scripts": {"Anima": {"args": [False, 5, "junk"]}}},  # disabled: not looked at
    {"prompt": "x", "init_images": ["!!!"]},  # no anima in it: the host's own answer, unchanged
    {"prompt": "<anima:x:1>", "init_images": [base64.b64encode(_png("I;16")).decode()]},
])
def test_guard_passes_what_it_should(body):
    assert generation_problem(body) is None


@pytest.mark.parametrize("body, words", [
    ({"alwayson_scripts": {"anima": 5}}, "must be an object"),
    ({"alwayson_scripts": {"ANIMA": {"args": "abc"}}}, "must be a list"),
    ({"alwayson_scripts": {"anima": {"args": [True] + ["x", 1, "positive", 0, 1, ""] * 4}}}, "at most 19"),
    ({"prompt": "<anima:x>", "init_images": ["!!!"]}, "init_images\\[0\\] is not valid base64"),
    ({"prompt": "<anima:x>", "init_images": [5]}, "base64 string"),
    ({"prompt": "a", "negative_prompt": "<anima:x>", "mask": "AAAA"}, "mask is not an image"),
    ({"hr_prompt": "<anima:x>", "init_images": [base64.b64encode(_bomb_png(50_000, 50_000)).decode()]}, "pixels"),
])
def test_guard_refuses(body, words):
    import re

    assert re.search(words, generation_problem(body) or ""), generation_problem(body)
