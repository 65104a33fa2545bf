"""A change request as the API shows it: shared by the label routes (``management.py``), which
answer 202 with one when a protected label is to move, and the lifecycle routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from modelkeep.store.metadata import ChangeRequest


class ChangeOut(BaseModel):
    id: str
    model: str
    label: str
    kind: str = Field(
        description="set, rollback, canary (start a canary), or protect (weakening a protection)"
    )
    version: int | None
    previous: int | None
    new_approvals: int | None
    approvals_needed: int
    approvals: list[str]
    requester: str
    pusher: str | None
    status: str = Field(description="pending, applied, rejected, expired or failed")
    reason: str | None
    created_at: datetime
    expires_at: datetime
    decided_by: str | None
    decided_at: datetime | None


def change_out(change: ChangeRequest) -> dict[str, Any]:
    return {
        "id": change.id,
        "model": change.model,
        "label": change.label,
        "kind": change.kind,
        "version": change.version,
        "previous": change.previous,
        "new_approvals": change.new_approvals,
        "approvals_needed": change.approvals_needed,
        "approvals": list(change.approvals),
        "requester": change.requester,
        "pusher": change.pusher,
        "status": change.status,
        "reason": change.reason,
        "created_at": change.created_at,
        "expires_at": change.expires_at,
        "decided_by": change.decided_by,
        "decided_at": change.decided_at,
    }


def accepted(change: ChangeRequest) -> JSONResponse:
    """202 with the change request a protected move opened."""
    return JSONResponse(ChangeOut(**change_out(change)).model_dump(mode="json"), status_code=202)
