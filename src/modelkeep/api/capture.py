"""Payload capture API for auditors under /api/v1/models/{model}/captures (see docs/capture.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from modelkeep.service import Service
from modelkeep.store.captures import CaptureInfo

from ._auth import principal_of
from ._openapi import DateTime, ModelName, errors


def capture_info_out(info: CaptureInfo) -> dict[str, Any]:
    """What a listing shows of a record: who, when, which version, sizes; never content."""
    return {
        "id": info.id,
        "time": info.created_at.isoformat(),
        "expires_at": info.expires_at.isoformat(),
        "principal": info.principal,
        "version": info.version,
        "input_size": info.input_size,
        "output_size": info.output_size,
        "sealed_size": info.sealed_size,
    }


def capture_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1/models/{model}/captures", tags=["payload capture"])

    @router.get("", responses=errors(400, 403, 404))
    async def list_captures(
        request: Request,
        model: ModelName,
        since: DateTime | None = None,
        until: DateTime | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Captured requests of the model, newest first: metadata only (auditors, admins)."""
        found = await run_in_threadpool(
            lambda: service.list_captures(
                principal_of(request), model, since=since, until=until, limit=limit
            )
        )
        return {"model": model, "captures": [capture_info_out(info) for info in found]}

    @router.get("/{capture_id}", responses=errors(403, 404))
    async def read_capture(request: Request, model: ModelName, capture_id: str) -> dict[str, Any]:
        """One captured request and response, decrypted (auditors, admins); every read is
        recorded in the audit log before the answer is sent."""
        info, record = await run_in_threadpool(
            service.read_capture, principal_of(request), model, capture_id
        )
        return {**capture_info_out(info), "record": record.to_json()}

    return router
