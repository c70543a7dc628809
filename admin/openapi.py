"""The OpenAPI 3.1 document of the admin API, built from the endpoint table and pydantic models."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from admin import schemas
from admin.api import ENDPOINTS, PREFIX

_CONVERTER = re.compile(r"\{(\w+):\w+\}")
REF = "#/components/schemas/{model}"


def openapi_path(path: str) -> str:
    """``/x/{id:int}`` → ``/api/v1/x/{id}``."""
    return PREFIX + _CONVERTER.sub(r"{\1}", path)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def build_openapi() -> dict[str, Any]:
    models: set[type[BaseModel]] = {schemas.ErrorBody}
    for e in ENDPOINTS:
        models.update(m for m in (e.body, e.response) if m is not None)
    _, defs = models_json_schema(
        [(m, "validation" if m in {e.body for e in ENDPOINTS} else "serialization") for m in models],
        ref_template=REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for e in ENDPOINTS:
        op: dict[str, Any] = {
            "operationId": e.handler.__name__,
            "summary": e.summary,
            "security": [{"bearer": []}],
            "parameters": [],
            "responses": {},
        }
        for name in _CONVERTER.findall(e.path):
            op["parameters"].append({"name": name, "in": "path", "required": True, "schema": {"type": "integer"}})
        if e.query is not None:
            for name, prop in e.query.model_json_schema()["properties"].items():
                op["parameters"].append({"name": name, "in": "query", "required": False, "schema": prop})
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(e.body)}}}
        if e.response is not None:
            body: dict[str, Any] = _ref(e.response)
            if e.many:
                body = {"type": "array", "items": body}
            op["responses"][str(e.status)] = {"description": "OK", "content": {"application/json": {"schema": body}}}
        else:
            op["responses"][str(e.status)] = {"description": "Done"}
        for code in sorted({401, *e.errors}):
            op["responses"][str(code)] = {
                "description": "Error",
                "content": {"application/json": {"schema": _ref(schemas.ErrorBody)}},
            }
        paths.setdefault(openapi_path(e.path), {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "BlameTrail admin API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
