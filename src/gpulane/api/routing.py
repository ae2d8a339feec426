"""The route table's own parts: the hot route class, error answers for every status, docs.

``HotRoute`` serves the calls every task makes (submit, read, long-poll its result) without
FastAPI's dependency solving, about 0.3 ms of CPU per call (a quarter of a local
submit-and-wait round trip). FastAPI still reads the endpoint's signature for the OpenAPI
document, and the route validates the query parameters that signature declares with the very
same annotated types, so what is published is what is enforced. The hot routes sit first in
the app's one route table; :class:`HotEntrance` hands a request that fully matches one of
those very route objects straight to it, ahead of two per-request layers they do not use.
Everything else (a wrong method, an unknown path, every other route) goes through the table
as usual, and the guard sits in front of both (``auth.Guard``). Both sit in front of FastAPI
itself (:class:`FrontApp`): a hot call skips FastAPI's own per-request layers too.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gpulane.api.auth import BODY_METHODS
from gpulane.api.responses import JSON
from gpulane.api.validation import request_error
from gpulane.errors import RequestError


class HotRoute(APIRoute):
    """An APIRoute served directly: path parameters and the declared query parameters are
    validated here, and a RequestError becomes its JSON answer without the app's handlers."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        hints = typing.get_type_hints(endpoint, include_extras=True)
        path_names = {p.name for p in self.dependant.path_params}
        self._query: list[tuple[str, TypeAdapter[Any], Any]] = [
            (name, TypeAdapter(hints[name]), param.default)
            for name, param in inspect.signature(endpoint).parameters.items()
            if name != "request" and name not in path_names]
        self._call: Callable[..., Awaitable[JSON]] = endpoint

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # Starlette's plain match: a hot route sits flat in the app's table, outside FastAPI's
        # included-router contexts that APIRoute.matches looks up.
        match, child_scope = Route.matches(self, scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in (self.methods or ()):
            await super().handle(scope, receive, send)  # raises the 405
            return
        request = Request(scope, receive)
        try:
            kwargs = dict(scope["path_params"])
            if not scope["query_string"]:  # the usual call: every parameter at its default
                kwargs.update((name, default) for name, _, default in self._query)
            elif self._query:
                params = request.query_params
                for name, adapter, default in self._query:
                    raw = params.get(name)
                    kwargs[name] = default if raw is None else _validate(name, adapter, raw)
            response = await self._call(request, **kwargs)
        except RequestError as exc:
            response = JSON(exc.to_json(), status_code=exc.status, headers=exc.headers)
        await response(scope, receive, send)


class HotEntrance:
    """ASGI middleware: a request that fully matches a hot route (the same objects that sit
    first in the route table) goes straight to that route's ``handle``.

    It skips FastAPI's exception-handler wrapping (hot routes render their own errors) and
    its per-request AsyncExitStack (hot routes have no uploads or yield-dependencies): about
    10 us a call, measured, out of 30-100 us of in-process dispatch. A partial match (a
    wrong method) and any other path go on into the app, which answers them as for any
    route.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class FrontApp(FastAPI):
    """FastAPI whose HTTP requests meet ``front`` first (the guard, then the hot routes'
    entrance: app.py builds it around :meth:`inner`), ahead of FastAPI's own per-request
    layers, which a hot call does not need: OpenTelemetry's check of its settings (an
    environment read per request) and middleware, the app-wide body limit (unset: the routes
    read bodies within the node's own limit, api/bodies.py), and Starlette's 500 page (uvicorn
    answers an unhandled error with the same 500 and logs it). Every other request goes on
    into FastAPI as before, the guard passed; the lifespan goes there directly."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        if front is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # what Starlette sets first: handlers read request.app.state
        await front(scope, receive, send)

    async def inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI as it is: what the front hands a request it does not answer itself."""
        await super().__call__(scope, receive, send)


def _validate(name: str, adapter: TypeAdapter[Any], raw: str) -> Any:
    try:
        return adapter.validate_python(raw)
    except PydanticValidationError as exc:
        raise request_error([{**e, "loc": (name, *e["loc"])} for e in exc.errors()]) from None


def allowed_methods(routes: Sequence[BaseRoute], path: str) -> list[str]:
    """Every method the OpenAPI document lists for ``path``, read from the route table
    through FastAPI's included routers (it makes one route per method). As in OpenAPI, a
    concrete path wins over a template: /v1/tasks/bulk is not a /v1/tasks/{task_id}."""
    static: set[str] = set()
    templated: set[str] = set()
    for route in iter_route_contexts(routes):
        regex = getattr(route, "path_regex", None)
        if route.methods and regex is not None and regex.match(path):
            (templated if "{" in str(route.path) else static).update(route.methods)
    return sorted(static or templated)


async def http_error(request: Request, exc: Exception) -> JSON:
    """Starlette's own 404 and 405 (and any other HTTPException) in the project's shape; a
    405's Allow names every method of the path, not just one route's."""
    assert isinstance(exc, HTTPException)
    path, method = request.url.path, request.method
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        code, message = "not_found", f"no route for {method} {path}: see /docs for the API"
    elif exc.status_code == 405:
        # Matched as the table matches (without the prefix the app may be mounted under).
        allow = allowed_methods(request.app.routes, get_route_path(request.scope))
        headers["Allow"] = ", ".join(allow)
        code, message = "method_not_allowed", (
            f"{method} is not allowed on {path}: use {' or '.join(allow)}")
    else:
        code, message = "http_error", str(exc.detail)
    return JSON({"error": {"code": code, "message": message, "field": None}},
                status_code=exc.status_code, headers=headers)


def documented(schema: dict[str, Any], *, bodies: dict[str, Any],
               open_paths: frozenset[str], keyed: bool, limited: bool) -> dict[str, Any]:
    """Finish FastAPI's OpenAPI document: the request-body models as components (their
    ``$ref``s then resolve), only the 422s that are real, the 415 of every /v1 call that may
    carry a body, and, when the node has keys (``keyed``), the bearer scheme with 401 and 403
    on every route but ``open_paths``; 429 there too when a rate limit may answer."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(bodies)
    # FastAPI lists a 422 in its own shape on every route with a parameter; a route that can
    # answer 422 lists it in the project's shape itself, so those left are not real.
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {})
            if "HTTPValidationError" in str(responses.get("422", "")):
                del responses["422"]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if keyed:
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer"}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            answers: dict[str, str] = {}
            if path.startswith("/v1/") and method.upper() in BODY_METHODS:
                answers["415"] = "the request body is not application/json"
            if method.upper() in BODY_METHODS:
                answers["403"] = "a web page of another origin sent it (Origin)"
            if keyed and path not in open_paths:
                operation["security"] = [{"bearer": []}]
                answers["401"] = "no or an unknown API key"
                answers["403"] = ("the key lacks the scope, or does not own the task or lease; "
                                  "or a web page of another origin sent it")
            if limited and path not in open_paths:
                answers["429"] = "the key's rate is spent: retry after Retry-After seconds"
            responses = operation.setdefault("responses", {})
            for status, description in answers.items():
                responses.setdefault(status, {
                    "description": description,
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/ErrorView"}}}})
    return schema
