"""The browser chat page at `/`: static files shipped in `phi3v/server/static/` (no build step).

The page itself is public (it holds no secret and no model data); everything it does goes through
`/v1/chat/completions` and `/v1/models`, which keep their API-key check. A strict Content-Security-
Policy (same-origin scripts, styles and fetches only; `data:`/`blob:` images for the thumbnails)
backs up the page's own escaping of model output.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException

# file name -> media type; only these are served (no directory listing, no path handling)
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "view.js": "text/javascript; charset=utf-8",
}

_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a server upgrade must not leave an old page.js in the cache
}


def _read(name: str) -> bytes:
    return resources.files("phi3v.server").joinpath("static", name).read_bytes()


def add_web_ui(app: FastAPI) -> None:
    """Routes `/` (the page) and `/ui/<file>` (its script and style). Files are read once, here, so a
    missing file fails at start-up, not on the first visit."""
    blobs = {name: _read(name) for name in _FILES}

    def serve(name: str) -> Response:
        return Response(blobs[name], media_type=_FILES[name], headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return serve("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in blobs or name == "index.html":
            raise HTTPException(404, f"no file {name!r} in the web UI")
        return serve(name)
