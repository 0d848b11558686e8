"""A writer killed (SIGKILL) in the middle of a save leaves the old file or the new one, never a truncated one.

A subprocess saves two different contents to one path in a tight loop; the test kills it at random moments and
reads what is there. The same harness run with a naive writer (open + write in place) must catch a truncated
file, which shows the check can fail.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from lib_anima.context import ReferenceContext, load_context
from lib_anima.fileio import TEMP_PREFIX, atomic_write_bytes, sweep_stale_temp_files
from lib_anima.library import ContextLibrary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILLS = 20
SIZE_A, SIZE_B = 6 << 20, 9 << 20  # different sizes and bytes: any mix of the two is detectable

BYTES_WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from lib_anima.fileio import atomic_write_bytes
path, mode = sys.argv[2], sys.argv[3]
contents = [b"A" * int(sys.argv[4]), b"B" * int(sys.argv[5])]
print("ready", flush=True)
i = 0
while True:
    data = contents[i % 2]
    if mode == "atomic":
        atomic_write_bytes(path, data)
    else:  # what a careless save does: truncate the target, then write it in pieces
        with open(path, "wb") as f:
            for k in range(0, len(data), 1 << 20):
                f.write(data[k:k + (1 << 20)])
                f.flush()
    i += 1
"""

CONTEXT_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from lib_anima.context import ReferenceContext
sites = [f"s{i}" for i in range(16)]
contexts = [ReferenceContext(tokens=torch.full((16, 64, 768), float(v)), arch="sd1", site_names=sites) for v in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    contexts[i % 2].save(sys.argv[2])
    i += 1
"""


def _kill_during_writes(script: str, args: list[str], kills: int, seed: int) -> list[bytes]:
    """Start the writer `kills` times, SIGKILL it at a random moment each time; the file's bytes after each kill."""
    rng = random.Random(seed)
    seen = []
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", script, ROOT, *args], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with open(args[0], "rb") as f:
            seen.append(f.read())
    return seen


def test_atomic_write_survives_kill_mid_write(tmp_path):
    path = str(tmp_path / "file.bin")
    atomic_write_bytes(path, b"A" * SIZE_A)
    seen = _kill_during_writes(BYTES_WRITER, [path, "atomic", str(SIZE_A), str(SIZE_B)], KILLS, seed=1)
    valid = {b"A" * SIZE_A, b"B" * SIZE_B}
    bad = [len(data) for data in seen if data not in valid]
    assert not bad, f"{len(bad)} of {KILLS} kills left a partial file (sizes {bad})"
    assert {data[:1] for data in seen} == {b"A", b"B"}, "both versions should have been seen (the writer ran)"


def test_naive_write_is_caught_truncated(tmp_path):
    """The control: the same kills against an in-place writer do leave partial files, so the check above can fail."""
    path = str(tmp_path / "file.bin")
    atomic_write_bytes(path, b"A" * SIZE_A)
    seen = _kill_during_writes(BYTES_WRITER, [path, "naive", str(SIZE_A), str(SIZE_B)], 10, seed=2)
    valid = {b"A" * SIZE_A, b"B" * SIZE_B}
    assert any(data not in valid for data in seen), "no partial file seen: the kill harness would not catch one"


def test_context_save_survives_kill_and_folder_stays_readable(tmp_path):
    path = str(tmp_path / "ctx.safetensors")
    sites = [f"s{i}" for i in range(16)]
    versions = {}
    for value in (1, 2):
        ctx = ReferenceContext(tokens=torch.full((16, 64, 768), float(value)), arch="sd1", site_names=sites)
        versions[hashlib.sha256(ctx.to_bytes()).hexdigest()] = value
    ReferenceContext(tokens=torch.full((16, 64, 768), 1.0), arch="sd1", site_names=sites).save(path)
    seen = _kill_during_writes(CONTEXT_WRITER, [path], 3, seed=3)  # each start imports torch (~2 s)
    for data in seen:
        assert hashlib.sha256(data).hexdigest() in versions, f"a kill left a {len(data)}-byte file that is neither version"
    loaded = load_context(path)
    assert versions[loaded.sha256] == float(loaded.tokens[0, 0, 0])

    # whatever temporary files the kills left are not contexts, and a sweep removes them
    library = ContextLibrary(str(tmp_path))
    library.refresh()
    assert library.names() == ["ctx"] and library.errors() == {}
    strays = [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]
    removed = sweep_stale_temp_files(str(tmp_path), older_than_s=0)
    assert len(removed) == len(strays)
    assert os.listdir(tmp_path) == ["ctx.safetensors"]


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failure_at_each_step_keeps_the_old_file(tmp_path, monkeypatch, fail_at):
    import lib_anima.fileio as fileio

    path = str(tmp_path / "f.bin")
    atomic_write_bytes(path, b"old")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fail_at == "write":
        monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: _FailingFile(fd))
    elif fail_at == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", boom)
    else:
        monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new contents")
    monkeypatch.undo()
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"], "the temporary file must be removed"


class _FailingFile:
    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(28, "No space left on device")
