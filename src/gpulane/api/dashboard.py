"""The dashboard: ``GET /`` and ``GET /static/{name}``, the page shipped in the package.

The files are read once, from ``api/static/`` beside this module (package data, so a wheel
carries them), and served from memory: only the names in :data:`STATIC_FILES` exist, so no
path a client sends reaches the filesystem. Each answer carries a strict
Content-Security-Policy (scripts, styles and connections to this origin only; no inline code,
no frames) and an ETag: the browser revalidates on every load (``no-cache``) and gets a 304
while the files are unchanged, so an upgraded node never serves a stale page.

The page holds no data: it reads the API with the key its user types (see app.js), so these
routes are open like the health checks (auth.OPEN_PATHS, auth.OPEN_PREFIXES).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpulane.errors import NotFoundError

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).parent / "static"
"""Where the page's files are (package data: pyproject's [tool.setuptools.package-data])."""
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8",
                "app.css": "text/css; charset=utf-8"}
"""The files under /static/ and their media types; any other name is a 404."""
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Only this origin's own files and API; no inline script or style, no frames, no forms that
post elsewhere: text from a task's input can never become code on the page."""
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
"""Headers of every dashboard answer (no-cache: revalidate by ETag on every load)."""


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def _load(name: str, media_type: str) -> Asset:
    body = (STATIC_DIR / name).read_bytes()
    return Asset(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:20]}"')


ASSETS = {"index.html": _load("index.html", "text/html; charset=utf-8"),
          **{name: _load(name, kind) for name, kind in STATIC_FILES.items()}}
"""The page's files, read once at import."""


def _answer(request: Request, asset: Asset) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    # The server drops the body of a HEAD answer and keeps its Content-Length.
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    """The dashboard page."""
    return _answer(request, ASSETS["index.html"])


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(request: Request, name: str) -> Response:
    """One of the page's files."""
    asset = ASSETS.get(name) if name in STATIC_FILES else None
    if asset is None:
        raise NotFoundError("not_found", f"/static/{name} is not a file of the dashboard: "
                            f"it has {', '.join(sorted(STATIC_FILES))}", field="name")
    return _answer(request, asset)
