"""Lifecycle API under /api/v1 (docs/lifecycle.md): evaluation sets and gates, protected labels,
label history and rollback, change requests. It translates; the service decides."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from modelkeep.registry.store import ChangeRequest, LabelMove
from modelkeep.service import Service

from ._auth import principal_of
from ._body import read_body


class ErrorOut(BaseModel):
    error: str = Field(description="What went wrong, safe to show")


_WHY = {
    400: "Malformed request: bad name, bad gate expression, bad evaluation set",
    401: "No valid API key",
    403: "The key may not do this (Cedar), or may not approve this request",
    404: "No such model, version, label or change request",
    409: "Conflict: a gate refused the version, the request is not pending, the label moved",
    413: "The evaluation set is larger than the server accepts",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each error status with the ``{"error": ...}`` schema."""
    return {code: {"model": ErrorOut, "description": _WHY[code]} for code in (401, 403, *codes)}


class GateOut(BaseModel):
    gate: str
    passed: bool | None = Field(description="None: could not be decided (not evaluated yet)")
    value: float | None
    required: float | None
    reason: str


class EvaluationOut(BaseModel):
    status: str = Field(description="pending, error, failed, undecided or passed")
    metrics: dict[str, float] | None
    error: str | None
    evaluated_at: str | None
    gates: list[GateOut]


class VersionEvaluationOut(EvaluationOut):
    version: int


class EvalSetOut(BaseModel):
    model: str
    sha256: str
    size: int
    rows: int
    task: str = Field(description="classification or regression (from `expected`)")
    input_shape: list[int]
    gates: list[str]
    created_by: str
    created_at: str


class EvaluationView(BaseModel):
    model: str
    evalset: EvalSetOut | None
    versions: list[VersionEvaluationOut]


class GatesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gates: list[str] = Field(max_length=16, description="e.g. accuracy>=0.95, f1>=production-0.01")


class QueuedOut(BaseModel):
    model: str
    version: int
    status: str


class ProtectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    approvals: int = Field(ge=0, le=5, strict=True, description="0 removes the protection")


class ProtectionOut(BaseModel):
    model: str
    label: str
    approvals: int


class ProtectionList(BaseModel):
    model: str
    labels: dict[str, int]


class ChangeOut(BaseModel):
    id: str
    model: str
    label: str
    kind: str = Field(description="set, rollback, or protect (weakening a protection)")
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


class ChangeList(BaseModel):
    changes: list[ChangeOut]


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    emergency: bool = Field(
        default=False, description="Admins only: move at once, audited and alerted as such"
    )


class RollbackOut(BaseModel):
    model: str
    label: str
    version: int


class MoveOut(BaseModel):
    label: str
    version: int | None = Field(description="None: the label was deleted")
    previous: int | None
    kind: str
    actor: str
    change_id: str | None
    time: datetime


class HistoryOut(BaseModel):
    model: str
    history: list[MoveOut]


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


def _move_out(move: LabelMove) -> MoveOut:
    return MoveOut(
        label=move.label,
        version=move.version,
        previous=move.previous,
        kind=move.kind,
        actor=move.actor,
        change_id=move.change_id,
        time=move.time,
    )


_ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"model": ChangeOut, "description": "Protected: a change request was opened"}
}


def lifecycle_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["lifecycle"])
    limit = service.settings.max_evalset_bytes

    @router.put(
        "/models/{model}/eval",
        response_model=EvalSetOut,
        responses=errors(400, 404, 413),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def set_evalset(
        request: Request,
        model: str,
        gate: Annotated[list[str] | None, Query(max_length=16)] = None,
    ) -> dict[str, Any]:
        """Give the model an evaluation set: an .npz with arrays `inputs` and `expected` as the
        body (sealed at rest, never shown again), and its gates (`gate`, repeated; none given
        keeps the current gates). Admins. Versions under a label and the newest are evaluated
        in the background."""
        principal = principal_of(request)
        body = await read_body(request, limit)
        return await run_in_threadpool(service.set_evalset, principal, model, body, gate)

    @router.put(
        "/models/{model}/eval/gates",
        response_model=EvalSetOut,
        responses=errors(400, 404),
    )
    async def set_gates(request: Request, model: str, body: GatesIn) -> dict[str, Any]:
        """Replace the gates of the model's evaluation set (admins)."""
        return await run_in_threadpool(
            service.set_evalset, principal_of(request), model, None, body.gates
        )

    @router.get("/models/{model}/eval", response_model=EvaluationView, responses=errors(400, 404))
    async def show_evaluation(
        request: Request,
        model: str,
        version: Annotated[str | None, Query(max_length=12)] = None,
    ) -> dict[str, Any]:
        """The evaluation set (digest, shape, gates; never its rows) and each version's
        metrics with how it fares against every gate now."""
        return await run_in_threadpool(
            service.show_evaluation, principal_of(request), model, version
        )

    @router.post(
        "/models/{model}/versions/{version}/evaluate",
        status_code=202,
        response_model=QueuedOut,
        responses=errors(404, 409),
    )
    async def run_evaluation(request: Request, model: str, version: str) -> QueuedOut:
        """Evaluate a version (again) on the current set, in the background."""
        number = await run_in_threadpool(
            service.run_evaluation, principal_of(request), model, version
        )
        return QueuedOut(model=model, version=number, status="queued")

    @router.get("/models/{model}/protection", response_model=ProtectionList, responses=errors(404))
    async def protections(request: Request, model: str) -> ProtectionList:
        """The model's protected labels and the approvals each needs."""
        found = await run_in_threadpool(service.protections, principal_of(request), model)
        return ProtectionList(model=model, labels=found)

    @router.put(
        "/models/{model}/protection/{label}",
        response_model=ProtectionOut,
        responses={**errors(400, 404, 409), **_ACCEPTED},
    )
    async def protect(request: Request, model: str, label: str, body: ProtectIn) -> Response:
        """Require approvals to move a label (admins). Raising takes effect at once; lowering
        or removing (0) opens a change request (202)."""
        approvals, change = await run_in_threadpool(
            service.protect_label, principal_of(request), model, label, body.approvals
        )
        if change is not None:
            return accepted(change)
        out = ProtectionOut(model=model, label=label, approvals=approvals)
        return JSONResponse(out.model_dump(mode="json"))

    @router.get("/models/{model}/history", response_model=HistoryOut, responses=errors(400, 404))
    async def history(
        request: Request, model: str, label: Annotated[str | None, Query(max_length=63)] = None
    ) -> HistoryOut:
        """Every move of the model's labels (or of one label), oldest first."""
        moves = await run_in_threadpool(service.label_history, principal_of(request), model, label)
        return HistoryOut(model=model, history=[_move_out(m) for m in moves])

    @router.post(
        "/models/{model}/labels/{label}/rollback",
        response_model=RollbackOut,
        responses={**errors(400, 404, 409), **_ACCEPTED},
    )
    async def rollback(
        request: Request, model: str, label: str, body: RollbackIn | None = None
    ) -> Response:
        """Move the label back to the version it pointed at before. Protected: a change request
        that one approval completes (202), unless an admin declares an emergency."""
        emergency = body.emergency if body is not None else False
        version, change = await run_in_threadpool(
            lambda: service.rollback_label(principal_of(request), model, label, emergency=emergency)
        )
        if change is not None:
            return accepted(change)
        out = RollbackOut(model=model, label=label, version=version)
        return JSONResponse(out.model_dump(mode="json"))

    @router.get("/changes", response_model=ChangeList, responses=errors(400))
    async def list_changes(
        request: Request,
        status: Annotated[str | None, Query(max_length=16)] = None,
    ) -> dict[str, Any]:
        """Change requests on the models this key may read, newest first."""
        found = await run_in_threadpool(
            lambda: service.list_changes(principal_of(request), status=status)
        )
        return {"changes": [change_out(c) for c in found]}

    @router.get("/changes/{change_id}", response_model=ChangeOut, responses=errors(404))
    async def get_change(request: Request, change_id: str) -> dict[str, Any]:
        change = await run_in_threadpool(service.get_change, principal_of(request), change_id)
        return change_out(change)

    @router.post(
        "/changes/{change_id}/approve", response_model=ChangeOut, responses=errors(404, 409)
    )
    async def approve(request: Request, change_id: str) -> dict[str, Any]:
        """Approve a pending request (approvers, admins); never the requester's or the
        pusher's key. With enough approvals it is applied at once."""
        change = await run_in_threadpool(service.approve_change, principal_of(request), change_id)
        return change_out(change)

    @router.post(
        "/changes/{change_id}/reject", response_model=ChangeOut, responses=errors(400, 404, 409)
    )
    async def reject(request: Request, change_id: str, body: RejectIn) -> dict[str, Any]:
        """Reject a pending request (approvers, admins), or withdraw one's own."""
        change = await run_in_threadpool(
            service.reject_change, principal_of(request), change_id, body.reason
        )
        return change_out(change)

    return router
