"""Context names: what a file in the contexts folder may be called, and safe paths for them."""

from __future__ import annotations

import os
import re

MAX_NAME_LENGTH = 100
CONTEXT_SUFFIX = ".safetensors"

# ":" "<" ">" would break <anima:name:scale>, "," ";" the infotext entry; the rest are path or shell hazards.
_FORBIDDEN_CHARS = set('/\\:<>"|?*,;')
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


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
    bad = sorted(_FORBIDDEN_CHARS.intersection(name))
    if bad:
        return f"the name contains {' '.join(bad)}, which are not allowed (path separators and prompt syntax)"
    if name.startswith("."):
        return "the name starts with '.'"
    if _WINDOWS_RESERVED.match(name):
        return f"{name!r} is a reserved device name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8"
    return None


def check_name(name: object) -> str:
    """Return `name` if it is a valid context name, else raise ArgumentError saying why."""
    from lib_anima.errors import ArgumentError

    problem = name_problem(name)
    if problem:
        raise ArgumentError(f"invalid context name {name!r}: {problem}")
    return name  # type: ignore[return-value]


def context_path(directory: str, name: str) -> str:
    """The file path of context `name` inside `directory`, refusing anything that escapes it."""
    from lib_anima.errors import ArgumentError

    check_name(name)
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name + CONTEXT_SUFFIX))
    if os.path.dirname(path) != root:
        raise ArgumentError(f"context name {name!r} resolves outside the contexts folder")
    return path
