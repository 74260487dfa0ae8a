"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 etype: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.etype = etype or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.etype, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# pydantic error types that name a request field kv3d refuses
_UNSUPPORTED = {"unsupported_parameter", "extra_forbidden"}


def from_validation_error(exc: Exception) -> APIError:
    """A pydantic ValidationError as one 400 naming the first bad field (a model-level
    error names it in its context's ``field``)."""
    errors = getattr(exc, "errors", lambda: [])()
    if not errors:
        return APIError(400, str(exc), code="invalid_request")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if not str(x).startswith("function-")]
    # drop pydantic's union-branch names ('str', 'list[...]') from the location
    loc = [x for x in loc if not (x in ("str", "int", "float", "bool", "dict") or "[" in x or x.startswith("tagged-union"))]
    ctx = first.get("ctx") or {}
    if isinstance(ctx.get("field"), str):
        loc.append(ctx["field"])
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    kind = first.get("type", "")
    if kind in _UNSUPPORTED:
        text = f"Unrecognized request argument supplied: {param}" if kind == "extra_forbidden" else msg
        if kind != "extra_forbidden" and param and param.split(".")[0] != param:
            text += f" (at '{param}')"
        return APIError(400, text, param=param, code="unsupported_parameter")
    code = "missing_required_parameter" if kind == "missing" else "invalid_type" if "type" in kind or kind in (
        "int_parsing", "float_parsing", "string_type", "bool_parsing", "list_type", "dict_type",
        "model_type", "int_type", "float_type", "bool_type") else "invalid_value"
    text = msg if ctx.get("field") or (param and msg.startswith(f"'{param}'")) else (f"'{param}': {msg}" if param else msg)
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, text, param=param, code=code)
