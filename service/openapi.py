"""OpenAPI for request bodies the routes read raw (so a missing Content-Type or a binary tail
still works): the wire models' schemas are registered as components and referenced."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def raw_body(model: type[BaseModel], *, binary: bool = False, required: bool = True) -> dict:
    """``openapi_extra`` documenting a body of ``model`` (and its binary-extension variant)."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}
    }
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "JSON header (Inference-Header-Content-Length bytes) + tensor bytes",
        }
    return {"requestBody": {"required": required, "content": content}}


def path_parameters(*names: str) -> dict:
    """``openapi_extra`` declaring string path parameters that the endpoint reads from
    ``request.path_params`` itself rather than from its signature."""
    return {
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in names
        ]
    }


def install_openapi(app: FastAPI, body_models: list[type[BaseModel]]) -> None:
    """Build the schema once, adding ``body_models`` (and what they reference) as components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _, definitions = models_json_schema(
                [(model, "validation") for model in body_models], ref_template=REF
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.get("$defs", {}).items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
