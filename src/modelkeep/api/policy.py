"""Guard policy API under /api/v1/models/{model}/policy (see docs/limits.md, docs/hardening.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from modelkeep.guard.policy import ModelPolicy
from modelkeep.registry.records import ModelRecord
from modelkeep.service import Service

from ._auth import principal_of


class CalibrateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[list[float]] = Field(max_length=100_000, description="Benign input rows")


def policy_out(
    model: str, policy: ModelPolicy, record: ModelRecord | None = None
) -> dict[str, Any]:
    body = {"model": model, **policy.to_json()}
    if body.get("ood_reference") is not None:
        body["ood_reference"] = {"fitted": True}  # statistics of training data stay server-side
    if record is not None:
        body["restrictions"] = [
            {"key": key, "kind": kind, "reason": reason}
            for key, (kind, reason) in sorted(record.restrictions.items())
        ]
    return body


def policy_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1/models/{model}", tags=["guard policy"])

    @router.get("/policy")
    async def get_policy(request: Request, model: str) -> dict[str, Any]:
        """The model's limits, budget, output hardening and detection, and restricted keys."""
        policy, record = await run_in_threadpool(service.get_policy, principal_of(request), model)
        return policy_out(model, policy, record)

    @router.put("/policy")
    async def set_policy(request: Request, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Replace the model's guard policy (admin). Fields: limits {rate, row_rate,
        model_rate, concurrency, max_rows, budget}, output, output_for {role: output},
        detect [prada, ood], on_alarm (log|alert|throttle|block), prada_threshold."""
        body.pop("restrictions", None)
        body.pop("model", None)
        current, _ = await run_in_threadpool(service.get_policy, principal_of(request), model)
        if body.get("ood_reference") == {"fitted": True}:
            # Round trip of a shown policy: keep the stored reference.
            body["ood_reference"] = (
                None if current.ood_reference is None else current.ood_reference.to_json()
            )
        policy = await run_in_threadpool(service.set_policy, principal_of(request), model, body)
        return policy_out(model, policy)

    @router.post("/policy/calibrate")
    async def calibrate(request: Request, model: str, body: CalibrateIn) -> dict[str, Any]:
        """Set the PRADA threshold and the OOD reference from benign rows (admin)."""
        policy = await run_in_threadpool(
            service.calibrate_policy, principal_of(request), model, body.rows
        )
        return policy_out(model, policy)

    @router.delete("/restrictions/{key_id}", status_code=204)
    async def unblock(request: Request, model: str, key_id: str) -> Response:
        """Lift a detector's block or throttle of a key on this model (admin)."""
        await run_in_threadpool(service.unblock, principal_of(request), model, key_id)
        return Response(status_code=204)

    @router.post("/budgets/{key_id}/reset", status_code=204)
    async def reset_budget(request: Request, model: str, key_id: str) -> Response:
        """Give a key its whole budget on this model back (admin)."""
        await run_in_threadpool(service.reset_budget, principal_of(request), model, key_id)
        return Response(status_code=204)

    return router
