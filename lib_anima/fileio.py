"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

The recipe: write a temporary file in the same folder (same file system, so the rename cannot turn into a
copy), flush and fsync it, rename it over the target (atomic on POSIX and on Windows via ``os.replace``), fsync
the folder so the rename itself survives a power cut. A process killed at any point leaves the target as it was
or complete (``tests/core/test_atomic_kill.py`` kills writers mid-write to check), plus at worst a stray
``.anima-*.tmp`` file, which the library ignores and sweeps up after a while.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time

TEMP_PREFIX = ".anima-"
TEMP_SUFFIX = ".tmp"


def write_temp(directory: str, data: bytes) -> str:
    """`data` in a new fsync'd temporary file inside `directory`; returns its path (the caller renames or removes it)."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
    except BaseException:
        remove_quietly(tmp_path)
        raise
    return tmp_path


def place(tmp_path: str, path: str, overwrite: bool = True) -> None:
    """Move the finished temporary file onto `path` atomically.

    Without `overwrite`, an existing `path` is never replaced (FileExistsError), checked and done in one step by
    a hard link, so two uploads racing for one name cannot both win. The temporary file is gone afterwards.
    """
    try:
        if overwrite:
            os.replace(tmp_path, path)
        else:
            _link_no_clobber(tmp_path, path)
    finally:
        remove_quietly(tmp_path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def _link_no_clobber(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # fails with EEXIST if dst exists: the check and the write are one operation
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # file systems without hard links (FAT, some network mounts): check, then rename; a race is possible
        if os.path.exists(dst):
            raise FileExistsError(errno.EEXIST, "file exists", dst) from None
        os.replace(src, dst)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync'd, then renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    place(write_temp(directory, data), path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep_stale_temp_files(directory: str, older_than_s: float = 3600.0) -> list[str]:
    """Remove temporary files a killed writer left behind (only old ones: a live writer may own a young one)."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > older_than_s:
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
