"""The OpenAPI description told truthfully: every status a route can answer, with its body.

Routes declare the statuses their own handlers and the service can raise (``errors(...)``);
``install_openapi`` adds the ones that come from layers under every route, in one place:

- 431 and 503 from the connection layer (``_connections``), on every path: a request head over
  ``max_header_bytes`` or with too many fields, a worker or client over its connection limit;
- 401 (and 503 when the failure cannot be audited) from ``AuthenticationMiddleware``, on every
  path but the public health checks;
- 413 from ``BodyLimitMiddleware``, on every route that takes a request body;
- 400 instead of FastAPI's 422 for a request that fails validation: ``_errors`` answers 400 with
  the error body, and 422 is kept for what it means here, a model modelkeep refuses.

A 405's ``Allow`` names every method of the path, as the description does (Starlette's names
only those of the first route whose path matched). A method the description does not list, on
a path it does, is 405 too, also where no FastAPI route serves the path (the protocols' routes,
answered before routing): not 404.

Every error has the same body, :class:`ErrorOut`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from modelkeep.registry.records import NAME_PATTERN

from ._auth import PUBLIC_PATHS
from ._errors import error_response

#: What a model or label name may be. Documented, not checked by FastAPI: the service checks
#: names where it matters (an unknown name is 404, a bad new name 400, as the routes say).
NAME_SCHEMA: dict[str, Any] = {"pattern": f"^{NAME_PATTERN.pattern}$"}
ModelName = Annotated[str, Path(description="Model name", json_schema_extra=NAME_SCHEMA)]
LabelName = Annotated[str, Path(description="Label name", json_schema_extra=NAME_SCHEMA)]

_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_only(value: object) -> object:
    # pydantic also reads a bare number as seconds since 1970; the API promises RFC 3339 text.
    if isinstance(value, str) and _ISO_DATE.match(value) is None:
        raise ValueError("expected an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z")
    if isinstance(value, int | float):
        raise ValueError("expected an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z")
    return value


def _whole_number(value: object) -> object:
    # JSON Schema's integer is any whole number, 3.0 included; a bool or a string is not one.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a whole number")
    return value


#: Reads a JSON integer (``3`` or ``3.0``), never a bool or a numeric string. Put it after any
#: ``Field`` bounds in ``Annotated[...]`` so that they show in the schema.
WHOLE_NUMBER = BeforeValidator(_whole_number)
WholeNumber = Annotated[int, WHOLE_NUMBER]

#: A time as RFC 3339 text (``format: date-time``), never a number.
DateTime = Annotated[datetime, BeforeValidator(_iso_only)]


class ErrorOut(BaseModel):
    """The body of every error answer. Some errors add showable details (a scan report)."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="What went wrong, written to be shown to the caller")


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_DESCRIPTIONS: dict[int, tuple[str, dict[str, Any] | None]] = {
    400: ("Invalid request: a parameter, header or the body is malformed", None),
    401: (
        "No valid API key: missing, malformed, unknown, expired or revoked",
        {
            "WWW-Authenticate": {
                "description": 'Always `Bearer realm="modelkeep"`',
                "schema": {"type": "string"},
            }
        },
    ),
    403: ("The key's role or model list does not allow this", None),
    404: ("No such model, version, label, key or record", None),
    409: ("Conflict: it already exists, or a concurrent change won", None),
    413: ("The request body is over the server's limit", None),
    422: ("The model is refused: not a servable format, unsafe content, bad signature", None),
    429: ("Over a rate, concurrency or budget limit", _RETRY_AFTER),
    431: ("The request head is over the server's limit (size or number of fields)", None),
    503: (
        "Unavailable: not ready, draining, or the audit log or key service cannot be reached",
        _RETRY_AFTER,
    ),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries of a route for these error statuses, each with ErrorOut."""
    found: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _DESCRIPTIONS[status]
        found[status] = {"model": ErrorOut, "description": description}
        if headers is not None:
            found[status]["headers"] = headers
    return found


def _error_response(status: int) -> dict[str, Any]:
    description, headers = _DESCRIPTIONS[status]
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    }
    if headers is not None:
        response["headers"] = headers
    return response


def _ordered(responses: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(responses.items()))


def truthful_schema(app: FastAPI, extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The app's OpenAPI description with the statuses of the layers under the routes.

    ``extra_paths`` are path items of routes no FastAPI route serves (the protocols' pure-ASGI
    entries answer them before routing); they get the same layer statuses.
    """
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schema["paths"] = {**(extra_paths or {}), **schema.get("paths", {})}
    # Every path but the health checks needs an API key as a bearer token (the middleware).
    schema["components"] = schema.get("components", {})
    schema["components"]["securitySchemes"] = {
        "apiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key, `mk_<id>_<secret>` (`modelkeep keys create`)",
        }
    }
    schema["security"] = [{"apiKey": []}]
    components = schema["components"].setdefault("schemas", {})
    components.setdefault("ErrorOut", ErrorOut.model_json_schema())
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            validation = responses.get("422", {}).get("content", {}).get("application/json", {})
            if validation.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
                responses.setdefault("400", _error_response(400))
            responses.setdefault("431", _error_response(431))
            responses.setdefault("503", _error_response(503))
            if path in PUBLIC_PATHS:
                operation["security"] = []
            else:
                responses.setdefault("401", _error_response(401))
            if "requestBody" in operation:
                responses.setdefault("413", _error_response(413))
            operation["responses"] = _ordered(responses)
    return schema


def path_methods(schema: dict[str, Any]) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """Each path template of ``schema`` as a pattern, with the methods it answers (HEAD too
    where GET is, as Starlette answers it)."""
    found = []
    for path, operations in schema.get("paths", {}).items():
        # TF Serving's names never hold ':' (its verbs follow one: /v1/models/m:predict).
        segment = "[^/:]+" if path.startswith("/v1/models/") else "[^/]+"
        pattern = re.compile(re.sub(r"\\\{[^/]+?\\\}", segment, re.escape(path)))
        methods = {method.upper() for method in operations}
        if "GET" in methods:
            methods.add("HEAD")
        found.append((pattern, frozenset(methods)))
    return found


def install_openapi(app: FastAPI, extra_paths: Callable[[], dict[str, Any]] | None = None) -> None:
    """Serve :func:`truthful_schema` (built once, with ``extra_paths()``) as the app's OpenAPI
    description, and give each 405 an ``Allow`` header that names every method of the path."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_schema(app, extra_paths() if extra_paths else None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    templates: list[tuple[re.Pattern[str], frozenset[str]]] = []

    async def on_method_not_allowed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if not templates:
            templates.extend(path_methods(openapi()))
        path = request.scope["path"]
        methods = set((exc.headers or {}).get("Allow", "").replace(" ", "").split(","))
        for pattern, answered in templates:
            if pattern.fullmatch(path):
                methods |= answered
        allow = ", ".join(sorted(m for m in methods if m))
        return error_response(405, "method not allowed", {**(exc.headers or {}), "Allow": allow})

    async def on_not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if not templates:
            templates.extend(path_methods(openapi()))
        path = request.scope["path"]
        methods: set[str] = set()
        for pattern, answered in templates:
            if pattern.fullmatch(path):
                methods |= answered
        if methods and request.scope["method"] not in methods:
            # A described path asked with a method it does not answer.
            allow = ", ".join(sorted(methods))
            return error_response(405, "method not allowed", {"Allow": allow})
        return error_response(404, "not found", exc.headers)

    app.add_exception_handler(405, on_method_not_allowed)
    app.add_exception_handler(404, on_not_found)
