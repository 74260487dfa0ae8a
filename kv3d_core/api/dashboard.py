"""``/dashboard``: the workload analytics page, served by kv3d itself -- plain HTML, CSS and
JavaScript with uPlot vendored beside them (``api/dashboard/``, package data): no build
step, no CDN. The page holds no data; it reads ``/v1/kv3d/analytics`` with the API key the
user types (kept in the tab's sessionStorage), as any other client would."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from kv3d_core.api.errors import APIError

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".md": "text/plain; charset=utf-8"}
FILES = ("dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css",
         "vendor/uPlot.LICENSE", "vendor/VENDORED.md")
# the page runs only its own scripts, and talks only to this server
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _file(name: str) -> Response:
    data = resources.files("kv3d_core.api").joinpath("dashboard", name).read_bytes()
    ext = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    return Response(data, media_type=_TYPES.get(ext, "text/plain; charset=utf-8"),
                    headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                             "Cache-Control": "no-cache"})


def router() -> APIRouter:
    r = APIRouter()

    # a page and its files, not API operations: left out of /openapi.json (whose clients and
    # fuzzers expect JSON from every operation)
    @r.get("/dashboard", include_in_schema=False)
    async def page():
        return _file("index.html")

    @r.get("/dashboard/{name:path}", include_in_schema=False)
    async def static(name: str):
        if name not in FILES:
            raise APIError(404, f"No dashboard file '{name}'", code="not_found")
        return _file(name)

    return r
