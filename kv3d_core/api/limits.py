"""Reading a request body without trusting it.

Every check here runs before the body reaches pydantic, the chat template or the
tokenizer, and each failure is a 4xx in OpenAI's error shape:

- the media type: JSON only (``application/json``, ``application/*+json``, or no
  ``Content-Type`` at all, as FastAPI assumes); anything else is 415;
- the size: ``Content-Length`` is checked before a byte is read, and the body is
  read as a stream that stops at the cap, so a 400 MB POST costs at most the cap in
  memory (413);
- the JSON: numbers of at most :data:`MAX_INT_DIGITS` digits (Python refuses to
  parse integers past 4,300 digits with a ValueError that was a 500), finite floats,
  no ``NaN``/``Infinity``, nesting at most :data:`MAX_DEPTH` deep (deeper JSON made
  the parser or, later, the template raise RecursionError);
- the strings: every key and value must be encodable as UTF-8. JSON's ``\\ud800``
  escapes decode to lone surrogates, which no tokenizer can take
  (UnicodeEncodeError).

A response sent without reading the whole body carries ``Connection: close``: the
unread bytes cannot be told from the next request.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import ClientDisconnect, Request

from kv3d_core.api.errors import APIError

MAX_DEPTH = 64            # JSON nesting (objects and arrays); OpenAI's deepest bodies (tool schemas) stay far below
MAX_INT_DIGITS = 32       # digits of an integer literal; the largest meaningful value (a 64-bit seed) has 20
CLOSE = {"Connection": "close"}


class _BadNumber(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text) - (text[0] == "-") > MAX_INT_DIGITS:
        raise _BadNumber(f"an integer in the request body has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:40]}{'...' if len(text) > 40 else ''} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not valid JSON")


def is_json_media_type(content_type: str | None) -> bool:
    """True for a body kv3d parses as JSON: no Content-Type, ``application/json`` or
    ``application/<something>+json`` (parameters such as ``charset`` ignored)."""
    if not content_type:
        return True
    mtype = content_type.split(";", 1)[0].strip().lower()
    return mtype == "application/json" or (mtype.startswith("application/") and mtype.endswith("+json"))


async def read_body(request: Request, max_bytes: int) -> bytearray:
    """The raw body, refused (413, connection closed) as soon as it is known to pass
    ``max_bytes``: from ``Content-Length`` before reading, else while streaming it."""
    limit_mb = f"{max_bytes / 2**20:g} MB"
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header", code="invalid_request", headers=CLOSE)
        if len(declared) > 15 or int(declared) > max_bytes:
            raise APIError(413, f"request body larger than {limit_mb}", code="request_too_large", headers=CLOSE)
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_bytes:
                raise APIError(413, f"request body larger than {limit_mb}", code="request_too_large", headers=CLOSE)
    except ClientDisconnect as exc:   # nobody reads this answer; the client is gone
        raise APIError(400, "the client disconnected while sending the body", code="client_disconnected",
                       headers=CLOSE) from exc
    return buf


def parse_json(raw: bytes | bytearray) -> Any:
    """``raw`` as JSON, bounded: see the module's docstring. A 400 on anything else."""
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except _BadNumber as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}.", code="invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: it is nested deeper than "
                            f"{MAX_DEPTH} levels.", code="invalid_json") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json") from exc
    check_tree(data)
    return data


def _path(parts: tuple) -> str | None:
    # a key may itself hold the surrogate: escape it, or the error could not be sent either
    return ".".join(str(p).encode("utf-8", "backslashreplace").decode("utf-8") for p in parts) or None


def check_tree(data: Any) -> None:
    """Depth and string checks over parsed JSON, without recursion."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise APIError(400, f"We could not parse the JSON body of your request: it is nested deeper than "
                                f"{MAX_DEPTH} levels.", param=_path(path[:3]), code="invalid_json")
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, value in items:
            if isinstance(key, str) and not _encodable(key):
                _unencodable(path + (key,))
            if isinstance(value, str):
                if not _encodable(value):
                    _unencodable(path + (key,))
            elif isinstance(value, (dict, list)):
                stack.append((value, path + (key,)))


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unencodable(path: tuple) -> None:
    param = _path(path)
    raise APIError(400, f"'{param}' is not valid Unicode: it holds a lone surrogate (such as \\ud800), which "
                        "cannot be encoded as UTF-8", param=param, code="invalid_value")


def check_media_type(request: Request) -> None:
    """415 unless the body is sent as JSON (the body is then left unread)."""
    ctype = request.headers.get("content-type")
    if not is_json_media_type(ctype):
        raise APIError(415, f"Unsupported Content-Type {ctype!r}: send the body as JSON with "
                            "'Content-Type: application/json'", code="unsupported_media_type", headers=CLOSE)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, after every check above."""
    check_media_type(request)
    return parse_json(await read_body(request, max_bytes))
