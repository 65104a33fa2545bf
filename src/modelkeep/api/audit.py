"""Audit API for auditors under /api/v1/audit (see docs/audit.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from modelkeep.service import Service

from ._auth import principal_of
from ._openapi import DateTime, errors


def audit_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

    @router.get("/entries", responses=errors(400, 403))
    async def entries(
        request: Request,
        since: DateTime | None = None,
        until: DateTime | None = None,
        actor: str | None = Query(default=None, max_length=64),
        action: str | None = Query(default=None, max_length=64),
        model: str | None = Query(default=None, max_length=63),
        limit: int = Query(default=100, ge=1, le=10_000),
    ) -> dict[str, Any]:
        """Audit entries, newest first, filtered by time, actor, action and model."""
        found = await run_in_threadpool(
            lambda: service.audit_entries(
                principal_of(request),
                since=since,
                until=until,
                actor=actor,
                action=action,
                model=model,
                limit=limit,
            )
        )
        return {"entries": [entry.to_json() for entry in found]}

    @router.get("/verify", responses=errors(403))
    async def verify(request: Request) -> dict[str, Any]:
        """Verify the hash chain and signed checkpoints; `ok` false names the first bad entry."""
        result = await run_in_threadpool(service.audit_verify, principal_of(request))
        return result.to_json()

    return router
