"""The one map from modelkeep error codes to HTTP status, and the handlers that apply it.

No handler ever sends an exception's text unless it is a ModelkeepError, whose message is written
to be shown. Anything else becomes a bare 500 with a neutral message; details go to the log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from modelkeep.errors import ModelkeepError

log = logging.getLogger(__name__)

STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "model_refused": 422,
    "rate_limited": 429,
    "unavailable": 503,
    "integrity": 503,
    "config": 500,
    "internal": 500,
}


def error_response(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    details: Mapping[str, object] | None = None,
) -> Response:
    body: dict[str, object] = {"error": message}
    if details:
        body.update({k: v for k, v in details.items() if k != "error"})
    return JSONResponse(body, status_code=status, headers=headers)


def modelkeep_error_response(exc: ModelkeepError) -> Response:
    status = STATUS_BY_CODE.get(exc.code, 500)
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="modelkeep"'
    shown = status < 500 or exc.code in ("unavailable", "integrity")
    message = exc.message if shown else "internal error"
    return error_response(status, message, headers, exc.details if status < 500 else None)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid value"))[:200]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    async def on_modelkeep_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ModelkeepError)
        if exc.code in ("internal", "config"):
            log.error("internal error", exc_info=exc)
        return modelkeep_error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(400, _validation_message(exc))

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        messages = {404: "not found", 405: "method not allowed"}
        message = messages.get(exc.status_code, "request refused")
        return error_response(exc.status_code, message, exc.headers)

    async def on_unexpected(_request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal error")

    app.add_exception_handler(ModelkeepError, on_modelkeep_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
