"""The HTTP application: the one route table, error rendering, the guard (keys, scopes, rate
limits, JSON bodies), CORS when origins are named, the node's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from gpulane import __version__
from gpulane.api import admin, dashboard, files, leases, status_stream, system, tasks
from gpulane.api.auth import OPEN_PATHS, Guard, rate_limited
from gpulane.api.keys import KeyRing, load_keys
from gpulane.api.metrics import router as metrics_router
from gpulane.api.openai import router as openai_router
from gpulane.api.openai_shapes import ChatBody, EmbeddingsBody
from gpulane.api.requests import BulkSubmit, LeaseBody, RenewBody, ResultsQuery, TaskSubmit
from gpulane.api.responses import JSON
from gpulane.api.routing import FrontApp, HotEntrance, documented, http_error
from gpulane.api.validation import request_error
from gpulane.errors import RequestError
from gpulane.node import Node

BODY_MODELS = (TaskSubmit, BulkSubmit, ResultsQuery, LeaseBody, RenewBody, EmbeddingsBody,
               ChatBody)
"""Request bodies the endpoints validate themselves (within the size limit); published as
components so that the routes' ``$ref``s resolve."""
CORS_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID",
                "X-Lease-Token")
"""Request headers a page on an allowed origin may send (what the API reads)."""
CORS_EXPOSED = ("Retry-After", "Allow")
"""Response headers such a page may read."""


def create_app(node: Node, *, manage_node: bool = True, keys: KeyRing | None = None) -> FastAPI:
    """Build the app around a node. With ``manage_node`` the app starts and stops it.
    ``keys`` are read from the node's settings unless given (ConfigError names a bad one)."""
    keys = load_keys(node.settings) if keys is None else keys
    node.files.admins = frozenset(c.name for c in keys.callers if c.is_admin)  # see uploads

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_node:
            await node.start()
        try:
            yield
        finally:
            if manage_node:
                await node.stop()

    app = FrontApp(title="gpulane", version=__version__, lifespan=lifespan,
                   default_response_class=JSON,
                   description="A safe, fast lane to the GPUs: tasks, events, devices.")
    app.state.node = node
    # The hot routes go into the app's own table, flat and first: the calls every task makes
    # match at once, without the walk through FastAPI's included routers.
    app.router.routes[0:0] = tasks.hot.routes
    for router in (tasks.router, system.router, leases.router, admin.router, files.router,
                   status_stream.router, dashboard.router):
        app.include_router(router)
    app.include_router(metrics_router)  # GET /metrics, keyed as the status view is
    app.include_router(openai_router)  # /v1/models, /v1/embeddings, /v1/chat/completions
    # In front of FastAPI (routing.FrontApp): CORS when origins are named, the guard (keys,
    # scopes, rate limits, JSON bodies: every request), then the hot routes' entrance.
    front: ASGIApp = Guard(HotEntrance(app.inner, routes=tasks.hot.routes), keys=keys,
                           settings=node.settings)
    if node.settings.cors_origins:
        # Outermost: a preflight (OPTIONS, no credentials by design) is answered before the
        # guard; the request that follows it carries the key and meets the guard as usual.
        front = CORSMiddleware(front, allow_origins=node.settings.cors_origins,
                               allow_methods=["GET", "POST", "DELETE"],
                               allow_headers=list(CORS_HEADERS),
                               expose_headers=list(CORS_EXPOSED))
    app.front = front

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSON:
        return JSON(exc.to_json(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSON:
        err = request_error(exc.errors())
        return JSON(err.to_json(), status_code=err.status)

    app.add_exception_handler(HTTPException, http_error)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in BODY_MODELS],
                                         ref_template="#/components/schemas/{model}")
            app.openapi_schema = documented(
                schema, bodies=defs.get("$defs", {}), open_paths=OPEN_PATHS, keyed=bool(keys),
                limited=rate_limited(keys, node.settings))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
