"""A contexts folder with every kind of bad file: each is reported with its problem and skipped, the others load."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from lib_anima.context import MAX_FILE_BYTES, TOKENS_KEY, ReferenceContext
from lib_anima.errors import AnimaError, ArgumentError
from lib_anima.library import ContextLibrary

SITES = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(16)]


def good(seed: int = 0, n_tokens: int = 4) -> ReferenceContext:
    g = torch.Generator().manual_seed(seed)
    return ReferenceContext(tokens=torch.randn(16, n_tokens, 64, generator=g), arch="sd1", site_names=SITES)


def _raw(path, tensors: dict, **meta_changes) -> None:
    meta = good().metadata()
    meta.update({"anima." + k: v for k, v in meta_changes.items()})
    save_file(tensors, str(path), metadata=meta)


def _header_only(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def make_bad_files(folder) -> dict[str, str]:
    """Write one file per kind of damage; returns name -> words its error must contain."""
    full = good(1).to_bytes()
    (folder / "zero.safetensors").write_bytes(b"")
    (folder / "random.safetensors").write_bytes(os.urandom(3000))
    (folder / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    (folder / "tiny.safetensors").write_bytes(b"\x01\x02")
    _raw(folder / "int_dtype.safetensors", {TOKENS_KEY: torch.ones(16, 4, 64, dtype=torch.int32)})
    _raw(folder / "rank2.safetensors", {TOKENS_KEY: torch.ones(16, 64)})
    _raw(folder / "shape_lie.safetensors", {TOKENS_KEY: torch.ones(16, 4, 64)}, n_tokens="5")
    _raw(folder / "nan.safetensors", {TOKENS_KEY: torch.full((16, 4, 64), float("nan"))})
    inf = torch.zeros(16, 4, 64)
    inf[3, 2, 1] = float("inf")
    _raw(folder / "one_inf.safetensors", {TOKENS_KEY: inf})
    _raw(folder / "future.safetensors", {TOKENS_KEY: torch.ones(16, 4, 64)}, format_version="99")
    save_file({TOKENS_KEY: torch.ones(16, 4, 64)}, str(folder / "no_meta.safetensors"))
    with open(folder / "huge.safetensors", "wb") as f:  # sparse: costs no disk space
        f.truncate(MAX_FILE_BYTES + 1)
    _header_only(folder / "beyond_end.safetensors",
                 {TOKENS_KEY: {"dtype": "F32", "shape": [16, 4, 64], "data_offsets": [0, 16 * 4 * 64 * 4]}})
    (folder / "huge_header.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    _header_only(folder / "not_object.safetensors", [1, 2, 3])  # type: ignore[arg-type]
    return {
        "zero": "empty (0 bytes)",
        "random": "not a safetensors file",
        "truncated": "truncated or corrupt",
        "tiny": "shorter than its 8-byte header",
        "int_dtype": "float type is required",
        "rank2": "rank 3",
        "shape_lie": "says 5 but the tokens have 4",
        "nan": "NaN",
        "one_inf": "infinite",
        "future": "format version '99'",
        "no_meta": "not an anima context",
        "huge": f"at most {MAX_FILE_BYTES} bytes",
        "beyond_end": "beyond the end of the file",
        "huge_header": "header length out of range",
        "not_object": "not a JSON object",
    }


def test_every_bad_file_is_reported_and_skipped(tmp_path):
    expected = make_bad_files(tmp_path)
    good(2).save(str(tmp_path / "fine.safetensors"))
    good(3, n_tokens=8).save(str(tmp_path / "fine2.safetensors"))
    library = ContextLibrary(str(tmp_path))
    library.refresh()
    assert library.names() == ["fine", "fine2"]
    errors = library.errors()
    assert set(errors) == set(expected)
    for name, words in expected.items():
        assert f"{name}.safetensors" in errors[name], errors[name]  # names the file
        assert words in errors[name], f"{name}: {errors[name]!r} lacks {words!r}"
        with pytest.raises(ArgumentError, match="anima context"):
            library.load(name)
    assert torch.equal(library.load("fine").tokens, good(2).tokens)
    assert library.load("fine2").n_tokens == 8


def test_directories_links_and_odd_entries_do_not_break_refresh(tmp_path):
    good(1).save(str(tmp_path / "ok.safetensors"))
    os.mkdir(tmp_path / "folder.safetensors")
    os.symlink(tmp_path / "missing.bin", tmp_path / "dangling.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".anima-123.tmp").write_bytes(b"half a file")  # a killed writer's leftover
    library = ContextLibrary(str(tmp_path))
    library.refresh()
    assert library.names() == ["ok"]
    assert library.errors() == {}


def test_a_file_that_goes_bad_is_moved_to_errors_on_refresh(tmp_path):
    path = tmp_path / "c.safetensors"
    good(1).save(str(path))
    library = ContextLibrary(str(tmp_path))
    library.refresh()
    assert library.names() == ["c"]
    data = path.read_bytes()
    path.write_bytes(data[:100])
    library.refresh()
    assert library.names() == [] and "c" in library.errors()
    good(1).save(str(path))
    library.refresh()
    assert library.names() == ["c"] and library.errors() == {}


def test_unreadable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("x")
    library = ContextLibrary(str(blocker))
    with pytest.raises(AnimaError, match="cannot be read"):
        library.refresh()
