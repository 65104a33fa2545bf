"""OpenAPI path items for TensorFlow Serving's routes (and Vertex AI's, when configured).

No FastAPI route serves them: ``api/_entry.py`` answers them before routing. They are described
here so that the served OpenAPI document lists every route with every status it can answer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["protocol_openapi_paths"]

_TAG = "inference (TensorFlow Serving REST)"
# The one error schema of every route (api/_openapi.py adds it to the components).
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
_INFER_ERRORS = {
    "400": "the body does not fit the protocol or the model's signature",
    "401": "missing or invalid API key",
    "403": "the key may not run this model, or is suspended",
    "404": "no such model, version or label",
    "413": "the body or a tensor is too large, or too many rows",
    "429": "over a rate or budget limit",
    "503": "overloaded, timed out, or the model could not be loaded",
}
_READ_ERRORS = {
    "401": "missing or invalid API key",
    "403": "the key may not read this model",
    "404": "no such model, version or label",
    "503": "the key service or the blob store is unavailable",
}
_VERBS = {
    "predict": "Predict (row form 'instances' or columnar form 'inputs')",
    "classify": "Classify 'examples' (classifiers: a label and a class-score output)",
    "regress": "Regress 'examples' (regressors: one floating-point output)",
}


def _parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _responses(success: str, errors: dict[str, str]) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": success,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
    for status, text in errors.items():
        responses[status] = {"description": text, "content": _ERROR}
    return responses


def _post(summary: str, operation_id: str, params: list[dict[str, Any]], tag: str) -> Any:
    return {
        "post": {
            "tags": [tag],
            "summary": summary,
            "operationId": operation_id,
            "parameters": params,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "responses": _responses("the answer, hardened for the caller's role", _INFER_ERRORS),
        }
    }


def _get(summary: str, operation_id: str, params: list[dict[str, Any]]) -> Any:
    return {
        "get": {
            "tags": [_TAG],
            "summary": summary,
            "operationId": operation_id,
            "parameters": params,
            "responses": _responses(summary, _READ_ERRORS),
        }
    }


def protocol_openapi_paths(
    vertex_predict_route: str | None = None, vertex_health_route: str | None = None
) -> dict[str, Any]:
    """Path items for every TF Serving route, and the Vertex AI routes that are configured."""
    selectors = {
        "": ([], ""),
        "/versions/{version}": ([_parameter("version")], "_version"),
        "/labels/{label}": ([_parameter("label")], "_label"),
    }
    paths: dict[str, Any] = {}
    for selector, (extra, suffix) in selectors.items():
        params = [_parameter("model"), *extra]
        base = "/v1/models/{model}" + selector
        for verb, summary in _VERBS.items():
            paths[f"{base}:{verb}"] = _post(summary, f"tfserving_{verb}{suffix}", params, _TAG)
        paths[base] = _get("Model version status", f"tfserving_status{suffix}", params)
        paths[f"{base}/metadata"] = _get(
            "Model metadata (signature_def)", f"tfserving_metadata{suffix}", params
        )
    if vertex_predict_route is not None:
        paths[vertex_predict_route] = _post(
            "Vertex AI prediction ('instances', 'parameters')",
            "vertex_predict",
            [],
            "inference (Vertex AI)",
        )
    if vertex_health_route is not None:
        paths[vertex_health_route] = {
            "get": {
                "tags": ["inference (Vertex AI)"],
                "summary": "Vertex AI health check (public)",
                "operationId": "vertex_health",
                "security": [],
                "responses": _responses("the server is ready", {"503": "the server is not ready"}),
            }
        }
    return paths
