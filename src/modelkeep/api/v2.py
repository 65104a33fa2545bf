"""Open Inference Protocol (KServe V2) REST endpoints. They translate; the service decides."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from modelkeep.audit.access import input_digest
from modelkeep.service import Service

from ._auth import principal_of
from ._body import header_length, read_body
from ._errors import error_response
from ._infer import InferRunner
from ._openapi import errors

HEADER_LENGTH = "inference-header-content-length"


def v2_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["inference (Open Inference Protocol v2)"])
    max_body = service.settings.max_request_bytes

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
        return service.server_metadata(principal_of(request))

    @router.get("/models/{model}", responses=errors(403, 404))
    async def model_metadata(request: Request, model: str) -> dict[str, Any]:
        return service.model_metadata(principal_of(request), model, None)

    @router.get("/models/{model}/versions/{version}", responses=errors(403, 404))
    async def version_metadata(request: Request, model: str, version: str) -> dict[str, Any]:
        return service.model_metadata(principal_of(request), model, version)

    async def _ready(request: Request, model: str, version: str | None) -> Response:
        principal = principal_of(request)
        ok = await run_in_threadpool(service.model_ready, principal, model, version)
        if ok:
            return JSONResponse({"name": model, "ready": True})
        return error_response(503, f"model '{model}' is not ready", {"Retry-After": "1"})

    @router.get("/models/{model}/ready", responses=errors(403, 404, 503))
    async def model_ready(request: Request, model: str) -> Response:
        return await _ready(request, model, None)

    @router.get("/models/{model}/versions/{version}/ready", responses=errors(403, 404, 503))
    async def version_ready(request: Request, model: str, version: str) -> Response:
        return await _ready(request, model, version)

    runner = InferRunner(service)

    async def _infer(request: Request, model: str, version: str | None) -> Response:
        # Served by the fast path (_fast.py) in a running server; kept for the OpenAPI
        # description and for apps built without it.
        length = header_length(request.headers.get(HEADER_LENGTH))
        body = await read_body(request, max_body)
        request.state.input_digest = input_digest(body)
        content, headers = await runner.run(
            principal_of(request), model, version, body, length, stats=request.scope["state"]
        )
        media_type = headers.pop("content-type", "application/json")
        return Response(content, media_type=media_type, headers=headers)

    @router.post("/models/{model}/infer")
    async def infer(request: Request, model: str) -> Response:
        return await _infer(request, model, None)

    @router.post("/models/{model}/versions/{version}/infer")
    async def infer_version(request: Request, model: str, version: str) -> Response:
        return await _infer(request, model, version)

    return router
