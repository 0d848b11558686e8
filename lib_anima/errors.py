"""Errors the extension raises for bad input; each message says what is wrong and where."""


class AnimaError(ValueError):
    """Base class: a user-facing, specific error (bad file, bad argument, mismatch)."""


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
