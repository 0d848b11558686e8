"""Context names: what a file in the contexts folder may be called, and safe paths for them.

Every front end (prompt, panel, API routes, Train tab) passes names through :func:`check_name` before a path is
built from one, and :func:`context_path` / :func:`sidecar_path` refuse anything that would leave the folder.
"""

from __future__ import annotations

import os
import re
import unicodedata

MAX_NAME_LENGTH = 100
# File systems limit a file name to 255 bytes; 100 four-byte characters would pass the length check and then
# fail in open() (ENAMETOOLONG). The margin leaves room for ".preview.webp" and the temporary files' affixes.
MAX_NAME_BYTES = 200
CONTEXT_SUFFIX = ".safetensors"
# What the host's Extra Networks page looks for beside a file (modules/ui_extra_networks.py).
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
METADATA_SUFFIX = ".json"

# ":" "<" ">" would break <anima:name:scale>, "," ";" the infotext entry; the rest are path or shell hazards.
_FORBIDDEN_CHARS = set('/\\:<>"|?*,;')
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)
# Control, format (bidi overrides, zero-width), surrogate and private-use characters: invisible or ambiguous.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co"}


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a context name, or None when it can."""
    if not isinstance(name, str):
        return f"a name must be text, not {type(name).__name__}"
    if not name.strip():
        return "the name is empty"
    if name != name.strip():
        return "the name starts or ends with white space"
    if len(name) > MAX_NAME_LENGTH:
        return f"the name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "the name contains a control character (NUL, newline, ...)"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8 (it contains a lone surrogate)"
    if len(encoded) > MAX_NAME_BYTES:
        return f"the name is {len(encoded)} bytes in UTF-8; at most {MAX_NAME_BYTES} are allowed"
    if any(unicodedata.category(ch) in _HIDDEN_CATEGORIES for ch in name):
        return "the name contains an invisible or formatting character (zero-width, direction override, ...)"
    bad = sorted(_FORBIDDEN_CHARS.intersection(name))
    if bad:
        return f"the name contains {' '.join(bad)}, which are not allowed (path separators and prompt syntax)"
    if name.startswith("."):
        return "the name starts with '.'"
    if name.endswith("."):
        return "the name ends with '.' (Windows drops it, so two names would share one file)"
    if _WINDOWS_RESERVED.match(name):
        return f"{name!r} is a reserved device name"
    return None


def check_name(name: object) -> str:
    """Return `name` if it is a valid context name, else raise ArgumentError saying why."""
    from lib_anima.errors import ArgumentError

    problem = name_problem(name)
    if problem:
        raise ArgumentError(f"invalid context name {_shown(name)}: {problem}")
    return name  # type: ignore[return-value]


def _shown(name: object, limit: int = 60) -> str:
    """`name` for an error message: repr (escapes NUL, surrogates), cut short so a 1 MB name is not echoed."""
    text = repr(name)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def context_path(directory: str, name: str) -> str:
    """The file path of context `name` inside `directory`, refusing anything that escapes it."""
    return sidecar_path(directory, name, CONTEXT_SUFFIX)


def sidecar_path(directory: str, name: str, suffix: str) -> str:
    """``directory/name + suffix`` (the context file, its preview or its user metadata), checked to stay inside."""
    from lib_anima.errors import ArgumentError

    check_name(name)
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name + suffix))
    if os.path.dirname(path) != root:
        raise ArgumentError(f"context name {name!r} resolves outside the contexts folder")
    return path


def sidecar_suffixes() -> list[str]:
    """Suffixes of the files that belong to a context besides the context itself: previews and user metadata."""
    previews = [f"{infix}.{ext}" for ext in PREVIEW_EXTENSIONS for infix in ("", ".preview")]
    return [*previews, METADATA_SUFFIX]


def check_directory(path: object, roots: list[str], what: str = "directory", outside_hint: str = "") -> str:
    """`path` resolved (symlinks followed) if it lies inside one of `roots`, else an ArgumentError (ending in
    `outside_hint` when it lies outside them).

    Refuses what is not text, NUL, lone surrogates and over-long paths before touching the file system.
    """
    from lib_anima.errors import ArgumentError

    if not isinstance(path, str) or not path.strip():
        raise ArgumentError(f"the {what} must be a non-empty path")
    if "\x00" in path:
        raise ArgumentError(f"the {what} contains a NUL character")
    if len(path) > 4096:
        raise ArgumentError(f"the {what} is {len(path)} characters long; at most 4096 are allowed")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ArgumentError(f"the {what} is not valid UTF-8") from None
    real = os.path.realpath(os.path.expanduser(path.strip()))
    real_roots = [os.path.realpath(r) for r in roots if r and r.strip()]
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in real_roots):
        raise ArgumentError(f"the {what} {_shown(path)} is outside the allowed folders ({', '.join(real_roots)})"
                            + (f"; {outside_hint}" if outside_hint else ""))
    return real
