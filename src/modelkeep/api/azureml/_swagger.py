"""``/swagger.json``: the OpenAPI 2.0 document the Azure ML inference server offers.

Same layout as ``azureml-inference-server-http`` writes it (``/`` liveness, ``/score`` with a
``ServiceInput`` body and a ``ServiceOutput`` answer, Bearer key security), with the input and
output schemas worked out from the model's signature, so tools that generate clients or test
payloads from it (the studio's test tab, AutoRest) get the model's real shapes.
"""

from __future__ import annotations

from typing import Any

from modelkeep.runtime.signature import ModelSignature, TensorSpec

__all__ = ["swagger_document"]

_JSON_TYPES: dict[str, dict[str, str]] = {
    "BOOL": {"type": "boolean"},
    "UINT8": {"type": "integer", "format": "int32"},
    "UINT16": {"type": "integer", "format": "int32"},
    "UINT32": {"type": "integer", "format": "int64"},
    "UINT64": {"type": "integer", "format": "int64"},
    "INT8": {"type": "integer", "format": "int32"},
    "INT16": {"type": "integer", "format": "int32"},
    "INT32": {"type": "integer", "format": "int32"},
    "INT64": {"type": "integer", "format": "int64"},
    "FP16": {"type": "number", "format": "float"},
    "FP32": {"type": "number", "format": "float"},
    "FP64": {"type": "number", "format": "double"},
    "BYTES": {"type": "string"},
}


def _row_schema(spec: TensorSpec) -> dict[str, Any]:
    """One row of ``spec`` (its shape without the batch axis) as a JSON schema."""
    schema: dict[str, Any] = dict(_JSON_TYPES[spec.datatype])
    for size in reversed(spec.shape[1:]):
        schema = {"type": "array", "items": schema}
        if size >= 0:
            schema["minItems"] = schema["maxItems"] = size
    return schema


def _rows_schema(specs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    if len(specs) == 1:
        return {"type": "array", "items": _row_schema(specs[0])}
    properties = {spec.name: _row_schema(spec) for spec in specs}
    return {
        "type": "array",
        "items": {"type": "object", "properties": properties, "required": list(properties)},
    }


def swagger_document(model: str, version: int, signature: ModelSignature) -> dict[str, Any]:
    """The OpenAPI 2.0 document for ``/score`` serving ``model`` at ``version``."""
    rows = _rows_schema(signature.inputs)
    single = signature.inputs[0] if len(signature.inputs) == 1 else None
    input_data: dict[str, Any] = {
        "type": "object",
        "description": "pandas 'split' form: column names, row index and rows",
        "properties": {
            "columns": {"type": "array", "items": {"type": "string"}},
            "index": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {"type": "array", "items": {}}},
        },
        "required": ["data"],
    }
    if single is not None:
        input_data["properties"]["data"] = rows
    error = {
        "description": "The request was refused.",
        "schema": {"$ref": "#/definitions/ErrorResponse"},
    }
    return {
        "swagger": "2.0",
        "info": {
            "title": model,
            "description": (
                f"API specification for the Azure Machine Learning service {model}, "
                f"served by modelkeep (version {version})"
            ),
            "version": str(version),
        },
        "schemes": ["https"],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "securityDefinitions": {
            "Bearer": {
                "type": "apiKey",
                "name": "Authorization",
                "in": "header",
                "description": "A modelkeep API key, for example: Bearer mk_...",
            }
        },
        "paths": {
            "/": {
                "get": {
                    "operationId": "ServiceHealthCheck",
                    "description": "Liveness: answers 'Healthy' while the server runs.",
                    "produces": ["text/plain"],
                    "responses": {
                        "200": {"description": "The server is up.", "schema": {"type": "string"}},
                    },
                }
            },
            "/score": {
                "post": {
                    "operationId": "RunMLService",
                    "description": "Run the model on the rows given; one prediction per row.",
                    "security": [{"Bearer": []}],
                    "parameters": [
                        {
                            "name": "serviceInputPayload",
                            "in": "body",
                            "description": "The rows to score.",
                            "schema": {"$ref": "#/definitions/ServiceInput"},
                        },
                        {
                            "name": "azureml-model-deployment",
                            "in": "header",
                            "type": "string",
                            "required": False,
                            "description": "A modelkeep label naming the version to use.",
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "One prediction per row.",
                            "schema": {"$ref": "#/definitions/ServiceOutput"},
                        },
                        "400": error,
                        "401": error,
                        "403": error,
                        "404": error,
                        "413": error,
                        "429": error,
                        "503": error,
                    },
                }
            },
        },
        "definitions": {
            "ServiceInput": {
                "type": "object",
                "description": "Exactly one of 'data' (rows) and 'input_data'.",
                "properties": {"data": rows, "input_data": input_data},
            },
            "ServiceOutput": _rows_schema(signature.outputs),
            "ErrorResponse": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            },
        },
    }
