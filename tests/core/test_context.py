"""The context file format: round trip, atomic save, hashes, every kind of bad file, and the contexts folder."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_anima.context import (
    FORMAT_VERSION,
    SITE_WEIGHTS_KEY,
    TOKENS_KEY,
    ReferenceContext,
    inspect_file,
    load_context,
)
from lib_anima.errors import ArgumentError, ContextFileError
from lib_anima.library import ContextLibrary

SITES = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(16)]


def make_context(seed: int = 0, n_sites: int = 16, n_tokens: int = 4, dim: int = 64, **kwargs) -> ReferenceContext:
    g = torch.Generator().manual_seed(seed)
    kwargs.setdefault("arch", "sd1")
    kwargs.setdefault("site_names", SITES[:n_sites])
    return ReferenceContext(tokens=torch.randn(n_sites, n_tokens, dim, generator=g), **kwargs)


def valid_metadata(**changes) -> dict[str, str]:
    meta = make_context().metadata()
    for key, value in changes.items():
        key = "anima." + key
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


def write(path, tensors: dict, metadata: dict | None) -> str:
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


# ---- round trip ----------------------------------------------------------------------------------------------


def test_round_trip_keeps_everything(tmp_path):
    training = {"steps": 300, "lr": 0.001, "images": ["a.png", "b.png"], "base_model": "tiny"}
    ctx = make_context(
        seed=1,
        site_weights=torch.linspace(0, 1, 16),
        training=training,
        default_scale=0.75,
        default_mode="Negative",
        extra_metadata={"modelspec.title": "cats", "anima.from_the_future": "yes", "note": "ünïcode ✓"},
    )
    path = str(tmp_path / "cats.safetensors")
    ctx.save(path)
    assert ctx.path == path
    loaded = load_context(path)
    assert loaded.name == "cats" and loaded.path == path
    assert torch.equal(loaded.tokens, ctx.tokens)
    assert loaded.tokens.dtype == torch.float32
    assert torch.equal(loaded.site_weights, ctx.site_weights)
    assert loaded.training == training
    assert loaded.default_scale == 0.75
    assert loaded.default_mode == "negative"
    assert loaded.arch == "sd1" and loaded.site_names == SITES
    assert loaded.extra_metadata == {"modelspec.title": "cats", "anima.from_the_future": "yes", "note": "ünïcode ✓"}
    assert loaded.site_layout == ctx.site_layout
    assert (loaded.n_sites, loaded.n_tokens, loaded.context_dim) == (16, 4, 64)
    # and the unknown keys survive a second save
    path2 = str(tmp_path / "again.safetensors")
    loaded.save(path2)
    assert load_context(path2).extra_metadata == loaded.extra_metadata
    info = inspect_file(path)
    assert (info.arch, info.n_sites, info.n_tokens, info.context_dim) == ("sd1", 16, 4, 64)
    assert info.training == training and info.default_scale == 0.75 and info.default_mode == "negative"


def test_round_trip_defaults(tmp_path):
    ctx = make_context(seed=2)
    path = str(tmp_path / "plain.safetensors")
    ctx.save(path)
    loaded = load_context(path, name="given")
    assert loaded.name == "given"
    assert loaded.site_weights is None
    assert loaded.training == {}
    assert loaded.default_scale == 1.0 and loaded.default_mode == "positive"
    assert loaded.extra_metadata == {}


def test_optional_metadata_missing_gives_defaults(tmp_path):
    meta = valid_metadata(training=None, default_scale=None, default_mode=None, site_layout=None)
    path = write(tmp_path / "bare.safetensors", {TOKENS_KEY: make_context().tokens}, meta)
    loaded = load_context(path)
    assert loaded.training == {} and loaded.default_scale == 1.0 and loaded.default_mode == "positive"


def test_half_precision_tokens_load_as_float32(tmp_path):
    tokens = make_context().tokens
    path = write(tmp_path / "half.safetensors", {TOKENS_KEY: tokens.half()}, valid_metadata())
    loaded = load_context(path)
    assert loaded.tokens.dtype == torch.float32
    assert torch.equal(loaded.tokens, tokens.half().float())


# ---- atomic save and hashes ----------------------------------------------------------------------------------


def test_save_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "a.safetensors")
    make_context(seed=1).save(path)
    make_context(seed=2).save(path)  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    assert torch.equal(load_context(path).tokens, make_context(seed=2).tokens)


def test_failed_save_leaves_no_temp_files_and_no_partial_file(tmp_path):
    (tmp_path / "taken.safetensors").mkdir()  # the rename onto a folder fails
    with pytest.raises(OSError):
        make_context().save(str(tmp_path / "taken.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["taken.safetensors"]
    assert os.listdir(tmp_path / "taken.safetensors") == []


def test_save_creates_the_folder(tmp_path):
    path = str(tmp_path / "new" / "sub" / "c.safetensors")
    make_context().save(path)
    assert os.listdir(tmp_path / "new" / "sub") == ["c.safetensors"]


def test_hash_is_of_the_file_and_stable(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    ctx = make_context(seed=3)
    ctx.save(a)
    with open(a, "rb") as f:
        assert ctx.sha256 == hashlib.sha256(f.read()).hexdigest()
    first = ctx.shorthash
    assert len(first) == 12 and first == ctx.sha256[:12]
    make_context(seed=3).save(b)
    assert load_context(a).shorthash == load_context(b).shorthash == first
    assert load_context(a).sha256 == ctx.sha256


def test_same_content_gives_the_same_bytes(tmp_path):
    """The file (hence the hash in the infotext) depends only on the content, not on the save."""
    ctx = make_context(seed=3, training={"b": 1, "a": 2}, extra_metadata={f"key{i}": str(i) for i in range(20)})
    first = ctx.to_bytes()
    assert all(ctx.to_bytes() == first for _ in range(5))
    path = str(tmp_path / "c.safetensors")
    ctx.save(path)
    with safe_open(path, framework="pt") as f:  # still a plain safetensors file to any reader
        assert f.metadata() == ctx.metadata()
        assert torch.equal(f.get_tensor(TOKENS_KEY), ctx.tokens)
    resaved = load_context(path)
    resaved.save(str(tmp_path / "d.safetensors"))
    assert resaved.sha256 == ctx.sha256


def test_hash_changes_with_content(tmp_path):
    base = make_context(seed=3)
    hashes = set()
    variants = [
        base,
        make_context(seed=4),
        make_context(seed=3, default_scale=0.5),
        make_context(seed=3, training={"steps": 1}),
    ]
    tweaked = make_context(seed=3)
    tweaked.tokens[0, 0, 0] += 1e-3
    variants.append(tweaked)
    for i, ctx in enumerate(variants):
        ctx.save(str(tmp_path / f"{i}.safetensors"))
        hashes.add(ctx.shorthash)
    assert len(hashes) == len(variants)


def test_unsaved_context_has_empty_shorthash():
    assert make_context().shorthash == ""


# ---- validation of the in-memory context ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokens": torch.zeros(16, 64)},
        {"tokens": torch.zeros(16, 4, 64, dtype=torch.int32)},
        {"tokens": torch.zeros(16, 0, 64)},
        {"tokens": torch.full((16, 4, 64), float("nan"))},
        {"arch": "sd3"},
        {"site_names": SITES[:15]},
        {"site_weights": torch.ones(15)},
        {"site_weights": torch.tensor([float("inf")] * 16)},
        {"default_scale": 5},
        {"default_mode": "sideways"},
    ],
)
def test_reference_context_validation(kwargs):
    base = {"tokens": torch.zeros(16, 4, 64), "arch": "sd1", "site_names": SITES}
    base.update(kwargs)
    with pytest.raises(ArgumentError):
        ReferenceContext(**base)


# ---- bad files: each is a ContextFileError naming the file and the problem ---------------------------------------


def _good_file(tmp_path) -> str:
    path = str(tmp_path / "good.safetensors")
    make_context(seed=9).save(path)
    return path


def _random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    return str(path), "not a safetensors file"


def _zero_bytes(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return str(path), "empty"


def _seven_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * 7)
    return str(path), "not a safetensors file"


def _truncated(tmp_path):
    with open(_good_file(tmp_path), "rb") as f:
        data = f.read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return str(path), "truncated"


def _huge_header_length(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b'{"__metadata__": {}}' + b"\0" * 64)
    return str(path), "header length out of range"


def _header_longer_than_file(tmp_path):
    path = tmp_path / "long.safetensors"
    header = b'{"__metadata__": {}}'
    path.write_bytes(struct.pack("<Q", len(header) + 10) + header)
    return str(path), "header length out of range"


def _header_not_json(tmp_path):
    path = tmp_path / "notjson.safetensors"
    header = b"this is not json at all!"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return str(path), "not JSON"


def _missing_tokens(tmp_path):
    return write(tmp_path / "notokens.safetensors", {"something.else": torch.zeros(16, 4, 64)}, valid_metadata()), \
        "'anima.tokens' is missing"


def _wrong_rank(tmp_path):
    return write(tmp_path / "rank.safetensors", {TOKENS_KEY: torch.zeros(16, 256)}, valid_metadata()), "rank 3"


def _wrong_rank_4(tmp_path):
    return write(tmp_path / "rank4.safetensors", {TOKENS_KEY: torch.zeros(16, 4, 64, 1)}, valid_metadata()), "rank 3"


def _int_tokens(tmp_path):
    return write(tmp_path / "int.safetensors", {TOKENS_KEY: torch.zeros(16, 4, 64, dtype=torch.int32)},
                 valid_metadata()), "dtype I32"


def _n_sites_mismatch(tmp_path):
    return write(tmp_path / "nsites.safetensors", {TOKENS_KEY: make_context().tokens}, valid_metadata(n_sites="70")), \
        "'anima.n_sites' says 70 but the tokens have 16"


def _context_dim_mismatch(tmp_path):
    return write(tmp_path / "dim.safetensors", {TOKENS_KEY: make_context().tokens},
                 valid_metadata(context_dim="2048")), "'anima.context_dim' says 2048 but the tokens have 64"


def _n_tokens_not_int(tmp_path):
    return write(tmp_path / "ntok.safetensors", {TOKENS_KEY: make_context().tokens}, valid_metadata(n_tokens="four")), \
        "not an integer"


def _n_sites_missing(tmp_path):
    return write(tmp_path / "nosites.safetensors", {TOKENS_KEY: make_context().tokens}, valid_metadata(n_sites=None)), \
        "'anima.n_sites' is missing"


def _future_version(tmp_path):
    return write(tmp_path / "v2.safetensors", {TOKENS_KEY: make_context().tokens},
                 valid_metadata(format_version=str(FORMAT_VERSION + 1))), "format version '2'"


def _missing_version(tmp_path):
    return write(tmp_path / "nov.safetensors", {TOKENS_KEY: make_context().tokens},
                 valid_metadata(format_version=None)), "'anima.format_version' is missing"


def _no_metadata(tmp_path):
    return write(tmp_path / "nometa.safetensors", {TOKENS_KEY: make_context().tokens}, None), \
        "'anima.format_version' is missing"


def _bad_arch(tmp_path):
    return write(tmp_path / "arch.safetensors", {TOKENS_KEY: make_context().tokens}, valid_metadata(arch="flux")), \
        "'anima.arch' must be one of"


def _nan_tokens(tmp_path):
    tokens = make_context().tokens
    tokens[3, 1, 7] = float("nan")
    return write(tmp_path / "nan.safetensors", {TOKENS_KEY: tokens}, valid_metadata()), "NaN or infinite"


def _inf_tokens(tmp_path):
    tokens = make_context().tokens
    tokens[0, 0, 0] = float("-inf")
    return write(tmp_path / "inf.safetensors", {TOKENS_KEY: tokens}, valid_metadata()), "NaN or infinite"


def _site_names_length(tmp_path):
    return write(tmp_path / "names.safetensors", {TOKENS_KEY: make_context().tokens},
                 valid_metadata(site_names=json.dumps(SITES[:15]))), "'anima.site_names' must list 16"


def _site_names_not_json(tmp_path):
    return write(tmp_path / "names2.safetensors", {TOKENS_KEY: make_context().tokens},
                 valid_metadata(site_names="[oops")), "'anima.site_names' is not valid JSON"


def _site_names_missing(tmp_path):
    return write(tmp_path / "names3.safetensors", {TOKENS_KEY: make_context().tokens},
                 valid_metadata(site_names=None)), "'anima.site_names' must list 16"


def _site_weights_wrong_shape(tmp_path):
    return write(tmp_path / "sw.safetensors", {TOKENS_KEY: make_context().tokens, SITE_WEIGHTS_KEY: torch.ones(15)},
                 valid_metadata()), "'anima.site_weights' must be a float vector of 16"


def _training_not_object(tmp_path):
    return write(tmp_path / "tr.safetensors", {TOKENS_KEY: make_context().tokens}, valid_metadata(training="[1, 2]")), \
        "'anima.training' must be a JSON dict"


def _bad_default_scale(tmp_path):
    return write(tmp_path / "ds.safetensors", {TOKENS_KEY: make_context().tokens},
                 valid_metadata(default_scale="9")), "default scale must be from 0 to 4"


HEADER_CASES = [
    _random_bytes, _zero_bytes, _seven_bytes, _truncated, _huge_header_length, _header_longer_than_file,
    _header_not_json, _missing_tokens, _wrong_rank, _wrong_rank_4, _int_tokens, _n_sites_mismatch,
    _context_dim_mismatch, _n_tokens_not_int, _n_sites_missing, _future_version, _missing_version, _no_metadata,
    _bad_arch, _site_names_length, _site_names_not_json, _site_names_missing, _site_weights_wrong_shape,
]
CONTENT_CASES = [_nan_tokens, _inf_tokens, _training_not_object, _bad_default_scale]


@pytest.mark.parametrize("case", HEADER_CASES + CONTENT_CASES, ids=lambda c: c.__name__.strip("_"))
def test_bad_file_load(tmp_path, case):
    path, problem = case(tmp_path)
    with pytest.raises(ContextFileError) as err:
        load_context(path)
    assert err.value.path == path
    assert repr(path) in str(err.value), str(err.value)
    assert problem in str(err.value), str(err.value)


@pytest.mark.parametrize("case", HEADER_CASES, ids=lambda c: c.__name__.strip("_"))
def test_bad_file_inspect(tmp_path, case):
    path, problem = case(tmp_path)
    with pytest.raises(ContextFileError) as err:
        inspect_file(path)
    assert err.value.path == path and problem in str(err.value), str(err.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nothere.safetensors")
    with pytest.raises(ContextFileError, match="cannot be read") as err:
        load_context(path)
    assert err.value.path == path


def test_good_file_passes_both(tmp_path):
    path = _good_file(tmp_path)
    assert inspect_file(path).n_sites == 16
    assert torch.equal(load_context(path).tokens, make_context(seed=9).tokens)


# ---- the contexts folder -------------------------------------------------------------------------------------


def _bump_mtime(path: str, seconds: int = 10) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_library_refresh_add_change_delete(tmp_path):
    lib = ContextLibrary(str(tmp_path / "contexts"))
    lib.refresh()
    assert lib.names() == [] and lib.errors() == {}
    folder = tmp_path / "contexts"
    make_context(seed=1).save(str(folder / "b.safetensors"))
    make_context(seed=2, n_tokens=8).save(str(folder / "a.safetensors"))
    (folder / "readme.txt").write_text("not a context")
    (folder / "notes.safetensors.bak").write_bytes(b"junk")
    assert lib.names() == []  # nothing seen before refresh
    lib.refresh()
    assert lib.names() == ["a", "b"]
    assert lib.errors() == {}
    assert lib.info("a").n_tokens == 8

    # change: same size (same shapes), different tokens; mtime moved on
    make_context(seed=3, n_tokens=8).save(str(folder / "a.safetensors"))
    _bump_mtime(str(folder / "a.safetensors"))
    lib.refresh()
    assert torch.equal(lib.load("a").tokens, make_context(seed=3, n_tokens=8).tokens)

    # change of shape: seen by info after refresh
    make_context(seed=3, n_tokens=2).save(str(folder / "a.safetensors"))
    _bump_mtime(str(folder / "a.safetensors"), 20)
    lib.refresh()
    assert lib.info("a").n_tokens == 2

    os.remove(folder / "b.safetensors")
    lib.refresh()
    assert lib.names() == ["a"]
    with pytest.raises(ArgumentError, match="unknown anima context 'b'"):
        lib.info("b")
    with pytest.raises(ArgumentError, match="unknown anima context 'b'"):
        lib.load("b")


def test_library_corrupt_files_listed_in_errors(tmp_path):
    folder = tmp_path
    make_context(seed=1).save(str(folder / "good.safetensors"))
    (folder / "bad.safetensors").write_bytes(random.Random(1).randbytes(500))
    (folder / "empty.safetensors").write_bytes(b"")
    write(folder / "nan.safetensors", {TOKENS_KEY: torch.full((16, 4, 64), float("nan"))}, valid_metadata())
    lib = ContextLibrary(str(folder))
    lib.refresh()
    errors = lib.errors()
    assert set(errors) == {"bad", "empty", "nan"}
    assert "bad.safetensors" in errors["bad"] and "not a safetensors file" in errors["bad"]
    assert "empty.safetensors" in errors["empty"] and "empty" in errors["empty"]
    assert "nan.safetensors" in errors["nan"] and "NaN" in errors["nan"]  # refresh reads the tensors too
    assert lib.names() == ["good"]
    assert torch.equal(lib.load("good").tokens, make_context(seed=1).tokens)
    with pytest.raises(ArgumentError, match="not a safetensors file"):
        lib.load("bad")
    with pytest.raises(ArgumentError, match="not a safetensors file"):
        lib.info("bad")
    # the file counts as broken until it changes
    assert "nan" in lib.errors() and "nan" not in lib.names()
    with pytest.raises(ArgumentError, match="NaN"):
        lib.load("nan")
    # repaired: picked up again
    make_context(seed=5).save(str(folder / "nan.safetensors"))
    _bump_mtime(str(folder / "nan.safetensors"))
    assert torch.equal(lib.load("nan").tokens, make_context(seed=5).tokens)
    lib.refresh()
    assert "nan" in lib.names() and "nan" not in lib.errors()


def test_library_load_caches_until_the_file_changes(tmp_path):
    path = str(tmp_path / "c.safetensors")
    make_context(seed=1).save(path)
    lib = ContextLibrary(str(tmp_path))
    lib.refresh()
    first = lib.load("c")
    assert lib.load("c") is first
    lib.refresh()
    assert lib.load("c") is first  # refresh of an unchanged file keeps the loaded context
    make_context(seed=2).save(path)
    _bump_mtime(path)
    second = lib.load("c")  # no refresh needed: load re-stats the file
    assert second is not first
    assert torch.equal(second.tokens, make_context(seed=2).tokens)
    assert second.sha256 != first.sha256
    assert lib.load("c") is second


def test_library_load_without_refresh_and_unknown_names(tmp_path):
    make_context(seed=1).save(str(tmp_path / "x.safetensors"))
    lib = ContextLibrary(str(tmp_path))
    assert lib.load("x").name == "x"
    for name in ("nope", "X.safetensors"):
        with pytest.raises(ArgumentError, match="unknown anima context"):
            lib.load(name)
    for name in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ArgumentError):
            lib.load(name)


def test_library_ignores_invalid_names(tmp_path):
    make_context().save(str(tmp_path / ".hidden.safetensors"))
    make_context().save(str(tmp_path / "CON.safetensors"))
    make_context().save(str(tmp_path / "ok.safetensors"))
    os.mkdir(tmp_path / "dir.safetensors")
    lib = ContextLibrary(str(tmp_path))
    lib.refresh()
    assert lib.names() == ["ok"] and lib.errors() == {}


def test_library_find(tmp_path):
    make_context().save(str(tmp_path / "MyStyle.safetensors"))
    lib = ContextLibrary(str(tmp_path))
    lib.refresh()
    assert lib.find("MyStyle") == "MyStyle"
    assert lib.find("mystyle") == "MyStyle"
    assert lib.find("other") is None
