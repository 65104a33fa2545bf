"""A stand-in for the protocol-neutral data plane, until it lands (DATAPLANE.md).

TEMPORARY. ``ShimDataPlane.infer`` has the signature of ``DataPlane.infer`` and runs the same
steps in the same order as ``Service._infer`` does for V2 REST (authorization, restriction,
decode, admission, runtime, detectors, hardening, capture), with the per-worker bounded queue
and timeout of ``InferRunner``. When ``service.dataplane`` exists, the servicer calls it instead
and this module goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from modelkeep.api._infer import INLINE_BUDGET_S
from modelkeep.auth import Principal
from modelkeep.errors import Forbidden, NotFound, RateLimited, Unavailable
from modelkeep.guard.gate import request_rows
from modelkeep.guard.tensors import InferRequest, encode_infer_response
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service import Service


class Decoded(Protocol):
    @property
    def inputs(self) -> dict[str, np.ndarray]: ...

    def output_names(self) -> list[str] | None: ...


R = TypeVar("R", bound=Decoded)


@dataclass(frozen=True, slots=True)
class InferCall(Generic[R]):
    body: bytes
    decode: Callable[[ModelSignature, int], R]
    protocol: str = "v2"


@dataclass(frozen=True, slots=True)
class Budget:
    limit: int
    remaining: int
    reset: datetime | None


@dataclass(frozen=True, slots=True)
class InferResult(Generic[R]):
    model: str
    version: int
    request: R
    outputs: dict[str, np.ndarray]
    rows: int
    budget: Budget | None


class ShimDataPlane:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.in_flight = 0
        settings = service.settings
        # As InferRunner: small calls to fast models run inline on the event loop.
        self.inline_max_bytes = (
            settings.inline_max_bytes if settings.limits_storage == "memory://" else -1
        )
        self._cost: dict[str, float] = {}

    def model_metadata(
        self, principal: Principal, model: str, version: str | None = None
    ) -> dict[str, Any]:
        return self.service.model_metadata(principal, model, version)

    def model_ready(self, principal: Principal, model: str, version: str | None = None) -> bool:
        return self.service.model_ready(principal, model, version)

    async def infer(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None = None,
        label: str | None = None,
    ) -> InferResult[R]:
        if label is not None:
            raise NotFound("labels are not served by this protocol")
        settings = self.service.settings
        if self.in_flight >= settings.max_queue:
            self.service.metrics.shed(model=model)
            raise Unavailable("the server is overloaded; retry shortly", retry_after=1)
        self.in_flight += 1
        inline = (
            len(call.body) <= self.inline_max_bytes and self._cost.get(model, 0.0) < INLINE_BUDGET_S
        )
        try:
            if inline:
                return self._timed(principal, model, call, version)
            async with asyncio.timeout(settings.inference_timeout_s):
                return await asyncio.to_thread(self._timed, principal, model, call, version)
        except TimeoutError:
            raise Unavailable("inference timed out", retry_after=1) from None
        finally:
            self.in_flight -= 1

    def _timed(
        self, principal: Principal, model: str, call: InferCall[R], version: str | None
    ) -> InferResult[R]:
        started = time.perf_counter()
        try:
            return self._infer(principal, model, call, version)
        finally:
            elapsed = time.perf_counter() - started
            if len(self._cost) < 10_000 or model in self._cost:
                self._cost[model] = 0.8 * self._cost.get(model, elapsed) + 0.2 * elapsed

    def _infer(
        self, principal: Principal, model: str, call: InferCall[R], version: str | None
    ) -> InferResult[R]:
        service = self.service
        # 1. Who may run what: Cedar, then any detector restriction on this key and model.
        target = service._target(principal, model, version)
        record, found, session, policy = (
            target.record,
            target.version,
            target.session,
            target.policy,
        )
        restriction = record.restrictions.get(principal.key_id)
        if restriction is not None and restriction[0] == "block":
            raise Forbidden(
                f"access to model '{record.name}' is suspended for this key; an admin can lift"
                " it with `modelkeep policy unblock`"
            )
        # 2. The request must fit the signature before anything is counted or run.
        request = call.decode(found.signature, service.settings.max_tensor_elements)
        rows = request_rows(request.inputs)
        # 3. Admission: rows per request, rates, budget, concurrency.
        try:
            admitted = service.gate.admit(
                principal.key_id, record.name, rows, policy, throttled=restriction is not None
            )
        except RateLimited as exc:
            limit = str((exc.details or {}).get("limit", "other"))
            service.metrics.rate_limited(model=record.name, reason=limit)
            if limit == "budget":
                service.alert("budget_spent", principal=principal.key_id, model=record.name)
            raise
        try:
            wanted = request.output_names()
            names = None if policy.detect else wanted
            started = time.perf_counter()
            outputs = session.run(request.inputs, names)
            service.metrics.observe_inference(
                model=record.name, version=found.number, seconds=time.perf_counter() - started
            )
        finally:
            admitted.release()
        # 4. Watch the caller's query stream.
        alarms = service.gate.observe(
            principal.key_id,
            record.name,
            found.number,
            policy,
            request.inputs,
            outputs,
            found.signature,
            sink=service._on_alarms,
        )
        if alarms:
            service._on_alarms(principal.key_id, record.name, policy, alarms)
        # 5. Harden what the caller's role may see, then keep only what was asked for.
        hardened = service.gate.harden(policy, principal.role, outputs, found.signature)
        if wanted is not None:
            hardened = {k: v for k, v in hardened.items() if k in wanted}
        if policy.capture is not None:
            neutral = InferRequest(id=None, inputs={}, outputs=None, binary_outputs_default=False)
            content, _ = encode_infer_response(
                model_name=record.name,
                model_version=str(found.number),
                request=neutral,
                outputs=hardened,
            )
            service._capture(principal, found, policy.capture, call.body, content)
        budget = None
        if admitted.budget_limit is not None:
            budget = Budget(
                admitted.budget_limit, admitted.budget_remaining or 0, admitted.budget_reset
            )
        return InferResult(
            model=record.name,
            version=found.number,
            request=request,
            outputs=dict(hardened),
            rows=rows,
            budget=budget,
        )
