"""Bearer-token authentication: when the node has a token, every /v1 call must carry it.

One pure ASGI middleware in front of the route table guards every /v1 route alike (the hot
task routes, the lease routes, an unknown /v1 path and a wrong method too), so there is one
place to check and one place to forget. Health checks and the API's own description
(/openapi.json, /docs) stay open: probes and tools read them without credentials, and they
hold no data. A pure ASGI middleware, not an HTTP one: it never wraps a response body (SSE
streams pass straight through) and costs one call when no token is set.
"""

from __future__ import annotations

import hmac

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from gpulane.api.responses import JSON
from gpulane.errors import RequestError
from gpulane.node import Node

GUARDED_PREFIX = "/v1/"
"""Paths under this prefix need the token; the rest (health, OpenAPI, docs) stay open."""


class Unauthorized(RequestError):
    status = 401


def token_ok(header: str, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <token>``."""
    scheme, _, given = header.partition(" ")
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    # The header was decoded as latin-1, so this gives back the bytes that were sent.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("latin-1"), token.encode())


UNAUTHORIZED = Unauthorized(
    "unauthorized", "this node needs a bearer token: send 'Authorization: Bearer <token>' "
    "(the SDK and CLI read GPULANE_TOKEN or --token)", field="Authorization")
"""The one 401 answer."""


class TokenGuard:
    """ASGI middleware: a /v1 request without the node's token gets 401 before routing."""

    def __init__(self, app: ASGIApp, node: Node) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.node.settings.token
        # The path as the route table matches it (Starlette's own helper): mounted under a
        # prefix or served with a root_path, scope["path"] keeps the prefix, and reading it
        # would let /prefix/v1/... through unguarded.
        if (token is not None and scope["type"] == "http"
                and get_route_path(scope).startswith(GUARDED_PREFIX)):
            header = next((v.decode("latin-1") for k, v in scope["headers"]
                           if k == b"authorization"), "")
            if not token_ok(header, token):
                response = JSON(UNAUTHORIZED.to_json(), status_code=UNAUTHORIZED.status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
