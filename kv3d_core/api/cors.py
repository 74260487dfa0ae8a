"""CORS for browser clients (``server.cors_origins``): Starlette's middleware, with a refused
preflight answered as an OpenAI-shaped error like every other refusal."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from kv3d_core.api.errors import APIError


class Cors(CORSMiddleware):
    """Outermost middleware: a preflight (``OPTIONS`` with ``Access-Control-Request-Method``)
    is answered here, before the API key is checked (browsers send preflights without
    credentials); every other response gets the CORS headers of an allowed origin."""

    def __init__(self, app, origins: list[str]) -> None:
        super().__init__(app, allow_origins=list(origins), allow_methods=["GET", "POST"], allow_headers=["*"],
                         max_age=600)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode("utf-8", "replace")
        err = APIError(400, f"CORS preflight refused: {reason}", code="cors_refused").response()
        for k, v in response.headers.items():
            if k.lower() not in ("content-type", "content-length"):
                err.headers[k] = v
        return err
