"""HTTP routes under /anima/v1: contexts (list, inspect, create, upload, download, rename, delete, preview),
refresh and status; plus the 422 guard on the host's txt2img/img2img (:mod:`lib_anima.webui.api_guard`).

Every route obeys the host's ``--api-auth`` exactly as its own routes do. Errors are specific: 400 a bad value,
404 no such context, 409 the name is taken, 413 too large, 415 a body type not understood, 422 a malformed
request (FastAPI's own validation). Nothing a client sends should give a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from secrets import compare_digest
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image
from pydantic import BaseModel, Field, conint
from starlette.concurrency import run_in_threadpool

from lib_anima import __version__
from lib_anima.create import MAX_TOKENS
from lib_anima.errors import AnimaError
from lib_anima.fileio import atomic_write_bytes
from lib_anima.images import decode_base64, open_image
from lib_anima.names import check_name, sidecar_path
from lib_anima.webui import api_guard, generation, host, store
from lib_anima.webui.http_errors import error_answers

PREFIX = "/anima/v1"
TAGS = ["anima"]
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a 70-site SDXL context with 75 tokens is 43 MB
MAX_PREVIEW_BYTES = 16 * 1024 * 1024
MAX_PREVIEW_PIXELS = 4096 * 4096
_BODY_SLACK = 64 * 1024  # JSON / multipart framing around the file


class ContextSummary(BaseModel):
    name: str
    hash: str = Field(description="first 12 hex digits of the file's sha256 (as in the infotext)")
    sha256: str
    architecture: str
    sites: int
    n_tokens: int
    context_dim: int
    site_layout: str
    default_scale: float
    default_mode: str
    training: dict[str, Any]
    size: int = Field(description="file size in bytes")
    preview: str | None = Field(None, description="URL of the preview image (the host's Extra Networks thumb route)")


class ContextList(BaseModel):
    directory: str
    contexts: list[ContextSummary]
    errors: dict[str, str] = Field(description="files that could not be read, with why (they are skipped)")


class CreateRequest(BaseModel):
    name: str
    n_tokens: conint(strict=True, ge=1, le=MAX_TOKENS) = 4  # type: ignore[valid-type]  # strict: 2.5 is refused, not cut to 2
    init_text: str = Field("", max_length=4000)
    seed: conint(strict=True, ge=0, le=2**63 - 1) = 0  # type: ignore[valid-type]
    std: float = Field(0.02, gt=0, le=100)
    overwrite: bool = False


class RenameRequest(BaseModel):
    new_name: str
    overwrite: bool = False


class Deleted(BaseModel):
    name: str
    files: list[str] = Field(description="the removed files: the context and its previews / user metadata")


class Status(BaseModel):
    version: str
    hooks_installed: int
    model_architecture: str | None
    context_loads: int = Field(description="context files read for generation since start (each version once)")
    checked_requests: int = Field(description="txt2img/img2img bodies the anima check parsed since start "
                                              "(bodies without \"anima\" in them are passed on unparsed)")
    host: str = Field("a1111", description="the WebUI as detected at start-up: a1111, forge or reforge (the "
                                           "ldm_patched forks: reForge, the 2024 Forge)")


# ---- helpers ------------------------------------------------------------------------------------------------


def _name(name: str) -> str:
    with error_answers():
        return check_name(name)


def _thumb_route_exists(app: FastAPI | None) -> bool:
    return app is not None and any(getattr(r, "path", "") == "/sd_extra_networks/thumb" for r in app.router.routes)


def _preview_url(name: str, app: FastAPI | None) -> str | None:
    path = store.library().preview(name)
    if path is None:
        return None
    mtime = int(os.path.getmtime(path))
    if _thumb_route_exists(app):
        return f"/sd_extra_networks/thumb?filename={urllib.parse.quote(path.replace(os.sep, '/'))}&mtime={mtime}"
    return f"{PREFIX}/contexts/{urllib.parse.quote(name, safe='')}/preview?mtime={mtime}"


def _summary(name: str, app: FastAPI | None = None) -> ContextSummary:
    info = store.library().info(name)
    return ContextSummary(
        name=name, hash=info.shorthash, sha256=info.sha256, architecture=info.arch, sites=info.n_sites,
        n_tokens=info.n_tokens, context_dim=info.context_dim, site_layout=info.site_layout,
        default_scale=info.default_scale, default_mode=info.default_mode, training=info.training,
        size=os.path.getsize(info.path) if os.path.isfile(info.path) else 0, preview=_preview_url(name, app),
    )


def _listing(app: FastAPI | None) -> ContextList:
    library = store.library()
    contexts = []
    for name in library.names():
        try:
            contexts.append(_summary(name, app))
        except (AnimaError, OSError):
            continue  # deleted between names() and now
    return ContextList(directory=library.directory, contexts=contexts, errors=library.errors())


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` (a lying or absent Content-Length too)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPException(status_code=413, detail=f"the body is {declared} bytes; at most {limit} are accepted")
        except ValueError:
            raise HTTPException(status_code=400, detail="Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=f"the body is over {limit} bytes; at most {limit} are accepted")
        chunks.append(chunk)
    return b"".join(chunks)


async def _file_from_body(request: Request, limit: int, json_field: str) -> tuple[bytes, dict[str, Any]]:
    """The file in a request: raw bytes, multipart field ``file``, or JSON ``{json_field: base64, ...}``.

    Returns the bytes and the other fields (JSON keys or form fields) as a dict.
    """
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await _read_body(request, limit * 4 // 3 + _BODY_SLACK)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise HTTPException(status_code=400, detail="the body is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get(json_field), str):
            raise HTTPException(status_code=400, detail=f'expected a JSON object {{"{json_field}": "<base64>"}}')
        with error_answers():
            raw = decode_base64(data.pop(json_field), f"'{json_field}'")
        return raw, data
    if content_type == "multipart/form-data":
        body = await _read_body(request, limit + _BODY_SLACK)
        return await _multipart_file(request, body)
    if content_type in ("application/octet-stream", "image/png", "image/jpeg", "image/webp", "image/gif"):
        return await _read_body(request, limit), {}
    raise HTTPException(status_code=415, detail=f"content type {content_type!r} is not accepted: send the file as "
                        f"application/octet-stream, multipart/form-data (field 'file') or JSON with base64")


async def _multipart_file(request: Request, body: bytes) -> tuple[bytes, dict[str, Any]]:
    sent = False

    async def replay() -> dict:  # the body was read already (with its limit); let the form parser read it again
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 - the multipart parser raises several types for malformed input
        raise HTTPException(status_code=400, detail=f"the multipart body cannot be parsed ({type(e).__name__})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(status_code=400, detail="the multipart body has no file field named 'file'")
    raw = await upload.read()
    return raw, {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise HTTPException(status_code=400, detail=f"{what} must be true or false, got {value!r}"[:200])


def _png_preview(raw: bytes) -> bytes:
    """Any accepted image as PNG (RGB or RGBA): odd modes (16-bit, CMYK, palette) are converted, not stored."""
    image = open_image(raw, "the preview image", MAX_PREVIEW_PIXELS)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if image.mode.startswith(("I", "F")):  # 16/32-bit grey: stretch to 8 bits instead of clipping at 255
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(values.min()), float(values.max())
        image = Image.fromarray(((values - low) * (255.0 / ((high - low) or 1.0))).astype(np.uint8), "L")
    image = image.convert("RGBA" if has_alpha else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ---- auth -----------------------------------------------------------------------------------------------------


def _credentials() -> dict[str, str]:
    from modules import shared

    api_auth = shared.cmd_opts.api_auth or ""
    return dict(pair.split(":", 1) for pair in api_auth.split(",") if ":" in pair)


def _valid(credentials: dict[str, str], user: str, password: str) -> bool:
    expected = credentials.get(user)
    return expected is not None and compare_digest(password.encode(), expected.encode())


def auth_dependencies() -> list:
    """The host's --api-auth rule for our routes too: HTTP basic auth against its user:password list."""
    credentials = _credentials()
    if not credentials:
        return []
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)) -> bool:  # noqa: B008 - FastAPI's idiom
        if _valid(credentials, given.username, given.password):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def authorized(scope: dict) -> bool:
    """Whether an ASGI request passes --api-auth (always, when it is off); for the generation guard."""
    credentials = _credentials()
    if not credentials:
        return True
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, encoded = header.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return False
    return _valid(credentials, user, password)


# ---- routes ---------------------------------------------------------------------------------------------------


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_MAX_CHECKED_BODY = 128 * 1024 * 1024


async def refuse_lone_surrogates(request: Request) -> None:
    """422 for a JSON body whose text holds a lone surrogate escape ("\\ud800"): valid JSON, but no UTF-8 text,
    so the file system, the tokenizer or the JSON response would fail on it later with a 500."""
    if request.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return
    if "json" not in request.headers.get("content-type", ""):
        return
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        return
    if not 0 < length <= _MAX_CHECKED_BODY:
        return
    body = await request.body()  # cached by starlette: the endpoint reads the same bytes
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return
    where = api_guard.lone_surrogate_path(data)
    if where:
        raise HTTPException(status_code=422, detail=f"{where} is not valid Unicode text (a lone surrogate escape)")


class _Endpoints:
    """The context routes' endpoints (bound methods: the contexts they return carry preview URLs of `app`)."""

    def __init__(self, app: FastAPI):
        self.app = app

    def list_contexts(self) -> ContextList:
        """Every valid context with its metadata; unreadable files under `errors`."""
        return _listing(self.app)

    def refresh_contexts(self) -> ContextList:
        """Reread the contexts folder (added, changed, deleted files) and list it."""
        with error_answers():
            store.library().refresh()
        return _listing(self.app)

    def get_context(self, name: str) -> ContextSummary:
        """One context (404 unknown; 400 a broken file or an invalid name, with why)."""
        _name(name)
        with error_answers():
            return _summary(name, self.app)

    def create(self, req: CreateRequest) -> ContextSummary:
        """An untrained context for the loaded model (from `init_text`, else random with `seed` and `std`)."""
        from lib_anima.webui import manage

        with error_answers():
            context = manage.create_context(req.name, req.n_tokens, req.init_text, req.seed, req.std, req.overwrite)
            return _summary(context.name, self.app)

    def delete(self, name: str) -> Deleted:
        """Delete a context file (valid or broken) with its previews and user metadata."""
        _name(name)
        with error_answers():
            removed = store.library().delete(name)
        return Deleted(name=name, files=[os.path.basename(p) for p in removed])

    def rename(self, name: str, req: RenameRequest) -> ContextSummary:
        """Rename a context (and its previews / user metadata); 409 if `new_name` exists and not `overwrite`."""
        _name(name)
        _name(req.new_name)
        with error_answers():
            store.library().rename(name, req.new_name, req.overwrite)
            return _summary(req.new_name, self.app)

    def download(self, name: str) -> FileResponse:
        """The context's .safetensors file."""
        _name(name)
        with error_answers():
            path = store.library().file_path(name)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{name}.safetensors")

    async def upload(self, name: str, request: Request, overwrite: bool = False) -> ContextSummary:
        """Add a context file: raw bytes, multipart field `file`, or JSON `{"data": base64}`.

        Checked like a file in the folder (format, shapes, dtypes, NaN/Inf) before it takes the name; at most
        64 MiB. 201 created, 400 invalid, 409 exists (without overwrite), 413 too large, 415 other body types.
        """
        _name(name)
        raw, fields = await _file_from_body(request, MAX_UPLOAD_BYTES, "data")
        overwrite = overwrite or _flag(fields.get("overwrite", False), "overwrite")
        with error_answers():
            await run_in_threadpool(store.library().import_bytes, name, raw, overwrite)
            return _summary(name, self.app)

    def get_preview(self, name: str) -> FileResponse:
        """The context's preview image, if it has one (404 otherwise)."""
        _name(name)
        path = store.library().preview(name)
        if path is None:
            raise HTTPException(status_code=404, detail=f"context {name!r} has no preview image")
        return FileResponse(path)

    async def set_preview(self, name: str, request: Request) -> ContextSummary:
        """Store a preview image (PNG/JPEG/WebP/GIF, raw, multipart `file` or JSON `{"image": base64}`) as name.png."""
        _name(name)
        raw, _ = await _file_from_body(request, MAX_PREVIEW_BYTES, "image")
        with error_answers():
            store.library().file_path(name)
            png = await run_in_threadpool(_png_preview, raw)  # decoding a large image must not stall the server
            atomic_write_bytes(sidecar_path(store.contexts_dir(), name, ".png"), png)
            return _summary(name, self.app)

    def status(self) -> Status:
        """Version, the loaded model's architecture, hooks installed now (0 outside sampling), context loads."""
        from modules import shared

        loaded = shared.sd_model is not None and store.current_unet() is not None
        return Status(version=__version__, hooks_installed=generation.hooks_installed(),
                      model_architecture=store.model_arch() if loaded else None,
                      context_loads=store.library().load_count, checked_requests=api_guard.parsed_bodies,
                      host=host.KIND)


UPLOAD_BODY = {"requestBody": {"content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}, "overwrite": {"type": "boolean"}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "data": {"type": "string", "description": "the file, base64"}, "overwrite": {"type": "boolean"}}}},
}}}
PREVIEW_BODY = {"requestBody": {"content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {"type": "object", "properties": {"image": {"type": "string"}}}},
}}}


RouteAdder = Callable[..., APIRoute]


def add_routes(app: FastAPI) -> None:
    """Every /anima/v1 route, under the host's --api-auth; the order matters where paths overlap."""
    dependencies = [*auth_dependencies(), Depends(refuse_lone_surrogates)]

    def add_route(path: str, endpoint, **kwargs) -> APIRoute:
        kwargs.setdefault("tags", TAGS)
        app.add_api_route(path, endpoint, dependencies=dependencies, **kwargs)
        return app.router.routes[-1]

    from lib_anima.webui import api_train

    endpoints = _Endpoints(app)
    _add_collection_routes(add_route, endpoints)
    api_train.add_routes(add_route)
    _add_context_routes(add_route, endpoints)
    _add_file_routes(add_route, endpoints)
    add_route(f"{PREFIX}/status", endpoints.status, methods=["GET"], response_model=Status)
    api_guard.install(app, authorized)


def _add_collection_routes(add_route: RouteAdder, ep: _Endpoints) -> None:
    add_route(f"{PREFIX}/contexts", ep.list_contexts, methods=["GET"], response_model=ContextList)
    add_route(f"{PREFIX}/contexts", ep.create, methods=["POST"], response_model=ContextSummary)
    add_route(f"{PREFIX}/refresh", ep.refresh_contexts, methods=["POST"], response_model=ContextList)


def _add_context_routes(add_route: RouteAdder, ep: _Endpoints) -> None:
    one = f"{PREFIX}/contexts/{{name}}"
    add_route(one, ep.get_context, methods=["GET"], response_model=ContextSummary)
    add_route(one, ep.delete, methods=["DELETE"], response_model=Deleted)
    add_route(f"{one}/rename", ep.rename, methods=["POST"], response_model=ContextSummary)


def _add_file_routes(add_route: RouteAdder, ep: _Endpoints) -> None:
    one = f"{PREFIX}/contexts/{{name}}"
    add_route(f"{one}/file", ep.download, methods=["GET"], response_class=FileResponse)
    add_route(f"{one}/file", ep.upload, methods=["POST"], response_model=ContextSummary, status_code=201,
              openapi_extra=UPLOAD_BODY)
    add_route(f"{one}/preview", ep.get_preview, methods=["GET"], response_class=FileResponse)
    add_route(f"{one}/preview", ep.set_preview, methods=["POST"], response_model=ContextSummary,
              openapi_extra=PREVIEW_BODY)
