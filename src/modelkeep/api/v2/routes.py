"""Open Inference Protocol (KServe V2) REST endpoints. They translate; the service decides."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from modelkeep.api._auth import principal_of
from modelkeep.api._errors import error_response
from modelkeep.api._openapi import errors
from modelkeep.runtime.signature import V2_DATATYPES
from modelkeep.service import Service

# The infer routes are served by the fast entry (``infer.py``) and only documented here.
INFER_DOC = "Run the model (Open Inference Protocol v2 infer: JSON or binary tensor data)."


def _v2_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """V2's model metadata: the data plane's without the version it would serve."""
    meta.pop("version", None)
    return meta


_PARAMETERS: dict[str, Any] = {"type": "object", "description": "Protocol parameters."}
_DATATYPE: dict[str, Any] = {"type": "string", "enum": sorted(V2_DATATYPES)}
_SHAPE: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}}
# The JSON form of an infer request. What JSON Schema cannot say, the description does: the
# inputs must be the model's (every input of its signature once, with its datatype, rank and
# fixed dimensions), and ``data`` must hold as many values as the shape, flat or nested.
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "An Open Inference Protocol infer request. The inputs must be those of the model's "
        "signature (GET /v2/models/{model}), each once, with its datatype, rank and fixed "
        "dimensions, and data holding as many values as the shape (flat or nested row-major)."
    ),
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": _SHAPE,
                    "datatype": _DATATYPE,
                    "parameters": _PARAMETERS,
                    "data": {"description": "The values, flat or nested row-major."},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
            },
        },
    },
}
INFER_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": _SHAPE,
                    "datatype": _DATATYPE,
                    "parameters": _PARAMETERS,
                    "data": {
                        "type": "array",
                        "description": "Flat row-major values (absent when sent as binary).",
                    },
                },
            },
        },
    },
}
# The binary tensor data extension: a JSON header of Inference-Header-Content-Length bytes,
# then the tensors' bytes. Not describable in JSON Schema; described in words.
_BINARY_BODY: dict[str, Any] = {
    "type": "string",
    "format": "binary",
    "description": (
        "Binary tensor data extension: the JSON request (inputs with parameters."
        "binary_data_size instead of data) in the first Inference-Header-Content-Length bytes, "
        "then each input's little-endian row-major bytes in input order."
    ),
}


def infer_openapi_paths() -> dict[str, Any]:
    """OpenAPI path items for the two infer routes, which no FastAPI route serves: the fast
    entry (``infer.py``) answers them before routing."""
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    body = {"type": "string", "format": "binary"}
    errors = {
        "400": "the request does not fit the model's signature",
        "401": "missing or invalid API key",
        "403": "the key may not run this model, or is suspended",
        "404": "no such model or version",
        "413": "the body or a tensor is too large",
        "429": "over a rate, row or budget limit",
        "503": "overloaded, timed out, or the model could not be loaded",
    }

    def item(params: list[dict[str, Any]], operation_id: str) -> dict[str, Any]:
        responses: dict[str, Any] = {
            "200": {
                "description": "the outputs, hardened for the caller's role",
                "content": {
                    "application/json": {"schema": INFER_RESPONSE_SCHEMA},
                    "application/octet-stream": {"schema": body},
                },
            }
        }
        for status, text in errors.items():
            responses[status] = {
                "description": text,
                # The one error schema of every route (api/_openapi.py adds the component).
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}
                },
            }
        return {
            "post": {
                "tags": ["inference (Open Inference Protocol v2)"],
                "summary": "Infer",
                "description": INFER_DOC,
                "operationId": operation_id,
                "parameters": params,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": INFER_REQUEST_SCHEMA},
                        "application/octet-stream": {"schema": _BINARY_BODY},
                    },
                },
                "responses": responses,
            }
        }

    return {
        "/v2/models/{model}/infer": item([model], "infer"),
        "/v2/models/{model}/versions/{version}/infer": item([model, version], "infer_version"),
    }


def v2_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["inference (Open Inference Protocol v2)"])

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", responses=errors(503))
    async def ready() -> Response:
        if service.ready():
            return JSONResponse({"ready": True})
        return error_response(503, "not ready", {"Retry-After": "1"})

    @router.get("", responses=errors(403))
    async def server_metadata(request: Request) -> dict[str, Any]:
        return service.dataplane.server_metadata(principal_of(request))

    @router.get("/models/{model}", responses=errors(403, 404))
    async def model_metadata(request: Request, model: str) -> dict[str, Any]:
        return _v2_metadata(service.dataplane.model_metadata(principal_of(request), model))

    @router.get("/models/{model}/versions/{version}", responses=errors(403, 404))
    async def version_metadata(request: Request, model: str, version: str) -> dict[str, Any]:
        meta = service.dataplane.model_metadata(principal_of(request), model, version)
        return _v2_metadata(meta)

    async def _ready(request: Request, model: str, version: str | None) -> Response:
        principal = principal_of(request)
        ok = await run_in_threadpool(service.dataplane.model_ready, principal, model, version)
        if ok:
            return JSONResponse({"name": model, "ready": True})
        return error_response(503, f"model '{model}' is not ready", {"Retry-After": "1"})

    @router.get("/models/{model}/ready", responses=errors(403, 404, 503))
    async def model_ready(request: Request, model: str) -> Response:
        return await _ready(request, model, None)

    @router.get("/models/{model}/versions/{version}/ready", responses=errors(403, 404, 503))
    async def version_ready(request: Request, model: str, version: str) -> Response:
        return await _ready(request, model, version)

    return router
