"""Errors the extension raises for bad input; each message says what is wrong and where.

The class of an error, never its text, says what kind of problem it is: :func:`http_status` is the one place
that turns an error into an HTTP status code (the routes use it; nothing matches on message text).
"""

from __future__ import annotations


class AnimaError(ValueError):
    """Base class: a user-facing, specific error (bad file, bad argument, mismatch). HTTP 400."""


class ContextFileError(AnimaError):
    """A context file is unreadable or invalid."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"anima context {path!r}: {problem}")


class ContextMismatchError(AnimaError):
    """A context does not fit the loaded model (wrong site count, context_dim or layout)."""


class ArgumentError(AnimaError):
    """A scale, mode, start/end, preset or name given by the user is invalid."""


class NotFoundError(ArgumentError):
    """The thing asked for does not exist (a context, a training job). HTTP 404."""


class ConflictError(AnimaError):
    """The request is fine but the server's state refuses it (name taken, a training runs). HTTP 409."""


class TooLargeError(ArgumentError):
    """A body or a set of inputs is over a size limit. HTTP 413."""


class UnknownContextError(NotFoundError):
    """No context file of that name in the folder."""


class ContextExistsError(ConflictError, ArgumentError):
    """The target name is taken and overwriting was not asked for."""


class TrainingBusy(ConflictError):
    """Another training is running (one at a time: they would share one model)."""


# Most specific first: the first class in an error's MRO that is listed here gives the status.
_STATUS: dict[type[BaseException], int] = {
    NotFoundError: 404,
    ConflictError: 409,
    TooLargeError: 413,
    AnimaError: 400,
}


def http_status(error: BaseException) -> int:
    """The HTTP status for `error`: 404/409/413/400 by its class; 500 for anything that is not an AnimaError
    (the server's disk or a bug, not the request)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500
