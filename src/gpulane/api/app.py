"""The HTTP application: the one route table, error rendering, auth, the node's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from gpulane import __version__
from gpulane.api import leases, system, tasks
from gpulane.api.auth import TokenGuard
from gpulane.api.requests import BulkSubmit, LeaseBody, RenewBody, TaskSubmit
from gpulane.api.responses import JSON
from gpulane.api.routing import HotEntrance, documented, http_error
from gpulane.api.validation import request_error
from gpulane.errors import RequestError
from gpulane.node import Node

BODY_MODELS = (TaskSubmit, BulkSubmit, LeaseBody, RenewBody)
"""Request bodies the endpoints validate themselves (within the size limit); published as
components so that the routes' ``$ref``s resolve."""


def create_app(node: Node, *, manage_node: bool = True) -> FastAPI:
    """Build the app around a node. With ``manage_node`` the app starts and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_node:
            await node.start()
        try:
            yield
        finally:
            if manage_node:
                await node.stop()

    app = FastAPI(title="gpulane", version=__version__, lifespan=lifespan,
                  default_response_class=JSON,
                  description="A safe, fast lane to the GPUs: tasks, events, devices.")
    app.state.node = node
    # The hot routes go into the app's own table, flat and first: the calls every task makes
    # match at once, without the walk through FastAPI's included routers.
    app.router.routes[0:0] = tasks.hot.routes
    for router in (tasks.router, system.router, leases.router):
        app.include_router(router)
    app.add_middleware(HotEntrance, routes=tasks.hot.routes)
    app.add_middleware(TokenGuard, node=node)  # added last: outermost, so it guards all

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
            app.openapi_schema = documented(schema, token=node.settings.token is not None,
                                            bodies=defs.get("$defs", {}))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
