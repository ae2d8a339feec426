"""The guard in front of every route: API keys and their scopes, rate limits, JSON bodies.

One pure ASGI middleware sees every request before routing, so there is one place to check and
none to forget: which scope a request needs is decided here, by :data:`SCOPE_TABLE` on its
method and path, not by each route opting in (a route added later is guarded the day it
lands, by the table's last rows). When the node has any key, every route but the health
checks needs one: no or an unknown key is 401, a known key outside its scope is 403. A rate
limit (per key, or one bucket for everyone when there are no keys) is 429 with Retry-After.
A request body on /v1 must be ``application/json`` (415 otherwise; an upload to /v1/files
aside): a web page may send ``text/plain`` to any origin without a CORS preflight, and must not
reach a handler that way.

A pure ASGI middleware, not an HTTP one: it never wraps a response body (SSE streams pass
straight through); with no key and no rate limit it costs a path check and, on a POST, a look
at the Content-Type. Handlers learn who called with :func:`caller`.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gpulane.api.bodies import DISCARD_MAX_BYTES, DISCARD_MAX_S
from gpulane.api.keys import Caller, KeyRing
from gpulane.api.ratelimit import RateLimiter, retry_after_s
from gpulane.api.responses import JSON
from gpulane.config import Settings
from gpulane.errors import RequestError, TooManyRequestsError, UnsupportedMediaTypeError

__all__ = ["OPEN_PATHS", "OPEN_PREFIXES", "SCOPE_TABLE", "Caller", "Forbidden", "Guard",
           "Unauthorized", "caller", "check_owner", "rate_limited", "scope_for"]

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
"""Paths that never need a key: probes carry no credentials, and these hold no data (``/`` is
the dashboard's page, which asks its user for a key before it reads anything)."""
OPEN_PREFIXES = ("/static/",)
"""Path prefixes that never need a key: the dashboard's script and style (api/dashboard.py)."""
READ_METHODS = frozenset({"GET", "HEAD"})
"""Methods that only read."""
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""Methods whose request body, if any, must be JSON."""
RAW_BODY_PATHS = frozenset({"/v1/files"})
"""Paths whose request body is a file of any type, not JSON (the origin check still holds:
a page of another origin cannot send one)."""
ANY_KEY = ""
"""In SCOPE_TABLE: any valid key will do."""
SCOPE_TABLE: tuple[tuple[frozenset[str] | None, str, str], ...] = (
    (None, "/v1/tasks", "tasks"),
    (None, "/v1/files", "tasks"),  # uploads are task inputs
    (None, "/v1/embeddings", "tasks"),  # the OpenAI face (api/openai.py) submits tasks
    (None, "/v1/chat", "tasks"),
    (None, "/v1/leases", "leases"),
    (None, "/v1/admin", "admin"),
    (READ_METHODS, "/", ANY_KEY),  # presets, gpus, workers, status, the API description
    (None, "/", "admin"),          # anything else that may change state: admin until listed
)
"""The scope a request needs: the first row whose methods (None: any) and path prefix (the
path itself or a path below it) match."""
CALLER_SCOPE_KEY = "gpulane.caller"
"""Where the guard leaves the request's Caller in the ASGI scope."""
ANONYMOUS = "anonymous"
"""The rate limiter's bucket for everyone when the node has no keys."""


class Unauthorized(RequestError):
    status = 401


class Forbidden(RequestError):
    status = 403


def scope_for(method: str, path: str) -> str:
    """The scope a request needs (``ANY_KEY``: any valid key), by :data:`SCOPE_TABLE`."""
    for methods, prefix, scope in SCOPE_TABLE:
        if (methods is None or method in methods) and (
                path == prefix or path.startswith(prefix if prefix.endswith("/")
                                                  else prefix + "/")):
            return scope
    return "admin"  # unreachable while the table ends with a catch-all row; safe if not


def rate_limited(keys: KeyRing, settings: Settings) -> bool:
    """Whether any request may meet a rate limit (the node's, or a key's own)."""
    return settings.rate_limit_per_s > 0 or any(c.rate_per_s for c in keys.callers)


def caller(request: Request) -> Caller | None:
    """Who made the request; None when the node has no keys (everyone may do everything)."""
    found: Caller | None = request.scope.get(CALLER_SCOPE_KEY)
    return found


def check_owner(request: Request, owner: str | None, what: str) -> None:
    """Forbidden unless the caller owns ``what`` (by key name) or is admin; with no keys on the
    node, anyone may."""
    who = caller(request)
    if who is None or who.is_admin or (owner is not None and who.name == owner):
        return
    raise Forbidden("forbidden", f"{what} belongs to {owner or 'no key'}, not to key "
                    f"{who.name!r}: use the key that made it, or an admin key",
                    field="Authorization")


NO_KEY_FIX = ("this node needs an API key: send 'Authorization: Bearer <key>' (the SDK and "
              "CLI read GPULANE_TOKEN or --token)")
"""The 401's message for a request without a key."""
UNKNOWN_KEY_FIX = ("this API key is not known to this node: check GPULANE_TOKEN, or ask for a "
                   "key ('gpulane keys new NAME')")
"""The 401's message for a key the node does not have."""


def unauthorized(message: str, challenge: str = 'Bearer realm="gpulane"') -> Unauthorized:
    """A fresh 401 (a shared instance raised again and again would keep each raise's
    frames alive through its traceback)."""
    return Unauthorized("unauthorized", message, field="Authorization",
                        headers={"WWW-Authenticate": challenge})


class Guard:
    """ASGI middleware: keys, scopes, rate limits and JSON bodies, before routing."""

    def __init__(self, app: ASGIApp, keys: KeyRing, settings: Settings,
                 limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.keys = keys
        self.rate_per_s = settings.rate_limit_per_s
        self.burst = settings.rate_burst
        self.limiter = limiter or RateLimiter()
        self.limited = rate_limited(keys, settings)
        self.unguarded = not keys and not self.limited
        self.origins = frozenset(o.lower().encode() for o in settings.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.unguarded and scope["method"] not in BODY_METHODS):
            # The hot path of a node without keys or limits: a read passes at once.
            await self.app(scope, receive, send)
            return
        # The path as the route table matches it (Starlette's own helper): mounted under a
        # prefix or served with a root_path, scope["path"] keeps the prefix, and reading it
        # would let /prefix/v1/... through unguarded.
        path = get_route_path(scope)
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        try:
            if scope["method"] in BODY_METHODS:
                _check_origin(scope, self.origins)
            who = self._authorize(scope, path) if self.keys else None
            if self.limited:
                self._limit(who)
            if scope["method"] in BODY_METHODS and path.startswith("/v1/") \
                    and path not in RAW_BODY_PATHS:
                _check_media_type(scope)
        except RequestError as exc:
            await _refuse(exc, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorize(self, scope: Scope, path: str) -> Caller:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        kind, _, given = (header or b"").partition(b" ")
        if kind.lower() != b"bearer":
            raise unauthorized(NO_KEY_FIX)
        who = self.keys.find(given.strip())
        if who is None:
            raise unauthorized(UNKNOWN_KEY_FIX, 'Bearer realm="gpulane", error="invalid_token"')
        method = scope["method"]
        need = scope_for(method, path)
        if need != ANY_KEY and not who.allows(need):
            raise Forbidden("forbidden", f"key {who.name!r} lacks the {need!r} scope that "
                            f"{method} {path} needs: use a key with it (docs/security.md)",
                            field="Authorization")
        scope[CALLER_SCOPE_KEY] = who
        return who

    def _limit(self, who: Caller | None) -> None:
        if who is None:
            name, rate, burst = ANONYMOUS, self.rate_per_s, self.burst
        else:
            name = who.name
            rate = self.rate_per_s if who.rate_per_s is None else who.rate_per_s
            burst = self.burst if who.burst is None else who.burst
        wait_s = self.limiter.check(name, rate, burst)
        if wait_s > 0:
            after = retry_after_s(wait_s)
            raise TooManyRequestsError(
                "rate_limited", f"{name} may make {rate:g} requests a second (burst "
                f"{burst or 'one second'}): retry after {after} s, or ask for a higher "
                "rate_per_s", field="Authorization", headers={"Retry-After": str(after)})


def _check_origin(scope: Scope, allowed: frozenset[bytes]) -> None:
    """403 for a write sent by a web page of another origin than the node's own or one named
    in cors_origins. Browsers send Origin on every POST, PUT, PATCH and DELETE, even one
    without a body (no Content-Type, so no 415, and no preflight): without this a page in a
    local browser could drain a keyless node on loopback. Clients other than browsers send
    no Origin and pass."""
    origin = host = None
    for k, v in scope["headers"]:
        if k == b"origin":
            origin = v.strip().lower()
        elif k == b"host":
            host = v.strip().lower()
    if origin is None or origin in allowed:
        return
    _, sep, rest = origin.partition(b"://")
    if sep and host is not None and rest == host:
        return  # the node's own pages (/docs)
    shown = origin.decode("latin-1")
    raise Forbidden("cross_origin", f"a web page on {shown!r} may not send {scope['method']} "
                    f"to this node: name its origin with --cors-origin {shown} if it should "
                    "(docs/security.md)", field="Origin")


def _check_media_type(scope: Scope) -> None:
    ctype: bytes | None = None
    has_body = False
    for k, v in scope["headers"]:
        if k == b"content-type":
            ctype = v
        elif k == b"content-length":
            has_body = v.strip() != b"0"
        elif k == b"transfer-encoding":
            has_body = True
    if ctype is None:
        if not has_body:
            return  # no body at all (a cancel, a release): nothing to read
        shown = "without a Content-Type"
    else:
        kind = ctype.partition(b";")[0].strip().lower()
        # As api/bodies.py reads a body: application/json or application/*+json.
        if kind == b"application/json" or (kind.startswith(b"application/")
                                           and kind.endswith(b"+json")):
            return
        shown = f"of type {ctype.decode('latin-1')!r}"
    raise UnsupportedMediaTypeError(
        "unsupported_media_type", f"the request body is sent {shown}: send JSON with "
        "'Content-Type: application/json'", field="Content-Type")


async def _refuse(exc: RequestError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``exc`` before any handler runs. A body the request carries is read and thrown
    away first (within api/bodies.py's bounds) and the connection closed after, as for a 413:
    a client that sends its whole body before reading (urllib, ``requests``) then reads the
    401, 403, 415 or 429 instead of a reset."""
    headers = exc.headers
    declared = _body_length(scope)
    if declared != 0:
        headers = {**headers, "Connection": "close"}
        await _discard(receive, declared)
    await JSON(exc.to_json(), status_code=exc.status, headers=headers)(scope, receive, send)


def _body_length(scope: Scope) -> int | None:
    """The request body's declared length: 0 when it has none, None when chunked."""
    length = 0
    for k, v in scope["headers"]:
        if k == b"transfer-encoding":
            return None
        if k == b"content-length":
            length = int(v) if v.strip().isdigit() else 0
    return length


async def _discard(receive: Receive, declared: int | None) -> None:
    """Read and drop the body within DISCARD_MAX_BYTES and DISCARD_MAX_S; nothing when its
    Content-Length already says it is longer than that (the sender is cut off)."""
    if declared is not None and declared > DISCARD_MAX_BYTES:
        return
    thrown = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCARD_MAX_S):
            while thrown <= DISCARD_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                thrown += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
