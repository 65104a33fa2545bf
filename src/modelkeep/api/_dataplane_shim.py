"""TEMPORARY: the data plane's contract (docs: /work/wt/DATAPLANE.md) over today's ``Service``.

Protocol adapters code against ``infer(principal, model, call, version=, label=)`` and the
neutral metadata calls; this module provides them until ``modelkeep.service.DataPlane`` lands,
and then goes away (the adapters import the real one instead). The infer steps are those of
``Service._infer`` in the same order, with a decoder in place of the V2 codec.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.to_thread
import numpy as np

from modelkeep.auth import Principal
from modelkeep.errors import Forbidden, NotFound, RateLimited, Unavailable
from modelkeep.guard.gate import request_rows
from modelkeep.policy import Action
from modelkeep.registry.records import VersionRecord
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service import Service

from ._infer import InferRunner


class Decoded(Protocol):
    @property
    def inputs(self) -> Mapping[str, np.ndarray]: ...

    def output_names(self) -> list[str] | None: ...


R = TypeVar("R", bound=Decoded)


@dataclass(slots=True)
class Observed:
    rows: int | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class InferCall(Generic[R]):
    body: bytes
    decode: Callable[[ModelSignature, int], R]
    protocol: str = "v2"
    observed: Observed | None = None


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


class DataPlane:
    """The contract's calls over ``service``; ``runner`` bounds the queue as for V2."""

    def __init__(self, service: Service, runner: InferRunner) -> None:
        self.service = service
        self.runner = runner

    def _resolve(
        self,
        principal: Principal,
        action: Action,
        model: str,
        version: str | None,
        label: str | None,
    ) -> str | None:
        if label is None:
            return version
        record = self.service._model(principal, action, model)
        number = record.labels.get(label)
        if number is None:
            raise NotFound(f"model '{record.name}' has no such label")
        return str(number)

    async def infer(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None = None,
        label: str | None = None,
    ) -> InferResult[R]:
        runner = self.runner
        if runner.in_flight >= runner.max_queue:
            self.service.metrics.shed(model=model)
            raise Unavailable("the server is overloaded; retry shortly", retry_after=1)
        runner.in_flight += 1
        run = functools.partial(self._infer, principal, model, call, version, label)
        try:
            if len(call.body) <= runner.inline_max_bytes:
                return run()
            with anyio.fail_after(runner.timeout):
                return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except TimeoutError:
            raise Unavailable("inference timed out", retry_after=1) from None
        finally:
            runner.in_flight -= 1

    def _infer(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None,
        label: str | None,
    ) -> InferResult[R]:
        service = self.service
        version = self._resolve(principal, Action.MODEL_INFER, model, version, label)
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
        request = call.decode(found.signature, service.settings.max_tensor_elements)
        rows = request_rows(dict(request.inputs))
        if call.observed is not None:
            call.observed.rows = rows
            call.observed.version = found.number
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
            names = request.output_names()
            if policy.detect:
                names = None
            started = time.perf_counter()
            outputs = session.run(dict(request.inputs), names)
            service.metrics.observe_inference(
                model=record.name, version=found.number, seconds=time.perf_counter() - started
            )
        finally:
            admitted.release()
        alarms = service.gate.observe(
            principal.key_id,
            record.name,
            found.number,
            policy,
            dict(request.inputs),
            outputs,
            found.signature,
            sink=service._on_alarms,
        )
        if alarms:
            service._on_alarms(principal.key_id, record.name, policy, alarms)
        hardened = service.gate.harden(policy, principal.role, outputs, found.signature)
        wanted = request.output_names()
        if wanted is not None:
            hardened = {name: value for name, value in hardened.items() if name in wanted}
        if policy.capture is not None:
            service._capture(principal, found, policy.capture, call.body, b"")
        budget = None
        if admitted.budget_limit is not None:
            budget = Budget(
                admitted.budget_limit, admitted.budget_remaining or 0, admitted.budget_reset
            )
        return InferResult(record.name, found.number, request, dict(hardened), rows, budget)

    def signature(
        self, principal: Principal, model: str, version: str | None = None, label: str | None = None
    ) -> tuple[VersionRecord, ModelSignature]:
        version = self._resolve(principal, Action.MODEL_READ, model, version, label)
        record = self.service._model(principal, Action.MODEL_READ, model)
        found = self.service._version(record, version)
        return found, found.signature

    def model_metadata(
        self, principal: Principal, model: str, version: str | None = None, label: str | None = None
    ) -> dict[str, Any]:
        version = self._resolve(principal, Action.MODEL_READ, model, version, label)
        record = self.service._model(principal, Action.MODEL_READ, model)
        found = self.service._version(record, version)
        metadata = self.service.model_metadata(principal, model, version)
        metadata["version"] = str(found.number)
        return metadata

    def model_ready(
        self, principal: Principal, model: str, version: str | None = None, label: str | None = None
    ) -> bool:
        version = self._resolve(principal, Action.MODEL_READ, model, version, label)
        return self.service.model_ready(principal, model, version)
