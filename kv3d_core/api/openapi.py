"""The served OpenAPI schema, with the request bodies FastAPI cannot see.

The endpoints parse their bodies by hand (every bad input a 400, never FastAPI's 422),
so FastAPI's generated schema declares no request body and a fuzzer never reaches
them. :func:`install` adds, per endpoint, the pydantic model's JSON schema as the
``application/json`` body, the OpenAI-shaped error responses, ``model`` as the one id
this server serves, and the bearer scheme when API keys are configured.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {"400": "Invalid request", "401": "Missing or wrong API key", "404": "Unknown model",
                  "413": "Body too large", "415": "Body not sent as JSON",
                  "503": "Overloaded or shutting down (see Retry-After)"}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def install(app: FastAPI, bodies: dict[str, type[BaseModel]], model_id: str, auth: bool,
            protected: tuple[str, ...]) -> None:
    """Serve a schema where each POST path of ``bodies`` declares its model as body."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = ERROR_SCHEMA
        for path, model in bodies.items():
            op = spec.get("paths", {}).get(path, {}).get("post")
            if op is None:
                continue
            body = model.model_json_schema(ref_template=REF)
            schemas.update(body.pop("$defs", {}))
            if "model" in body.get("properties", {}):
                body["properties"]["model"] = {"type": "string", "enum": [model_id],
                                               "description": "the model this server serves"}
            schemas[model.__name__] = body
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF.format(model=model.__name__)}}}}
            responses = op.setdefault("responses", {})
            responses["200"] = {"description": "the completion; with \"stream\": true, Server-Sent Events",
                                "content": {"application/json": {"schema": {"type": "object"}},
                                            "text/event-stream": {"schema": {"type": "string"}}}}
            for status, text in ERROR_STATUSES.items():
                responses.setdefault(status, {"description": text, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="Error")}}}})
        for path, ops in spec.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)             # kv3d answers 400, never FastAPI's 422
                responses.setdefault("default", {"description": "an error in OpenAI's shape", "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="Error")}}}})
        metrics = spec.get("paths", {}).get("/metrics", {}).get("get")
        if metrics is not None:
            metrics["responses"]["200"] = {"description": "Prometheus text exposition",
                                           "content": {"text/plain": {"schema": {"type": "string"}}}}
        if auth:
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in spec.get("paths", {}).items():
                if path.startswith(protected):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
