"""The HTTP application: routes, error rendering, auth, and the node's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError

from gpulane import __version__
from gpulane.api import leases, system, tasks
from gpulane.api.auth import require_token
from gpulane.api.hotpath import HotPath
from gpulane.api.responses import JSON
from gpulane.errors import RequestError
from gpulane.node import Node


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
    # A router dependency, not an HTTP middleware: middleware wraps every response body
    # (SSE streams included) and costs a task switch per request.
    guard = [Depends(require_token)]
    app.include_router(tasks.router, dependencies=guard)
    app.include_router(system.router, dependencies=guard)
    app.include_router(leases.router, dependencies=guard)
    app.add_middleware(HotPath)  # the task calls every client makes, minus FastAPI's routing

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSON:
        return JSON(exc.to_json(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSON:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return JSON({"error": {
            "code": "invalid_request", "field": field or None,
            "message": f"{field or 'request'}: {first['msg']}"}}, status_code=422)

    return app
