"""One place turns errors into HTTP status codes, by class; the message text never decides."""

from __future__ import annotations

import pytest

from lib_anima.errors import (
    AnimaError,
    ArgumentError,
    ContextExistsError,
    ContextFileError,
    TooLargeError,
    TrainingBusy,
    UnknownContextError,
    http_status,
)


@pytest.mark.parametrize(("error", "status"), [
    (UnknownContextError("unknown anima context 'x'"), 404),
    (ContextExistsError("a context named 'x' already exists"), 409),
    (TrainingBusy("a training is already running"), 409),
    (TooLargeError("the images have too many pixels"), 413),
    (ContextFileError("/x.safetensors", "truncated"), 400),
    (ArgumentError("learning rate 'already exists': not a number"), 400),  # the words do not make it a 409
    (AnimaError("unknown anima context: already exists"), 400),
    (OSError(28, "No space left on device"), 500),
])
def test_status_comes_from_the_class(error, status):
    assert http_status(error) == status


def test_name_taken_is_still_an_argument_error_for_callers_that_catch_those():
    assert isinstance(ContextExistsError("x"), ArgumentError) and isinstance(UnknownContextError("x"), ArgumentError)
