"""Checks a txt2img/img2img request's anima part before the host runs it, so a bad one gets a 422, not a 500.

Why here and not in the script: the host calls a script's ``process()`` inside its own ``try``, logs what it
raises and goes on generating, so a bad ``alwayson_scripts.anima`` would cost a whole generation and end as a
log line (or, for ``{"anima": 5}``, as a 500 from the host's own ``"args" in 5``). The guard wraps the ASGI app
of the host's two generation routes: it reads the body, and when the request uses anima (``alwayson_scripts``
or ``<anima:`` in a prompt) and something anima-related is malformed, answers 422 with the reason in the
host's error shape. Everything else, and every request that does not use anima, reaches the host untouched; a
body that cannot concern anima (no "anima" in its bytes) is not even parsed.
State-dependent problems (an unknown name, a broken file, a context for another architecture) stay warnings
in the infotext: the request itself is well formed and the image is still made.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from lib_anima.errors import AnimaError
from lib_anima.images import decode_base64, open_image
from lib_anima.units import PANEL_ARGS, units_from_script_args
from lib_anima.webui.http_errors import replaying

log = logging.getLogger("anima")

GENERATION_ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
SCRIPT_NAME = "anima"


def generation_problem(body: Any) -> str | None:
    """What is wrong with the anima part of a generation request body (parsed JSON), or None."""
    if not isinstance(body, dict):
        return None  # not an object: the host's own validation answers
    uses, problem = _script_args_problem(body)
    if problem:
        return problem
    uses = uses or any(isinstance(body.get(f), str) and "<anima:" in body[f] for f in PROMPT_FIELDS)
    if not uses:
        return None
    where = lone_surrogate_path(body)
    if where:  # JSON can carry "\ud800"; the host's tokenizer then fails with a 500
        return f"{where} is not valid Unicode text (it contains a lone surrogate escape such as \\ud800)"
    return _images_problem(body)


def lone_surrogate_path(value: Any, path: str = "body", depth: int = 0) -> str | None:
    """Where in parsed JSON a string (or key) holds a lone UTF-16 surrogate, which no UTF-8 text can; or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if depth > 64:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_path(key, f"{path} key", depth + 1) or lone_surrogate_path(item, f"{path}.{key}", depth + 1)
            if found:
                return found.encode("utf-8", "backslashreplace").decode()
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
    return None


def _script_args_problem(body: dict) -> tuple[bool, str | None]:
    scripts = body.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return False, None
    for key, value in scripts.items():
        if not (isinstance(key, str) and key.lower() == SCRIPT_NAME):
            continue
        where = f"alwayson_scripts.{key}"
        if not isinstance(value, dict):
            return True, f'{where} must be an object such as {{"args": [...]}}, got {type(value).__name__}'
        if "args" not in value:
            return True, None
        args = value["args"]
        if not isinstance(args, list):
            return True, f"{where}.args must be a list, got {type(args).__name__}"
        if len(args) > PANEL_ARGS and not isinstance(args[0], dict):
            return True, (f"{where}.args has {len(args)} values; the positional form takes at most {PANEL_ARGS} "
                          f"(enabled + 3 units of name, scale, mode, start, end, weights): "
                          f'use [{{"units": [...]}}] for more contexts')
        try:
            units = units_from_script_args(args[:PANEL_ARGS])
        except AnimaError as e:
            return True, f"{where}.args: {e}"
        return bool(units), None
    return False, None


def _images_problem(body: dict) -> str | None:
    images = body.get("init_images")
    entries = list(enumerate(images)) if isinstance(images, list) else []
    for index, data in entries:
        problem = _image_problem(data, f"init_images[{index}]")
        if problem:
            return problem
    mask = body.get("mask")
    return _image_problem(mask, "mask") if mask else None


def _image_problem(data: Any, what: str) -> str | None:
    if not isinstance(data, str):
        return f"{what} must be a base64 string, got {type(data).__name__}"
    if data.startswith(("http://", "https://")):
        return None  # the host fetches URLs itself (if allowed)
    try:
        # decoded completely (any format the host reads): a truncated file fails here, not as the host's 500
        open_image(decode_base64(data, what), what, formats=None).close()
    except AnimaError as e:
        return str(e)
    return None


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def guard(inner: ASGIApp, authorized: Callable[[dict], bool]) -> ASGIApp:
    """An ASGI app that checks the body with :func:`generation_problem`, then replays it to `inner`.

    Requests that fail `authorized` (``--api-auth``) go to `inner` unchecked, so the host answers 401 as usual.
    """
    import anyio
    from starlette.responses import JSONResponse

    async def app(scope: dict, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await inner(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = None
        if authorized(scope):
            problem = await anyio.to_thread.run_sync(_problem_of_bytes, body)
        if problem:
            content = {"error": "HTTPException", "detail": problem, "body": "", "errors": ""}  # the host's shape
            await JSONResponse(status_code=422, content=content)(scope, receive, send)
            return
        await inner(scope, replaying(body, receive), send)

    return app


# JSON may spell a letter of "anima" as an escape (\u0061 = "a"); such a body is parsed to be sure.
_ESCAPED_LETTER = re.compile(rb"\\u00[46][19dDeE]")
parsed_bodies = 0  # bodies this check parsed as JSON, for GET /anima/v1/status (requests without anima: none)


def may_concern_anima(body: bytes) -> bool:
    """False when the raw body cannot use anima: neither the script key nor ``<anima:`` can be in it without the
    letters "anima" (any case) or a JSON escape of one of them. Such bodies reach the host unparsed."""
    return b"anima" in body.lower() or _ESCAPED_LETTER.search(body) is not None


def _problem_of_bytes(body: bytes) -> str | None:
    global parsed_bodies
    if not may_concern_anima(body):
        return None
    parsed_bodies += 1
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None  # not JSON: the host's request validation answers 422 itself
    try:
        return generation_problem(data)
    except Exception:  # noqa: BLE001 - a bug in the check must never block a request the host would serve
        log.exception("anima: request check failed; passing the request on")
        return None


def install(app: Any, authorized: Callable[[dict], bool]) -> int:
    """Wrap the host's generation routes on `app`; returns how many were wrapped (0 without ``--api``)."""
    wrapped = 0
    for route in getattr(app.router, "routes", []):
        if getattr(route, "path", None) in GENERATION_ROUTES and "POST" in (getattr(route, "methods", None) or ()):
            if getattr(route.app, "_anima_guard", False):
                continue
            route.app = guard(route.app, authorized)
            route.app._anima_guard = True
            wrapped += 1
    return wrapped
