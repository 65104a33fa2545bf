"""TEMPORARY: the data plane's contract (DATAPLANE.md) over today's ``Service``.

The SageMaker and Azure ML adapters are written against ``service.dataplane.infer(principal,
model, call, version=, label=)`` and ``authenticate_request(service, authorization, client)``,
which the data-plane restructuring provides. Until it lands, this module gives them the same
signatures over ``Service``'s steps, in ``Service.infer``'s order: authorization (Cedar),
restriction, decode, admission, the bounded queue and timeout, the runtime, the detectors,
hardening, capture. It goes away when the adapters are wired to the real data plane.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import anyio
import numpy as np
import orjson
from starlette.concurrency import run_in_threadpool

from modelkeep.auth import AuthFailure, Principal
from modelkeep.errors import Forbidden, NotFound, RateLimited, Unavailable
from modelkeep.guard.gate import request_rows
from modelkeep.policy import Action
from modelkeep.registry.records import VersionRecord
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service import Service


class Decoded(Protocol):
    @property
    def inputs(self) -> Mapping[str, np.ndarray]: ...

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


async def authenticate_request(
    service: Service, authorization: str | None, client_host: str | None
) -> Principal:
    """The principal of an Authorization value; a refusal is audited durably, then raised."""
    try:
        return service.authenticate(authorization)
    except AuthFailure as exc:
        await run_in_threadpool(service.record_auth_failure, exc, client_host)
        raise


class ShimDataPlane:
    """``infer`` and ``signature`` as the data plane will offer them."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.in_flight = 0

    def _version(
        self, principal: Principal, model: str, version: str | None, label: str | None
    ) -> str | None:
        if label is None:
            return version
        record = self.service._model(principal, Action.MODEL_INFER, model)
        number = record.labels.get(label)
        if number is None:
            raise NotFound(f"model '{record.name}' has no such label")
        return str(number)

    def signature(
        self, principal: Principal, model: str, version: str | None = None, label: str | None = None
    ) -> tuple[VersionRecord, ModelSignature]:
        service = self.service
        if label is not None:
            record = service._model(principal, Action.MODEL_READ, model)
            number = record.labels.get(label)
            if number is None:
                raise NotFound(f"model '{record.name}' has no such label")
            version = str(number)
        record = service._model(principal, Action.MODEL_READ, model)
        found = service._version(record, version)
        return found, found.signature

    async def infer(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None = None,
        label: str | None = None,
        stats: dict[str, Any] | None = None,
    ) -> InferResult[R]:
        settings = self.service.settings
        if self.in_flight >= settings.max_queue:
            self.service.metrics.shed(model=model)
            raise Unavailable("the server is overloaded; retry shortly", retry_after=1)
        self.in_flight += 1
        try:
            if len(call.body) <= settings.inline_max_bytes and (
                settings.limits_storage == "memory://"
            ):
                return self._run(principal, model, call, version, label, stats)
            with anyio.fail_after(settings.inference_timeout_s):
                return await anyio.to_thread.run_sync(
                    lambda: self._run(principal, model, call, version, label, stats),
                    abandon_on_cancel=True,
                )
        except TimeoutError:
            raise Unavailable("inference timed out", retry_after=1) from None
        finally:
            self.in_flight -= 1

    def _run(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None,
        label: str | None,
        stats: dict[str, Any] | None,
    ) -> InferResult[R]:
        service = self.service
        # 1. Authorization (Cedar) and the version served, then any detector restriction.
        target = service._target(principal, model, self._version(principal, model, version, label))
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
        # 2. Decode against the signature, limits first.
        request = call.decode(found.signature, service.settings.max_tensor_elements)
        rows = request_rows(request.inputs)
        if stats is not None:
            stats["rows"], stats["version"] = rows, found.number
        # 3. Admission.
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
        # 4. The runtime.
        try:
            names = request.output_names()
            started = time.perf_counter()
            outputs = session.run(dict(request.inputs), None if policy.detect else names)
            service.metrics.observe_inference(
                model=record.name, version=found.number, seconds=time.perf_counter() - started
            )
        finally:
            admitted.release()
        # 5. Detectors, then hardening for the caller's role, then the caller's filter.
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
        hardened = service.gate.harden(policy, principal.role, outputs, found.signature)
        if names is not None:
            hardened = {name: value for name, value in hardened.items() if name in names}
        if policy.capture is not None:
            shown = {name: np.asarray(value).tolist() for name, value in hardened.items()}
            service._capture(principal, found, policy.capture, call.body, orjson.dumps(shown))
        budget = None
        if admitted.budget_limit is not None:
            budget = Budget(
                admitted.budget_limit, admitted.budget_remaining or 0, admitted.budget_reset
            )
        return InferResult(
            model=record.name,
            version=found.number,
            request=request,
            outputs=hardened,
            rows=rows,
            budget=budget,
        )
