"""Lifecycle API under /api/v1 (docs/lifecycle.md): evaluation sets and gates, protected labels,
label history and rollback, change requests; bills of materials, crypto-shredding deletion,
retention rules and drift monitoring. It translates; the service decides. Every status a route
can answer is documented (``errors``; 401, 413, 431 and 503 are added where they apply by
``_openapi.install_openapi``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from modelkeep.lifecycle.canary import Thresholds
from modelkeep.registry.bom import BOM_MEDIA_TYPE
from modelkeep.service import Service
from modelkeep.store.metadata import LabelMove, RetentionRule

from ._auth import principal_of
from ._body import read_body
from ._change_out import ChangeOut, accepted, change_out
from ._openapi import NAME_SCHEMA, WHOLE_NUMBER, LabelName, ModelName, errors
from .management import VersionOut, version_out


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
    approvals: Annotated[
        int, Field(ge=0, le=5, description="0 removes the protection"), WHOLE_NUMBER
    ]


class ProtectionOut(BaseModel):
    model: str
    label: str
    approvals: int


class ProtectionList(BaseModel):
    model: str
    labels: dict[str, int]


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


class DeletedModelOut(BaseModel):
    model: str
    deleted_versions: list[int] = Field(description="The versions crypto-shredded now")
    captures_deleted: int = Field(description="Captured payloads destroyed with their keys")


class RetentionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_versions: Annotated[int, Field(ge=1, le=10_000), WHOLE_NUMBER] | None = Field(
        default=None, description="Keep the newest N versions (labelled ones are never deleted)"
    )
    capture_days: Annotated[int, Field(ge=1, le=3650), WHOLE_NUMBER] | None = Field(
        default=None, description="Destroy captures older than D days"
    )


class RetentionOut(BaseModel):
    model: str
    keep_versions: int | None
    capture_days: int | None


class DriftIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[list[float]] | None = Field(
        default=None,
        min_length=1,
        max_length=100_000,
        description="Benign reference rows (refit): a rectangular matrix of numbers",
    )
    window: Annotated[int, Field(ge=50, le=100_000), WHOLE_NUMBER] | None = Field(
        default=None, description="Rows per sliding window"
    )
    psi_threshold: float | None = Field(
        default=None, ge=0.001, le=10.0, description="PSI that counts as drift"
    )
    ks_alpha: float | None = Field(
        default=None, ge=1e-12, le=0.5, description="KS test level (Bonferroni)"
    )


class DriftOut(BaseModel):
    model: str
    configured: bool
    settings: dict[str, Any] | None
    latest: dict[str, Any] | None = Field(description="Latest window's scores in this worker")


class CanaryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Annotated[int, Field(ge=1, le=999_999_999), WHOLE_NUMBER]
    share: float = Field(gt=0, le=100, description="Percent of the label's callers (sticky)")
    max_error_rate: float | None = Field(
        default=None, ge=0, le=1, description="Roll back above this share of failed runs"
    )
    max_p99_ms: float | None = Field(
        default=None, gt=0, le=3_600_000, description="Roll back above this p99 latency"
    )
    min_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Roll back below this top-1 agreement"
    )
    min_requests: Annotated[int, Field(ge=1, le=1_000_000), WHOLE_NUMBER] = Field(
        default=20, description="Requests to the canary in the window before it is judged"
    )
    window_s: float = Field(default=300, ge=1, le=86_400, description="Window judged, seconds")


class ShadowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Annotated[int, Field(ge=1, le=999_999_999), WHOLE_NUMBER]
    sample: float = Field(
        default=100, gt=0, le=100, description="Percent of the label's requests mirrored"
    )


class ThresholdsOut(BaseModel):
    max_error_rate: float | None
    max_p99_ms: float | None
    min_agreement: float | None
    min_requests: int
    window_s: float


class ArmOut(BaseModel):
    version: int
    role: str = Field(description="primary, canary or shadow")
    requests: int = Field(description="Runs counted since this replica saw the canary")
    errors: int
    window_requests: int
    window_errors: int
    error_rate: float | None = Field(description="In the window")
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    agreement: float | None = Field(description="Top-1 agreement with the primary, in the window")
    compared: int = Field(description="Rows compared in the window")


class CanaryOut(BaseModel):
    id: str
    model: str
    label: str
    mode: str = Field(description="canary or shadow")
    version: int
    share: float = Field(description="Percent of callers (canary) or of requests (shadow)")
    thresholds: ThresholdsOut
    status: str = Field(
        description="pending, active, promoted, aborted, rolled_back or ended; rejected, expired"
        " or failed when its change request closed without starting it"
    )
    change_id: str | None
    started_by: str
    started_at: datetime
    ended_by: str | None
    ended_at: datetime | None
    reason: str | None
    shed: int = Field(description="Mirrored runs shed under load (this replica)")
    versions: list[ArmOut] = Field(description="This replica's numbers per version")


class CanaryList(BaseModel):
    model: str
    canaries: list[CanaryOut]


def _retention_out(rule: RetentionRule) -> RetentionOut:
    return RetentionOut(
        model=rule.model, keep_versions=rule.keep_versions, capture_days=rule.capture_days
    )


def lifecycle_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["lifecycle"])
    limit = service.settings.max_evalset_bytes

    @router.put(
        "/models/{model}/eval",
        response_model=EvalSetOut,
        responses=errors(400, 403, 404, 413),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def set_evalset(
        request: Request,
        model: ModelName,
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
        responses=errors(400, 403, 404),
    )
    async def set_gates(request: Request, model: ModelName, body: GatesIn) -> dict[str, Any]:
        """Replace the gates of the model's evaluation set (admins)."""
        return await run_in_threadpool(
            service.set_evalset, principal_of(request), model, None, body.gates
        )

    @router.get(
        "/models/{model}/eval", response_model=EvaluationView, responses=errors(400, 403, 404)
    )
    async def show_evaluation(
        request: Request,
        model: ModelName,
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
        responses=errors(403, 404, 409),
    )
    async def run_evaluation(request: Request, model: ModelName, version: str) -> QueuedOut:
        """Evaluate a version (again) on the current set, in the background."""
        number = await run_in_threadpool(
            service.run_evaluation, principal_of(request), model, version
        )
        return QueuedOut(model=model, version=number, status="queued")

    @router.get(
        "/models/{model}/protection", response_model=ProtectionList, responses=errors(403, 404)
    )
    async def protections(request: Request, model: ModelName) -> ProtectionList:
        """The model's protected labels and the approvals each needs."""
        found = await run_in_threadpool(service.protections, principal_of(request), model)
        return ProtectionList(model=model, labels=found)

    @router.put(
        "/models/{model}/protection/{label}",
        response_model=ProtectionOut,
        responses={**errors(400, 403, 404, 409), **_ACCEPTED},
    )
    async def protect(
        request: Request, model: ModelName, label: LabelName, body: ProtectIn
    ) -> Response:
        """Require approvals to move a label (admins). Raising takes effect at once; lowering
        or removing (0) opens a change request (202)."""
        approvals, change = await run_in_threadpool(
            service.protect_label, principal_of(request), model, label, body.approvals
        )
        if change is not None:
            return accepted(change)
        out = ProtectionOut(model=model, label=label, approvals=approvals)
        return JSONResponse(out.model_dump(mode="json"))

    @router.get(
        "/models/{model}/history", response_model=HistoryOut, responses=errors(400, 403, 404)
    )
    async def history(
        request: Request,
        model: ModelName,
        label: Annotated[str | None, Query(max_length=63, json_schema_extra=NAME_SCHEMA)] = None,
    ) -> HistoryOut:
        """Every move of the model's labels (or of one label), oldest first."""
        moves = await run_in_threadpool(service.label_history, principal_of(request), model, label)
        return HistoryOut(model=model, history=[_move_out(m) for m in moves])

    @router.post(
        "/models/{model}/labels/{label}/rollback",
        response_model=RollbackOut,
        responses={**errors(400, 403, 404, 409), **_ACCEPTED},
    )
    async def rollback(
        request: Request, model: ModelName, label: LabelName, body: RollbackIn | None = None
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

    @router.get("/changes", response_model=ChangeList, responses=errors(403, 400))
    async def list_changes(
        request: Request,
        status: Annotated[
            Literal["pending", "applied", "rejected", "expired", "failed"] | None, Query()
        ] = None,
    ) -> dict[str, Any]:
        """Change requests on the models this key may read, newest first."""
        found = await run_in_threadpool(
            lambda: service.list_changes(principal_of(request), status=status)
        )
        return {"changes": [change_out(c) for c in found]}

    @router.get("/changes/{change_id}", response_model=ChangeOut, responses=errors(403, 404))
    async def get_change(request: Request, change_id: str) -> dict[str, Any]:
        change = await run_in_threadpool(service.get_change, principal_of(request), change_id)
        return change_out(change)

    @router.post(
        "/changes/{change_id}/approve", response_model=ChangeOut, responses=errors(403, 404, 409)
    )
    async def approve(request: Request, change_id: str) -> dict[str, Any]:
        """Approve a pending request (approvers, admins); never the requester's or the
        pusher's key. With enough approvals it is applied at once."""
        change = await run_in_threadpool(service.approve_change, principal_of(request), change_id)
        return change_out(change)

    @router.post(
        "/changes/{change_id}/reject",
        response_model=ChangeOut,
        responses=errors(400, 403, 404, 409),
    )
    async def reject(request: Request, change_id: str, body: RejectIn) -> dict[str, Any]:
        """Reject a pending request (approvers, admins), or withdraw one's own."""
        change = await run_in_threadpool(
            service.reject_change, principal_of(request), change_id, body.reason
        )
        return change_out(change)

    @router.get(
        "/models/{model}/versions/{version}/bom",
        responses={
            200: {
                "description": "CycloneDX 1.6 ML-BOM JSON (schema-validated before it is sent)",
                "content": {BOM_MEDIA_TYPE: {"schema": {"type": "object"}}},
            },
            **errors(403, 404),
        },
    )
    async def get_bom(request: Request, model: ModelName, version: str) -> Response:
        """The version's CycloneDX 1.6 ML-BOM: digest, model card (metrics, datasets,
        signature identity, scan verdict), approvals and the lineage declared at push."""
        text = await run_in_threadpool(service.version_bom, principal_of(request), model, version)
        return Response(text, media_type=BOM_MEDIA_TYPE)

    @router.delete(
        "/models/{model}/versions/{version}",
        response_model=VersionOut,
        responses=errors(403, 404, 409),
    )
    async def delete_version(request: Request, model: ModelName, version: str) -> VersionOut:
        """Crypto-shred a version (admin): its data key is destroyed, then its blob; refused
        while a label points at it. The answer is its metadata, now with ``deleted_at``."""
        found = await run_in_threadpool(
            service.delete_version, principal_of(request), model, version
        )
        return version_out(found)

    @router.delete("/models/{model}", response_model=DeletedModelOut, responses=errors(403, 404))
    async def delete_model(request: Request, model: ModelName) -> DeletedModelOut:
        """Delete a model (admin): every version crypto-shredded, its labels, captures and
        settings destroyed. The name stays reserved."""
        done = await run_in_threadpool(service.delete_model, principal_of(request), model)
        return DeletedModelOut(
            model=done.model,
            deleted_versions=[s.number for s in done.versions],
            captures_deleted=done.captures,
        )

    @router.get(
        "/models/{model}/retention", response_model=RetentionOut, responses=errors(403, 404)
    )
    async def get_retention(request: Request, model: ModelName) -> RetentionOut:
        rule = await run_in_threadpool(service.get_retention, principal_of(request), model)
        return _retention_out(rule)

    @router.put(
        "/models/{model}/retention", response_model=RetentionOut, responses=errors(400, 403, 404)
    )
    async def put_retention(request: Request, model: ModelName, body: RetentionIn) -> RetentionOut:
        """Set the model's retention rule (admin); both fields null removes it."""
        rule = await run_in_threadpool(
            lambda: service.set_retention(
                principal_of(request),
                model,
                keep_versions=body.keep_versions,
                capture_days=body.capture_days,
            )
        )
        return _retention_out(rule)

    @router.get("/models/{model}/drift", response_model=DriftOut, responses=errors(403, 404))
    async def get_drift(request: Request, model: ModelName) -> dict[str, Any]:
        """Drift settings and the latest window's PSI and KS scores (this worker's view)."""
        return await run_in_threadpool(service.drift_status, principal_of(request), model)

    @router.put("/models/{model}/drift", response_model=DriftOut, responses=errors(400, 403, 404))
    async def put_drift(request: Request, model: ModelName, body: DriftIn) -> dict[str, Any]:
        """Fit the drift reference from benign rows and/or change its settings (admin)."""
        return await run_in_threadpool(
            lambda: service.configure_drift(
                principal_of(request),
                model,
                rows=body.rows,
                window=body.window,
                psi_threshold=body.psi_threshold,
                ks_alpha=body.ks_alpha,
            )
        )

    @router.put(
        "/models/{model}/labels/{label}/canary",
        response_model=CanaryOut,
        responses={**errors(400, 403, 404, 409), **_ACCEPTED},
    )
    async def start_canary(
        request: Request, model: ModelName, label: LabelName, body: CanaryIn
    ) -> Response:
        """Serve a share of the label's callers from another version, sticky per caller,
        withdrawn automatically past its thresholds. Protected: a change request (202)."""
        thresholds = Thresholds(
            max_error_rate=body.max_error_rate,
            max_p99_ms=body.max_p99_ms,
            min_agreement=body.min_agreement,
            min_requests=body.min_requests,
            window_s=body.window_s,
        )
        canary, change = await run_in_threadpool(
            service.start_canary,
            principal_of(request),
            model,
            label,
            body.version,
            body.share,
            thresholds,
        )
        if change is not None:
            return accepted(change)
        found = await run_in_threadpool(_one, principal_of(request), model, label, canary.id)
        return JSONResponse(found)

    @router.put(
        "/models/{model}/labels/{label}/shadow",
        response_model=CanaryOut,
        responses=errors(400, 403, 404, 409),
    )
    async def start_shadow(
        request: Request, model: ModelName, label: LabelName, body: ShadowIn
    ) -> Response:
        """Mirror a sample of the label's requests to another version off the request path:
        its answers are compared, never returned, never counted in budgets."""
        shadow = await run_in_threadpool(
            service.start_shadow, principal_of(request), model, label, body.version, body.sample
        )
        found = await run_in_threadpool(_one, principal_of(request), model, label, shadow.id)
        return JSONResponse(found)

    def _one(principal: Any, model: str, label: str, canary_id: str) -> dict[str, Any]:
        found = [c for c in service.canary_status(principal, model, label) if c["id"] == canary_id]
        return CanaryOut(**found[0]).model_dump(mode="json")

    @router.get(
        "/models/{model}/canary", response_model=CanaryList, responses=errors(400, 403, 404)
    )
    async def canary_status(
        request: Request,
        model: ModelName,
        label: Annotated[str | None, Query(max_length=63, json_schema_extra=NAME_SCHEMA)] = None,
    ) -> dict[str, Any]:
        """The model's live canaries and shadows and the last ones that ended, with this
        replica's request counts, errors, latency percentiles and agreement per version."""
        found = await run_in_threadpool(service.canary_status, principal_of(request), model, label)
        return {"model": model, "canaries": found}

    @router.post(
        "/models/{model}/labels/{label}/canary/promote",
        response_model=RollbackOut,
        responses={**errors(400, 403, 404, 409), **_ACCEPTED},
    )
    async def promote_canary(request: Request, model: ModelName, label: LabelName) -> Response:
        """Point the label at its canary's version, ending the canary. Protected: a change
        request (202) approved like any move."""
        version, change = await run_in_threadpool(
            service.promote_canary, principal_of(request), model, label
        )
        if change is not None:
            return accepted(change)
        out = RollbackOut(model=model, label=label, version=version)
        return JSONResponse(out.model_dump(mode="json"))

    @router.delete(
        "/models/{model}/labels/{label}/canary",
        status_code=204,
        responses=errors(400, 403, 404),
    )
    async def abort_canary(request: Request, model: ModelName, label: LabelName) -> Response:
        """End the label's canary: every caller is served the label's version again."""
        await run_in_threadpool(service.abort_canary, principal_of(request), model, label)
        return Response(status_code=204)

    @router.delete(
        "/models/{model}/labels/{label}/shadow",
        status_code=204,
        responses=errors(400, 403, 404),
    )
    async def abort_shadow(request: Request, model: ModelName, label: LabelName) -> Response:
        """End the label's shadow."""
        await run_in_threadpool(service.abort_canary, principal_of(request), model, label, "shadow")
        return Response(status_code=204)

    return router
