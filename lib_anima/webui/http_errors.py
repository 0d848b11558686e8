"""HTTP answers for errors, shared by every route: the status comes from the error's class
(:func:`lib_anima.errors.http_status`), and body-size limits are enforced before a route parses its body."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fastapi import HTTPException

from lib_anima.errors import AnimaError, http_status


def http_error(e: Exception) -> HTTPException:
    """The HTTPException for an error a route caught: 400/404/409/413 by class; 500 for the server's disk."""
    status = http_status(e)
    if status == 500:  # an OSError: say what happened, without a traceback
        return HTTPException(status_code=500, detail=f"file system error: {getattr(e, 'strerror', None) or e}")
    return HTTPException(status_code=status, detail=str(e))


@contextlib.contextmanager
def error_answers() -> Iterator[None]:
    """Around a route's work: an AnimaError (the request) or an OSError (the server's disk) is answered as
    :func:`http_error` says; anything else stays a bug (500 with the host's traceback)."""
    try:
        yield
    except (AnimaError, OSError) as e:
        raise http_error(e) from None


def error_body(detail: str) -> dict[str, str]:
    """The host's error shape (modules/api/api.py answers HTTPExceptions with these keys)."""
    return {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}


def replaying(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that first gives the whole `body` (already read by a check) and then the client's own."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def limit_body(route: Any, limit: int) -> None:
    """Refuse a body over `limit` bytes with 413 before the route reads and parses it.

    FastAPI reads and parses a JSON body before any dependency or endpoint runs, so the limit wraps the route's
    ASGI app: a declared Content-Length over the limit is answered at once, and a body without one (chunked) is
    read only up to the limit, then replayed to the route.
    """
    from starlette.responses import JSONResponse

    inner = route.app

    async def app(scope: dict, receive, send) -> None:
        if scope.get("type") != "http":
            await inner(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"the body is over {limit} bytes; at most {limit} are accepted"
        if declared is not None:
            try:
                if int(declared) > limit:
                    await JSONResponse(status_code=413, content=error_body(too_large))(scope, receive, send)
                    return
            except ValueError:
                await JSONResponse(status_code=400, content=error_body("Content-Length is not a number"))(
                    scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await JSONResponse(status_code=413, content=error_body(too_large))(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await inner(scope, replaying(b"".join(chunks), receive), send)

    route.app = app
