"""Guard policy API under /api/v1/models/{model}/policy (see docs/limits.md, docs/hardening.md)."""

from __future__ import annotations

import io
import zipfile
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from modelkeep.auth import ROLES
from modelkeep.errors import InvalidInput, NotFound, TooLarge
from modelkeep.guard.policy import MAX_CAPTURE_DAYS, ModelPolicy
from modelkeep.registry.records import ModelRecord
from modelkeep.service import Service

from ._auth import principal_of
from ._body import read_body
from ._openapi import WHOLE_NUMBER, ModelName, WholeNumber, errors

# Rows of an assessment, once unpacked: a compressed .npz must not unpack into more than this.
_MAX_ASSESS_BYTES = 256 * 1024 * 1024


# The forms the guard accepts, as documented patterns; guard/ checks every value (ranges included)
# and answers 400 naming the field at fault.
# A rate's window is at most a day ("10/5second", "100/minute", "1000/24hour", "5000/day").
_RATE: JsonDict = {
    "pattern": (
        r"^[1-9][0-9]{0,11}/(([1-9][0-9]{0,3})?seconds?|([1-9][0-9]{0,2})?minutes?"
        r"|([1-9]|1[0-9]|2[0-4])?hours?|days?)$"
    )
}
_BUDGET: JsonDict = {"pattern": r"^[1-9][0-9]{0,11}/(days?|months?)$"}
# reverse_sigmoid's BETA and GAMMA lie in (0, 100]; the pattern shows those from 1 up.
_BETA = r"([1-9][0-9]?(\.[0-9]{1,6})?|100(\.0{1,6})?)"
_OUTPUT: JsonDict = {
    "pattern": (
        r"^(full|label_only|reverse_sigmoid(=_N:_N)?|top_k=([1-9][0-9]{0,4}|100000)"
        r"|round=([0-9]|10)|confidence=([1-9][0-9]?|100))$"
    ).replace("_N", _BETA)
}


_Count = Annotated[int, Field(ge=1, le=10**12), WHOLE_NUMBER]


class LimitsIn(BaseModel):
    """Admission limits (docs/limits.md); a missing or null field is no limit."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rate: str | None = Field(default=None, json_schema_extra=_RATE)
    row_rate: str | None = Field(default=None, json_schema_extra=_RATE)
    model_rate: str | None = Field(default=None, json_schema_extra=_RATE)
    concurrency: _Count | None = None
    max_rows: _Count | None = None
    budget: str | None = Field(default=None, json_schema_extra=_BUDGET)


class CaptureIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sample: float = Field(ge=0, le=1, description="Share of requests kept")
    days: WholeNumber = Field(
        ge=1, le=MAX_CAPTURE_DAYS, strict=False, description="How long they are kept"
    )


class PolicyIn(BaseModel):
    """A model's guard policy (docs/limits.md, docs/hardening.md). What GET answers may be sent
    back as it is: ``model``, ``default`` and ``restrictions`` are ignored, and an
    ``ood_reference`` of ``{"fitted": true}`` keeps the fitted reference."""

    model_config = ConfigDict(extra="forbid", strict=True)
    limits: LimitsIn | None = None
    output: str = Field(default="full", max_length=64, json_schema_extra=_OUTPUT)
    output_for: (
        dict[str, Annotated[str, Field(max_length=64, json_schema_extra=_OUTPUT)]] | None
    ) = Field(
        default=None,
        json_schema_extra={"propertyNames": {"enum": list(ROLES)}},
        description="Output policy by role, over `output`",
    )
    detect: list[Literal["prada", "ood", "nearcopy"]] | None = None
    on_alarm: Literal["log", "alert", "throttle", "block"] = "log"
    prada_threshold: float | None = Field(default=None, gt=0, lt=1)
    nearcopy_width: float | None = Field(default=None, gt=0, le=10)
    ood_reference: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "properties": {"fitted": {"const": True}},
            "required": ["fitted"],
            "additionalProperties": False,
        },
        description='null drops the reference; {"fitted": true} keeps the fitted one',
    )
    capture: CaptureIn | None = None
    model: str | None = Field(default=None, description="Ignored (as GET shows it)")
    default: bool | None = Field(default=None, description="Ignored (as GET shows it)")
    restrictions: list[dict[str, Any]] | None = Field(
        default=None, description="Ignored (as GET shows it)"
    )


class CalibrateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    rows: list[list[float]] = Field(max_length=100_000, description="Benign input rows")


def policy_out(
    model: str, policy: ModelPolicy, record: ModelRecord | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, **policy.to_json()}
    if record is not None:
        # No stored policy: the server's defaults apply (docs/hardening.md, "The defaults").
        body["default"] = record.policy is None
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

    @router.get("/policy", responses=errors(403, 404))
    async def get_policy(request: Request, model: ModelName) -> dict[str, Any]:
        """The model's limits, budget, output hardening and detection, and restricted keys."""
        policy, record = await run_in_threadpool(service.get_policy, principal_of(request), model)
        return policy_out(model, policy, record)

    @router.put("/policy", responses=errors(400, 403, 404, 409))
    async def set_policy(request: Request, model: ModelName, given: PolicyIn) -> dict[str, Any]:
        """Replace the model's guard policy (admin). Fields: limits {rate, row_rate,
        model_rate, concurrency, max_rows, budget}, output, output_for {role: output},
        detect [prada, ood], on_alarm (log|alert|throttle|block), prada_threshold."""
        body = given.model_dump(exclude_unset=True, exclude={"restrictions", "model", "default"})
        current, _ = await run_in_threadpool(service.get_policy, principal_of(request), model)
        if body.get("ood_reference") == {"fitted": True}:
            # Round trip of a shown policy: keep the stored reference.
            body["ood_reference"] = (
                None if current.ood_reference is None else current.ood_reference.to_json()
            )
        policy = await run_in_threadpool(service.set_policy, principal_of(request), model, body)
        return policy_out(model, policy)

    @router.post("/policy/calibrate", responses=errors(400, 403, 404, 409))
    async def calibrate(request: Request, model: ModelName, body: CalibrateIn) -> dict[str, Any]:
        """Set the PRADA threshold and the OOD reference from benign rows (admin)."""
        policy = await run_in_threadpool(
            service.calibrate_policy, principal_of(request), model, body.rows
        )
        return policy_out(model, policy)

    @router.post(
        "/policy/assess",
        responses=errors(400, 403, 404, 409),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def assess(
        request: Request,
        model: ModelName,
        version: Annotated[str | None, Query(max_length=32)] = None,
        target_auc: Annotated[float, Query(ge=0.5, le=1.0)] = 0.60,
        apply: bool = False,
    ) -> dict[str, Any]:
        """Measure membership leakage of a version under each candidate output policy (admin).

        The body is an ``.npz`` (``application/octet-stream``) with ``members_X``,
        ``members_y``, ``non_members_X``, ``non_members_y``; it is used in memory and not kept.
        The report is kept with the version and audited; ``apply`` sets the recommended output.
        """
        body = await read_body(request, service.settings.max_request_bytes)
        data = _read_npz(body, service.settings.max_tensor_elements)
        return await run_in_threadpool(
            service.assess_policy,
            principal_of(request),
            model,
            version,
            data,
            target_auc=target_auc,
            apply=apply,
        )

    @router.get("/versions/{version}/privacy", responses=errors(403, 404))
    async def privacy_report(request: Request, model: ModelName, version: str) -> dict[str, Any]:
        """The kept leakage report of a version (``policy assess``); 404 when never assessed."""
        report = await run_in_threadpool(
            service.privacy_report, principal_of(request), model, version
        )
        if report is None:
            raise NotFound(f"version {version[:32]} of '{model[:64]}' was never assessed")
        return report

    @router.delete("/restrictions/{key_id}", status_code=204, responses=errors(403, 404))
    async def unblock(request: Request, model: ModelName, key_id: str) -> Response:
        """Lift a detector's block or throttle of a key on this model (admin)."""
        await run_in_threadpool(service.unblock, principal_of(request), model, key_id)
        return Response(status_code=204)

    @router.post("/budgets/{key_id}/reset", status_code=204, responses=errors(403, 404))
    async def reset_budget(request: Request, model: ModelName, key_id: str) -> Response:
        """Give a key its whole budget on this model back (admin)."""
        await run_in_threadpool(service.reset_budget, principal_of(request), model, key_id)
        return Response(status_code=204)

    return router


def _read_npz(body: bytes, max_elements: int) -> dict[str, np.ndarray]:
    """The arrays of an uploaded .npz: sizes checked before unpacking, never unpickled."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            infos = archive.infolist()
            if len(infos) > 16 or sum(info.file_size for info in infos) > _MAX_ASSESS_BYTES:
                raise TooLarge("the assessment data unpacks to more than the server accepts")
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InvalidInput("the body must be an .npz file of numeric arrays") from exc
    if sum(int(a.size) for a in arrays.values()) > max_elements:
        raise TooLarge(f"the assessment data holds more than {max_elements} values")
    return arrays
