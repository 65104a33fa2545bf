"""Lifecycle routes under /api/v1/models/{model}: bills of materials, crypto-shredding deletion,
retention rules and drift monitoring (see docs/lifecycle.md). They translate; the service
decides. Every status a route can answer is documented (``errors``; 401, 431 and 503 are
added to every route by ``_openapi.install_openapi``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from modelkeep.registry.bom import BOM_MEDIA_TYPE
from modelkeep.registry.store import RetentionRule
from modelkeep.service import Service

from ._auth import principal_of
from ._openapi import ModelName, WholeNumber, errors
from .management import VersionOut, version_out


class DeletedModelOut(BaseModel):
    model: str
    deleted_versions: list[int] = Field(description="The versions crypto-shredded now")
    captures_deleted: int = Field(description="Captured payloads destroyed with their keys")


class RetentionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_versions: WholeNumber | None = Field(
        default=None, description="Keep the newest N versions (labelled ones are never deleted)"
    )
    capture_days: WholeNumber | None = Field(
        default=None, description="Destroy captures older than D days"
    )


class RetentionOut(BaseModel):
    model: str
    keep_versions: int | None
    capture_days: int | None


class DriftIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[list[float]] | None = Field(
        default=None, max_length=100_000, description="Benign reference rows (refit)"
    )
    window: WholeNumber | None = Field(
        default=None, description="Rows per sliding window (50-100000)"
    )
    psi_threshold: float | None = Field(default=None, description="PSI that counts as drift")
    ks_alpha: float | None = Field(default=None, description="KS test level (Bonferroni)")


class DriftOut(BaseModel):
    model: str
    configured: bool
    settings: dict[str, Any] | None
    latest: dict[str, Any] | None = Field(description="Latest window's scores in this worker")


def _retention_out(rule: RetentionRule) -> RetentionOut:
    return RetentionOut(
        model=rule.model, keep_versions=rule.keep_versions, capture_days=rule.capture_days
    )


def lifecycle_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1/models/{model}", tags=["lifecycle"])

    @router.get(
        "/versions/{version}/bom",
        responses={
            200: {
                "description": "CycloneDX JSON (schema-validated before it is sent)",
                "content": {BOM_MEDIA_TYPE: {"schema": {"type": "object"}}},
            },
            **errors(403, 404),
        },
    )
    async def get_bom(request: Request, model: ModelName, version: str) -> Response:
        """The version's bill of materials: digest, signature identity, scan verdict, metrics,
        approvals and the lineage declared at push."""
        text = await run_in_threadpool(service.version_bom, principal_of(request), model, version)
        return Response(text, media_type=BOM_MEDIA_TYPE)

    @router.delete(
        "/versions/{version}",
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

    @router.delete("", response_model=DeletedModelOut, responses=errors(403, 404))
    async def delete_model(request: Request, model: ModelName) -> DeletedModelOut:
        """Delete a model (admin): every version crypto-shredded, its labels, captures and
        settings destroyed. The name stays reserved."""
        done = await run_in_threadpool(service.delete_model, principal_of(request), model)
        return DeletedModelOut(
            model=done.model,
            deleted_versions=[s.number for s in done.versions],
            captures_deleted=done.captures,
        )

    @router.get("/retention", response_model=RetentionOut, responses=errors(403, 404))
    async def get_retention(request: Request, model: ModelName) -> RetentionOut:
        rule = await run_in_threadpool(service.get_retention, principal_of(request), model)
        return _retention_out(rule)

    @router.put("/retention", response_model=RetentionOut, responses=errors(400, 403, 404))
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

    @router.get("/drift", response_model=DriftOut, responses=errors(403, 404))
    async def get_drift(request: Request, model: ModelName) -> dict[str, Any]:
        """Drift settings and the latest window's PSI and KS scores (this worker's view)."""
        return await run_in_threadpool(service.drift_status, principal_of(request), model)

    @router.put("/drift", response_model=DriftOut, responses=errors(400, 403, 404))
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

    return router
