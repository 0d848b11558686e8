"""The contexts folder: which contexts exist, cached by path and modification time; and its file operations.

Refresh validates every new or changed file completely (header, shapes, dtypes and the tensor data: NaN/Inf,
corrupt bytes), so a bad file is listed under ``errors()`` with its problem and skipped, never offered. Loaded
contexts are kept per file version: a context used by many generations is read from disk once.

Delete, rename and import take the library's lock and keep a context's sidecar files (previews, ``name.json``)
with it; every write is atomic (:mod:`lib_anima.fileio`).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from lib_anima.context import MAX_FILE_BYTES, ContextInfo, ReferenceContext, inspect_file, load_context
from lib_anima.errors import (
    AnimaError,
    ArgumentError,
    ContextExistsError,
    ContextFileError,
    UnknownContextError,
)
from lib_anima.fileio import fsync_directory, place, remove_quietly, sweep_stale_temp_files, write_temp
from lib_anima.names import (
    CONTEXT_SUFFIX,
    PREVIEW_EXTENSIONS,
    context_path,
    name_problem,
    sidecar_path,
    sidecar_suffixes,
)

log = logging.getLogger("anima")


@dataclass
class _Entry:
    stamp: tuple[int, int]  # (mtime_ns, size): a change of either means the file changed
    info: ContextInfo | None
    error: str | None
    loaded: ReferenceContext | None = None


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class ContextLibrary:
    """Contexts in one folder. `refresh()` picks up added, changed and deleted files."""

    def __init__(self, directory: str):
        self.directory = directory
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self.load_count = 0  # files read by load(): lets tests check that a context is not loaded twice

    # ---- reading ------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        with self._lock:
            try:
                os.makedirs(self.directory, exist_ok=True)
                file_names = sorted(os.listdir(self.directory))
            except OSError as e:
                raise AnimaError(f"the contexts folder {self.directory!r} cannot be read ({e.strerror or e})") from None
            sweep_stale_temp_files(self.directory)
            seen: dict[str, _Entry] = {}
            for file_name in file_names:
                name, ext = os.path.splitext(file_name)
                if ext != CONTEXT_SUFFIX or name_problem(name):
                    continue
                path = os.path.join(self.directory, file_name)
                try:
                    if not os.path.isfile(path):
                        continue
                    seen[name] = self._entry_for(name, path)
                except OSError as e:  # vanished or unreadable between listdir and now
                    if os.path.lexists(path):
                        seen[name] = _Entry((0, 0), None, f"anima context {path!r}: cannot be read ({e.strerror or e})")
            self._entries = seen

    def _entry_for(self, name: str, path: str) -> _Entry:
        stamp = _stamp(path)
        old = self._entries.get(name)
        if old is not None and old.stamp == stamp:
            return old
        try:
            info = inspect_file(path)
            # Read the tensors too: NaN/Inf or corrupt data must be reported now, not at the first generation.
            checked = load_context(path, name)
            info.sha256 = checked.sha256 or ""
            return _Entry(stamp, info, None)
        except AnimaError as e:
            log.warning("anima: skipping %s", e)
            return _Entry(stamp, None, str(e))

    def names(self) -> list[str]:
        """Names of the valid contexts."""
        with self._lock:
            return [n for n, e in self._entries.items() if e.info is not None]

    def errors(self) -> dict[str, str]:
        """Files that could not be read, with why."""
        with self._lock:
            return {n: e.error for n, e in self._entries.items() if e.error is not None}

    def info(self, name: str) -> ContextInfo:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UnknownContextError(f"unknown anima context {name!r} (not in {self.directory})")
        if entry.info is None:
            raise ArgumentError(entry.error or f"context {name!r} is invalid")
        return entry.info

    def path(self, name: str) -> str:
        return context_path(self.directory, name)

    def load(self, name: str) -> ReferenceContext:
        """The full context, loaded once per file version; re-stats the file so edits are seen."""
        with self._lock:
            path = self.path(name)
            if not os.path.isfile(path):
                self._entries.pop(name, None)
                raise UnknownContextError(f"unknown anima context {name!r} (not in {self.directory})")
            try:
                entry = self._entry_for(name, path)
            except OSError as e:
                raise ArgumentError(f"anima context {path!r}: cannot be read ({e.strerror or e})") from None
            self._entries[name] = entry
            if entry.error is not None:
                raise ArgumentError(entry.error)
            if entry.loaded is None:
                try:
                    entry.loaded = load_context(path, name)
                    self.load_count += 1
                except AnimaError as e:
                    entry.info, entry.error = None, str(e)
                    raise
            return entry.loaded

    def find(self, name_or_hash: str) -> str | None:
        """The name of a context by its exact or case-insensitive name (None when there is none)."""
        with self._lock:
            if name_or_hash in self._entries:
                return name_or_hash
            lowered = {n.lower(): n for n in self._entries}
            return lowered.get(name_or_hash.lower())

    def preview(self, name: str) -> str | None:
        """The preview image beside the context (``name.png``, ``name.preview.png``, ... as the host looks), if any."""
        for ext in PREVIEW_EXTENSIONS:
            for infix in ("", ".preview"):
                path = sidecar_path(self.directory, name, f"{infix}.{ext}")
                if os.path.isfile(path):
                    return path
        return None

    def file_path(self, name: str) -> str:
        """The path of an existing context file (valid or not), for download; UnknownContextError otherwise."""
        path = self.path(name)
        if not os.path.isfile(path):
            raise UnknownContextError(f"unknown anima context {name!r} (not in {self.directory})")
        return path

    # ---- changing ------------------------------------------------------------------------------------------

    def _sidecars(self, name: str) -> list[tuple[str, str]]:
        """(suffix, path) of the sidecar files of `name` that exist."""
        found = []
        for suffix in sidecar_suffixes():
            path = sidecar_path(self.directory, name, suffix)
            if os.path.isfile(path):
                found.append((suffix, path))
        return found

    def delete(self, name: str) -> list[str]:
        """Remove the context file and its previews and ``name.json``; returns the removed paths."""
        with self._lock:
            path = self.file_path(name)
            sidecars = [p for _, p in self._sidecars(name)]
            os.unlink(path)  # first: the context is gone at once, even if a sidecar cannot be removed
            removed = [path]
            for sidecar in sidecars:
                try:
                    os.unlink(sidecar)
                    removed.append(sidecar)
                except OSError as e:
                    log.warning("anima: could not remove %s: %s", sidecar, e)
            fsync_directory(self.directory)
            self._entries.pop(name, None)
            return removed

    def rename(self, name: str, new_name: str, overwrite: bool = False) -> ContextInfo:
        """Rename the file and its sidecars. A context's name is its file name, so the file is moved unchanged."""
        with self._lock:
            src = self.file_path(name)
            dst = self.path(new_name)
            if src == dst:
                return self._refresh_one(new_name)
            exists = os.path.exists(dst)
            if exists and not overwrite:
                raise ContextExistsError(f"a context named {new_name!r} already exists; choose another name or overwrite")
            moving = self._sidecars(name)
            if overwrite:
                stale = {s for s, _ in self._sidecars(new_name)} - {s for s, _ in moving}
                os.replace(src, dst)
                for suffix in stale:  # the replaced context's preview must not show on the new one
                    remove_quietly(sidecar_path(self.directory, new_name, suffix))
            else:
                try:
                    os.link(src, dst)  # no-clobber even if another request creates new_name right now
                except FileExistsError:
                    raise ContextExistsError(f"a context named {new_name!r} already exists") from None
                except OSError:
                    os.replace(src, dst)  # no hard links on this file system
                else:
                    os.unlink(src)
            for suffix, path in moving:
                try:
                    os.replace(path, sidecar_path(self.directory, new_name, suffix))
                except OSError as e:
                    log.warning("anima: could not move %s: %s", path, e)
            fsync_directory(self.directory)
            self._entries.pop(name, None)
            self._entries.pop(new_name, None)
            return self._refresh_one(new_name)

    def import_bytes(self, name: str, data: bytes, overwrite: bool = False) -> ContextInfo:
        """Add a context file from bytes (an upload): checked completely before it takes the name.

        The bytes go to a temporary file in the folder, are validated exactly as loading does (format, shapes,
        dtypes, NaN/Inf), and only then renamed onto ``name.safetensors``; anything invalid leaves the folder as
        it was.
        """
        path = self.path(name)
        if not data:
            raise ArgumentError("the uploaded file is empty (0 bytes)")
        if len(data) > MAX_FILE_BYTES:
            raise ArgumentError(f"the uploaded file is {len(data)} bytes; a context file may be at most {MAX_FILE_BYTES}")
        with self._lock:
            if os.path.exists(path) and not overwrite:
                raise ContextExistsError(f"a context named {name!r} already exists; choose another name or overwrite")
            tmp = write_temp(self.directory, data)
            try:
                try:
                    load_context(tmp, name)
                except ContextFileError as e:
                    raise ArgumentError(f"the uploaded file {e.problem}") from None
                try:
                    place(tmp, path, overwrite=overwrite)
                except FileExistsError:
                    raise ContextExistsError(f"a context named {name!r} already exists") from None
            finally:
                remove_quietly(tmp)
            self._entries.pop(name, None)
            return self._refresh_one(name)

    def _refresh_one(self, name: str) -> ContextInfo:
        path = self.path(name)
        entry = self._entry_for(name, path)
        self._entries[name] = entry
        if entry.info is None:
            raise ArgumentError(entry.error or f"context {name!r} is invalid")
        return entry.info
