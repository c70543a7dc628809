"""The OpenAPI 3.1 document of the admin API, built from the endpoint table and pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from admin import schemas
from admin.api import ENDPOINTS, MAX_BODY_BYTES, PATH_ID, PREFIX, RETRY_AFTER_SECONDS

REF = "#/components/schemas/{model}"
DESCRIPTION = f"""\
Every call needs `Authorization: Bearer <org API token>` and sees only that organization.

Limits, checked before anything else: a request body is JSON of at most {MAX_BODY_BYTES} bytes (else 413)
and nests at most 1024 deep (else 400); ids are integers from 1 to {schemas.BIGINT_MAX} (PostgreSQL bigint);
text must not contain the NUL character; a JSON body's booleans and integers are JSON booleans and integers
(no strings); query-string integers are decimal digits and date-times RFC 3339 with an offset; a query
parameter may appear once. Any of these wrong answers 4xx with `{{"error": {{"code", "message", "field"?}}}}`.
While the database is unreachable every call answers 503 with `Retry-After`."""
ERROR_DESCRIPTIONS = {
    400: "The request body is not JSON (malformed, invalid UTF-8 or nested too deep)",
    401: "Missing or invalid API token",
    404: "No such id in this organization",
    409: "Conflicts with what exists",
    413: f"The request body is larger than {MAX_BODY_BYTES} bytes",
    422: "A parameter or body field is invalid (the error names it)",
    500: "Unexpected server error (logged)",
    503: "The database is unreachable: retry after the Retry-After seconds",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema: an absent parameter is the default, so no ``null`` branch."""
    branches = [b for b in prop.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **branches[0]}
    return {k: v for k, v in prop.items() if k != "title" and not (k == "default" and v is None)}


def _error(code: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[code],
        "content": {"application/json": {"schema": _ref(schemas.ErrorBody)}},
    }
    if code == 503:
        response["headers"] = {
            "Retry-After": {
                "description": f"Seconds to wait before retrying ({RETRY_AFTER_SECONDS})",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return response


def build_openapi() -> dict[str, Any]:
    models: set[type[BaseModel]] = {schemas.ErrorBody}
    for e in ENDPOINTS:
        models.update(m for m in (e.body, e.response) if m is not None)
    _, defs = models_json_schema(
        [(m, "validation" if m in {e.body for e in ENDPOINTS} else "serialization") for m in models],
        ref_template=REF,
    )
    path_schema = PATH_ID.json_schema()
    paths: dict[str, dict[str, Any]] = {}
    for e in ENDPOINTS:
        op: dict[str, Any] = {
            "operationId": e.handler.__name__,
            "summary": e.summary,
            "security": [{"bearer": []}],
            "parameters": [],
            "responses": {},
        }
        for name in e.path_params:
            op["parameters"].append({"name": name, "in": "path", "required": True, "schema": path_schema})
        if e.query is not None:
            for name, prop in e.query.model_json_schema()["properties"].items():
                op["parameters"].append({"name": name, "in": "query", "required": False, "schema": _query_schema(prop)})
        if e.body is not None:
            op["requestBody"] = {
                "required": True,
                "description": f"JSON, at most {MAX_BODY_BYTES} bytes",
                "content": {"application/json": {"schema": _ref(e.body)}},
            }
        if e.response is not None:
            body: dict[str, Any] = _ref(e.response)
            if e.many:
                body = {"type": "array", "items": body}
            op["responses"][str(e.status)] = {"description": "OK", "content": {"application/json": {"schema": body}}}
        else:
            op["responses"][str(e.status)] = {"description": "Done"}
        for code in e.error_statuses():
            op["responses"][str(code)] = _error(code)
        paths.setdefault(PREFIX + e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "BlameTrail admin API", "version": "1", "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
