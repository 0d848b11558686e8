"""HTTP routes under /anima/v1: list, inspect and refresh contexts; status (hooks) for scripts and tests."""

from __future__ import annotations

from secrets import compare_digest
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel

from lib_anima import __version__
from lib_anima.errors import AnimaError
from lib_anima.webui import generation, store

PREFIX = "/anima/v1"


class ContextSummary(BaseModel):
    name: str
    hash: str
    architecture: str
    sites: int
    n_tokens: int
    context_dim: int
    default_scale: float
    default_mode: str
    training: dict[str, Any]


class ContextList(BaseModel):
    directory: str
    contexts: list[ContextSummary]
    errors: dict[str, str]


class CreateRequest(BaseModel):
    name: str
    n_tokens: int = 4
    init_text: str = ""
    seed: int = 0
    std: float = 0.02
    overwrite: bool = False


class Status(BaseModel):
    version: str
    hooks_installed: int
    model_architecture: str | None


def _summary(name: str) -> ContextSummary:
    info = store.library().info(name)
    return ContextSummary(
        name=name, hash=info.shorthash, architecture=info.arch, sites=info.n_sites, n_tokens=info.n_tokens,
        context_dim=info.context_dim, default_scale=info.default_scale, default_mode=info.default_mode,
        training=info.training,
    )


def _listing() -> ContextList:
    library = store.library()
    return ContextList(
        directory=library.directory, contexts=[_summary(n) for n in library.names()], errors=library.errors(),
    )


def auth_dependencies() -> list:
    """The host's --api-auth rule for our routes too: HTTP basic auth against its user:password list."""
    from modules import shared

    if not shared.cmd_opts.api_auth:
        return []
    credentials = dict(pair.split(":", 1) for pair in shared.cmd_opts.api_auth.split(",") if ":" in pair)
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)) -> bool:  # noqa: B008 - FastAPI's idiom
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def add_routes(app: FastAPI) -> None:
    dependencies = auth_dependencies()

    def add_route(path: str, endpoint, **kwargs) -> None:
        app.add_api_route(path, endpoint, dependencies=dependencies, **kwargs)

    def list_contexts() -> ContextList:
        return _listing()

    def refresh_contexts() -> ContextList:
        store.library().refresh()
        return _listing()

    def get_context(name: str) -> ContextSummary:
        try:
            return _summary(name)
        except AnimaError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    def create(req: CreateRequest) -> ContextSummary:
        from lib_anima.webui import manage

        try:
            context = manage.create_context(req.name, req.n_tokens, req.init_text, req.seed, req.std, req.overwrite)
        except AnimaError as e:
            raise HTTPException(status_code=409 if "already exists" in str(e) else 400, detail=str(e)) from None
        return _summary(context.name)

    def status() -> Status:
        from modules import shared

        loaded = shared.sd_model is not None and store.current_unet() is not None
        return Status(version=__version__, hooks_installed=generation.hooks_installed(),
                      model_architecture=store.model_arch() if loaded else None)

    add_route(f"{PREFIX}/contexts", list_contexts, methods=["GET"], response_model=ContextList)
    add_route(f"{PREFIX}/contexts", create, methods=["POST"], response_model=ContextSummary)
    from lib_anima.webui import api_train

    api_train.add_routes(add_route)
    add_route(f"{PREFIX}/refresh", refresh_contexts, methods=["POST"], response_model=ContextList)
    add_route(f"{PREFIX}/contexts/{{name}}", get_context, methods=["GET"], response_model=ContextSummary)
    add_route(f"{PREFIX}/status", status, methods=["GET"], response_model=Status)
