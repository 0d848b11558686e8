"""The contexts folder: which contexts exist, cached by path and modification time."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from lib_anima.context import ContextInfo, ReferenceContext, file_sha256, inspect_file, load_context
from lib_anima.errors import AnimaError, ArgumentError
from lib_anima.names import CONTEXT_SUFFIX, context_path, name_problem

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

    def refresh(self) -> None:
        with self._lock:
            os.makedirs(self.directory, exist_ok=True)
            seen: dict[str, _Entry] = {}
            for file_name in sorted(os.listdir(self.directory)):
                name, ext = os.path.splitext(file_name)
                if ext != CONTEXT_SUFFIX or name_problem(name):
                    continue
                path = os.path.join(self.directory, file_name)
                if not os.path.isfile(path):
                    continue
                seen[name] = self._entry_for(name, path)
            self._entries = seen

    def _entry_for(self, name: str, path: str) -> _Entry:
        stamp = _stamp(path)
        old = self._entries.get(name)
        if old is not None and old.stamp == stamp:
            return old
        try:
            info = inspect_file(path)
            info.sha256 = file_sha256(path)
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
            raise ArgumentError(f"unknown anima context {name!r} (not in {self.directory})")
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
                raise ArgumentError(f"unknown anima context {name!r} (not in {self.directory})")
            entry = self._entry_for(name, path)
            self._entries[name] = entry
            if entry.error is not None:
                raise ArgumentError(entry.error)
            if entry.loaded is None:
                try:
                    entry.loaded = load_context(path, name)
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
