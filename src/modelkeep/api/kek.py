"""Key-encryption key API for admins under /api/v1/kek (see docs/scale-out.md, "Key services")."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from modelkeep.registry.rotation import MAX_BATCH, RewrapPass
from modelkeep.service import Service

from ._auth import principal_of


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    new_key: bool = Field(
        default=True,
        description="Make a new KEK in the key service first (false: only look up the newest)",
    )


class RewrapIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=100, ge=1, le=MAX_BATCH, description="Rows in this pass")
    after: int | None = Field(
        default=0, ge=0, description="Versions cursor from the previous pass (null: done)"
    )
    capture_after: str | None = Field(
        default="",
        max_length=32,
        description="Captures cursor from the previous pass (null: done)",
    )


def _pass_out(done: RewrapPass) -> dict[str, Any]:
    return {
        "key_id": done.key_id,
        "rewrapped": [{"model": m, "version": v} for m, v in done.rewrapped],
        "rewrapped_captures": done.rewrapped_captures,
        "refused": [
            {"model": r.model, "version": r.version, "reason": r.reason}
            | ({} if r.capture is None else {"capture": r.capture})
            for r in done.refused
        ],
        "remaining": done.remaining,
        "remaining_captures": done.remaining_captures,
        "after": done.after,
        "capture_after": done.capture_after,
    }


def kek_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1/kek", tags=["key-encryption key"])

    @router.get("")
    async def status(request: Request) -> dict[str, Any]:
        """The key service, its current key id, and how many versions and captured payloads
        each KEK wraps."""
        return await run_in_threadpool(service.kek_status, principal_of(request))

    @router.post("/rotate")
    async def rotate(request: Request, body: RotateIn | None = None) -> dict[str, Any]:
        """Make a new KEK current in the key service; then re-wrap with /rewrap passes."""
        new_key = True if body is None else body.new_key
        key_id = await run_in_threadpool(
            lambda: service.kek_rotate(principal_of(request), new_key=new_key)
        )
        return {"key_id": key_id}

    @router.post("/rewrap")
    async def rewrap(request: Request, body: RewrapIn | None = None) -> dict[str, Any]:
        """One pass: re-wrap up to `limit` versions, then captured payloads, still under an
        older KEK (resumable: hand back `after` and `capture_after` until both are null)."""
        given = body or RewrapIn()
        done = await run_in_threadpool(
            lambda: service.kek_rewrap(
                principal_of(request),
                limit=given.limit,
                after=given.after,
                capture_after=given.capture_after,
            )
        )
        return _pass_out(done)

    return router
