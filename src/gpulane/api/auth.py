"""Bearer-token authentication: when the node has a token, every /v1 call must carry it."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from gpulane.errors import RequestError


class Unauthorized(RequestError):
    status = 401


def check_token(request: Request, token: str | None) -> None:
    """Raise 401 unless the request carries ``Authorization: Bearer <token>``."""
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
        raise Unauthorized(
            "unauthorized", "this node needs a bearer token: send 'Authorization: Bearer "
            "<token>' (the SDK and CLI read GPULANE_TOKEN or --token)", field="Authorization")


async def require_token(request: Request) -> None:
    """FastAPI dependency guarding /v1 routes (health checks stay open)."""
    if request.url.path.startswith("/v1/"):
        check_token(request, request.app.state.node.settings.token)
