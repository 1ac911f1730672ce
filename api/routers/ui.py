"""The web UI: ``GET /ui`` serves a single static page (``api/ui/``: index.html, app.js, style.css).

The page is plain HTML/JS with no build step. It authenticates every API call
itself with the API key the user types in (kept in the tab's sessionStorage), so
these routes need no auth: they only ever serve the three static files, from a
fixed list (no path from the request reaches the file system).

Wire it with ``app.include_router(ui.router)`` in :func:`api.app.create_app`.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from api.errors import ApiError
from broker.schema import ErrorCode

router = APIRouter(include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Scripts and styles only from this origin (no inline code); images also from the object store
# (presigned output and preview URLs) and from data:/blob: URLs (the picked file, downloads);
# fetch() to this origin (the API) and to the object store (downloading a result as a file).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: http: https:; "
    "connect-src 'self' http: https:; object-src 'none'; base-uri 'self'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so a deploy is picked up at once
}


@functools.lru_cache(maxsize=len(_FILES))
def _load(name: str, mtime_ns: int) -> tuple[bytes, str]:
    data = (UI_DIR / name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(name: str, request: Request) -> Response:
    path = UI_DIR / name
    try:
        data, etag = _load(name, path.stat().st_mtime_ns)
    except OSError:
        raise ApiError(404, ErrorCode.NOT_FOUND, "not found") from None
    headers = {**_HEADERS, "ETag": etag}
    if etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=_FILES[name], headers=headers)


@router.get("/ui")
async def ui_redirect() -> RedirectResponse:
    """``/ui`` → ``/ui/``, so the page's relative asset URLs resolve (also behind a path prefix)."""
    return RedirectResponse("ui/", status_code=308)


@router.get("/ui/")
async def ui_index(request: Request) -> Response:
    """The web UI page."""
    return _serve("index.html", request)


@router.get("/ui/{name}")
async def ui_asset(name: str, request: Request) -> Response:
    """``app.js`` and ``style.css``; anything else is 404."""
    if name not in _FILES:
        raise ApiError(404, ErrorCode.NOT_FOUND, "not found")
    return _serve(name, request)
