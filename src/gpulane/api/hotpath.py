"""The three calls every task makes, served without FastAPI's routing machinery.

Submitting, reading and long-polling a task are the hot path of every client: FastAPI's
exception and body-limit middlewares, router walk and dependency solving cost about 0.3 ms
of CPU per call, a quarter of a local submit-and-wait round trip. This pure ASGI middleware
recognises those three routes and calls the very same endpoint functions (so validation,
auth, errors and responses are identical); every other request, and these routes' OpenAPI
description, still come from FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gpulane.api import tasks
from gpulane.api.auth import check_token
from gpulane.api.responses import JSON
from gpulane.errors import RequestError

_TASK_PATH = re.compile(r"^/v1/tasks/([^/]+)(/result)?$")

Endpoint = Callable[[Request], Awaitable[JSON]]


class HotPath:
    """ASGI middleware: POST /v1/tasks, GET /v1/tasks/{id} and GET /v1/tasks/{id}/result."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._route(scope) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            check_token(request, request.app.state.node.settings.token)
            response = await endpoint(request)
        except RequestError as exc:
            response = JSON(exc.to_json(), status_code=exc.status)
        await response(scope, receive, send)

    @staticmethod
    def _route(scope: Scope) -> Endpoint | None:
        method, path = scope["method"], scope["path"]
        if path == "/v1/tasks":
            return _submit if method == "POST" else None
        if method != "GET" or not path.startswith("/v1/tasks/"):
            return None
        match = _TASK_PATH.match(path)
        if match is None or match.group(1) == "bulk":
            return None
        task_id = match.group(1)
        scope.setdefault("path_params", {})["task_id"] = task_id
        return _result if match.group(2) else _get


async def _submit(request: Request) -> JSON:
    return await tasks.submit_task(request, wait=request.query_params.get("wait"))


async def _get(request: Request) -> JSON:
    return await tasks.get_task(request, request.path_params["task_id"])


async def _result(request: Request) -> JSON:
    return await tasks.task_result(request, request.path_params["task_id"],
                                   wait=request.query_params.get("wait"))
