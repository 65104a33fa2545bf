"""The protocol-neutral data plane: metadata, readiness and inference (the hot path).

Every protocol adapter (V2 REST today, more under ``api/``) decodes nothing itself before the
caller is authorized: it hands ``DataPlane.infer`` the body as received and a decoder, and
encodes the ``InferResult`` it gets back. The bounded queue (which sheds before anything else),
authorization, the block check, decoding against the signature, admission, the runtime, the
detectors, hardening, metrics and payload capture all happen here, in that order, for every
protocol alike. How an adapter uses it: docs/architecture.md ("Adding a protocol").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np

from modelkeep import __version__
from modelkeep.audit import tracing
from modelkeep.auth import Principal
from modelkeep.errors import Forbidden, ModelkeepError, RateLimited, Unavailable
from modelkeep.guard.gate import Alarm, request_rows
from modelkeep.guard.policy import ModelPolicy
from modelkeep.policy import Action
from modelkeep.registry.records import ModelRecord, VersionRecord
from modelkeep.runtime.base import LoadedModel
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service._canary_watch import Watch, Watches
from modelkeep.service._runner import InferRunner
from modelkeep.service._shared import SnapshotMemo, log, model_target
from modelkeep.service.core import Core, resolve_version

if TYPE_CHECKING:
    from modelkeep.guard.drift import DriftMonitor
    from modelkeep.service.capture import Captures

__all__ = [
    "PLATFORMS",
    "Budget",
    "DataPlane",
    "Decoded",
    "InferCall",
    "InferResult",
    "Observed",
]

PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "skops": "sklearn",
    "xgboost-json": "xgboost",
    "xgboost-ubj": "xgboost",
    "lightgbm-text": "lightgbm",
}

# Resolved infer targets kept per snapshot, at most this many (model and version come from URLs).
_MAX_TARGETS = 4096


class Decoded(Protocol):
    """What a decoder returns; V2's ``InferRequest`` fits."""

    @property
    def inputs(self) -> Mapping[str, np.ndarray]:
        """Exactly the signature's inputs, in signature order."""
        ...

    def output_names(self) -> list[str] | None:
        """The outputs the caller asked for; ``None`` means all of them."""
        ...


R = TypeVar("R", bound=Decoded)


@dataclass(slots=True)
class Observed:
    """What the access log needs from a call, filled in as the data plane learns it (also for a
    call refused after decoding): the rows and the version served."""

    rows: int | None = None
    version: int | None = None


# The types below are made for every request: slots dataclasses, not frozen ones, whose
# generated __init__ costs several times as much (object.__setattr__ per field). Treat them as
# read-only all the same.


@dataclass(slots=True)
class InferCall(Generic[R]):
    """One inference request as a protocol adapter hands it over.

    ``decode(signature, max_elements)`` builds tensors checked against the signature, refusing
    with ``InvalidInput`` / ``TooLarge`` before allocating tensors larger than ``max_elements``
    elements. It runs only after authentication and authorization succeeded.
    """

    body: bytes  # the payload as received (its size and capture use it as is)
    decode: Callable[[ModelSignature, int], R]
    protocol: str = "v2"  # "v2", "v2-grpc", "tfserving", "sagemaker", "azureml", "vertex"
    observed: Observed | None = None  # filled in for the access log, when given


@dataclass(slots=True)
class Budget:
    """The caller's row budget on the model after this call."""

    limit: int
    remaining: int
    reset: datetime | None


@dataclass(slots=True)
class InferResult(Generic[R]):
    model: str  # the model's name
    version: int  # the version that answered
    request: R  # what decode returned
    # Hardened for the caller's role, in signature order; outputs removed by hardening are
    # absent; only those of request.output_names() when it names some.
    outputs: dict[str, np.ndarray]
    rows: int
    budget: Budget | None


@dataclass(frozen=True, slots=True)
class InferTarget:
    """What an infer call resolves before it runs: the model, the version served, its loaded
    runtime and its guard policy. Valid for the snapshot it was resolved from."""

    record: ModelRecord
    version: VersionRecord
    session: LoadedModel
    policy: ModelPolicy
    # Set only on a label with a canary or shadow: counts the run, samples it for the mirror.
    watch: Watch | None = None


def _no_drift(model: str, inputs: Mapping[str, np.ndarray]) -> None:
    """No drift monitor: nothing to offer."""


class DataPlane:
    """Server and model metadata, readiness and inference, for every protocol alike."""

    def __init__(
        self,
        core: Core,
        captures: Captures,
        drift: DriftMonitor | None = None,
        watches: Watches | None = None,
    ) -> None:
        self._core = core
        self.captures = captures
        # Population drift: each call's inputs are offered to the monitor, which queues them
        # for its own thread (a dictionary lookup when the model is not monitored).
        self._offer_drift: Callable[[str, Mapping[str, np.ndarray]], None] = (
            _no_drift if drift is None else drift.offer
        )
        self.settings = core.settings
        self.metrics = core.metrics
        self.gate = core.gate
        self.authorizer = core.authorizer
        self.max_elements = core.settings.max_tensor_elements
        self.runner = InferRunner(core.settings, core.metrics)
        # Canary routing and shadow mirroring; the mirror is shed once the queue is half full.
        self.watches = watches or Watches(core.session)
        runner = self.runner
        self.watches.busy = lambda: runner.in_flight * 2 >= runner.max_queue
        # What an infer call resolves before it runs, per (caller, model, version, label),
        # valid for one snapshot (see _target).
        self._targets: SnapshotMemo[tuple[Any, ...], InferTarget] = SnapshotMemo(_MAX_TARGETS)
        self._alarm_seen: dict[tuple[str, str, str], float] = {}

    # -- metadata and readiness --------------------------------------------------------------

    def server_metadata(self, principal: Principal) -> dict[str, Any]:
        self.authorizer.check(principal, Action.SERVER_READ)
        return {"name": "modelkeep", "version": __version__, "extensions": ["binary_tensor_data"]}

    def signature(
        self,
        principal: Principal,
        model: str,
        version: str | None = None,
        label: str | None = None,
    ) -> tuple[VersionRecord, ModelSignature]:
        """The version ``version`` or ``label`` names (else the default) and its signature."""
        record = self._core.authorized_model(principal, Action.MODEL_READ, model)
        found = resolve_version(record, version, label)
        return found, found.signature

    def model_metadata(
        self,
        principal: Principal,
        model: str,
        version: str | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Name, versions, platform and signature (V2 JSON form), and the version meant."""
        record = self._core.authorized_model(principal, Action.MODEL_READ, model)
        found = resolve_version(record, version, label)
        signature = found.signature.to_json()
        return {
            "name": record.name,
            "versions": [str(n) for n in sorted(record.versions)],
            "platform": PLATFORMS.get(found.format, found.format),
            "inputs": signature["inputs"],
            "outputs": signature["outputs"],
            "version": found.number,
        }

    def model_ready(
        self,
        principal: Principal,
        model: str,
        version: str | None = None,
        label: str | None = None,
    ) -> bool:
        record = self._core.authorized_model(principal, Action.MODEL_READ, model)
        found = resolve_version(record, version, label)
        try:
            self._core.session(found)
        except Unavailable:
            return False
        return True

    # -- inference ---------------------------------------------------------------------------

    def infer(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None = None,
        label: str | None = None,
    ) -> Coroutine[Any, Any, InferResult[R]]:
        """Authorize, decode, admit, queue, run, watch and harden one call (to be awaited).

        Raises only ``ModelkeepError`` subclasses. At most one of ``version`` (digits) and
        ``label`` (a modelkeep label) names the version; neither means the default one.
        """
        # The runner's coroutine itself: one coroutine less per request than an async def.
        return self.runner.run(
            model, len(call.body), self.infer_now, principal, model, call, version, label
        )

    def infer_now(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None = None,
        label: str | None = None,
    ) -> InferResult[R]:
        """``infer`` without the queue, in the caller's thread, now: for tests. Protocol
        adapters await ``infer``, so that every protocol is queued and shed alike."""
        if not tracing.enabled():
            return self._infer(principal, model, call, version, label, False)
        with tracing.span("modelkeep.infer", model=model, principal=principal.key_id):
            return self._infer(principal, model, call, version, label, True)

    def _infer(
        self,
        principal: Principal,
        model: str,
        call: InferCall[R],
        version: str | None,
        label: str | None,
        traced: bool,
    ) -> InferResult[R]:
        # ``traced``: spans are set up only when tracing is on, since on the request path even
        # a no-op context manager costs its two calls.
        # 1. Who may run what: Cedar, then any detector restriction on this key and model.
        target = self._target(principal, model, version, label)
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
        if traced:
            with tracing.span("modelkeep.decode"):
                request = call.decode(found.signature, self.max_elements)
        else:
            request = call.decode(found.signature, self.max_elements)
        inputs = request.inputs
        rows = request_rows(inputs)
        observed = call.observed
        if observed is not None:
            observed.rows = rows
            observed.version = found.number
        # 3. Admission: rows per request, rates, budget, concurrency (counted across replicas).
        gate = self.gate
        try:
            admitted = gate.admit(
                principal.key_id, record.name, rows, policy, throttled=restriction is not None
            )
        except RateLimited as exc:
            limit = str((exc.details or {}).get("limit", "other"))
            self.metrics.rate_limited(model=record.name, reason=limit)
            if limit == "budget":
                self._core.alert("budget_spent", principal=principal.key_id, model=record.name)
            raise
        wanted = request.output_names()
        try:
            # Detectors need every output (the predicted label) even when the caller asked
            # for fewer; the filter is applied after hardening.
            names = wanted if not policy.detect else None
            started = time.perf_counter()
            if traced:
                with tracing.span("modelkeep.run", version=found.number):
                    outputs = session.run(inputs, names)
            else:
                outputs = session.run(inputs, names)
            seconds = time.perf_counter() - started
            self.metrics.observe_inference(model=record.name, version=found.number, seconds=seconds)
        except ModelkeepError:
            # A run that failed counts against the version in a canary (not a caller's 4xx:
            # those are refused before the run).
            if target.watch is not None:
                target.watch.failed()
            raise
        finally:
            admitted.release()
        watch = target.watch
        if watch is not None:
            watch.ran(seconds, inputs, outputs)
        # 4. Watch the caller's query stream. Throttle and block act before the answer leaves;
        # log and alert are fed off the request path and reach _on_alarms within a bounded delay.
        alarms = gate.observe(
            principal.key_id,
            record.name,
            found.number,
            policy,
            inputs,
            outputs,
            found.signature,
            sink=self._on_alarms,
        )
        if alarms:
            self._on_alarms(principal.key_id, record.name, policy, alarms)
        self._offer_drift(record.name, inputs)
        # 5. Harden what the caller's role may see, then keep what the caller asked for.
        hardened = gate.harden(policy, principal.role, outputs, found.signature)
        if wanted is not None:
            hardened = {name: value for name, value in hardened.items() if name in wanted}
        budget = None
        if admitted.budget_limit is not None:
            budget = Budget(
                admitted.budget_limit, admitted.budget_remaining or 0, admitted.budget_reset
            )
        # 6. Payload capture (sampled, sealed and stored off the request path).
        if policy.capture is not None:
            self.captures.capture(principal, found, policy.capture, call.body, hardened)
        return InferResult(record.name, found.number, request, hardened, rows, budget)

    def _target(
        self, principal: Principal, model: str, version: str | None, label: str | None
    ) -> InferTarget:
        """Authorize ``principal`` to infer on ``model`` and resolve what the call runs.

        The same answer as ``_model``, ``resolve_version``, ``_session`` and the gate's policy
        give, remembered until the snapshot changes (any key, label, version or policy change),
        so that a request that was allowed and found once costs one lookup afterwards.
        Refusals and failures are not remembered.
        """
        core = self._core
        # Targets are only ever resolved from this snapshot or a newer one, so none can
        # outlive the snapshot it came from.
        targets = self._targets.table(core.snapshot)
        key = (principal.key_id, principal.role, principal.models, model, version, label)
        found = targets.get(key)
        if found is None:
            record = core.authorized_model(principal, Action.MODEL_INFER, model)
            served = resolve_version(record, version, label)
            watch = None
            # A request that names a version is never rerouted; one that names a label (or
            # none: the default, under `production`) may be, sticky per caller.
            if version is None and (record.canaries or record.shadows):
                served, watch = self.watches.route(record, label, served, principal.key_id)
            try:
                session = core.session(served)
            except ModelkeepError:
                # A version that cannot be loaded fails every call routed to it: counted, so
                # that a canary that will not load is withdrawn like one that fails its runs.
                if watch is not None:
                    watch.failed()
                raise
            found = InferTarget(
                record=record,
                version=served,
                session=session,
                policy=self.gate.policy(record.name, record.policy),
                watch=watch,
            )
            self._targets.remember(targets, key, found)
        return found

    def _on_alarms(self, key_id: str, model: str, policy: ModelPolicy, alarms: list[Alarm]) -> None:
        """Apply the model's alarm action; audit each alarm at most once a minute per caller.

        Called on the request path (throttle, block) or by the gate's detector thread (log,
        alert).
        """
        core = self._core
        action = policy.on_alarm
        now = time.monotonic()
        for alarm in alarms:
            self.metrics.detector_alarm(model=model, detector=alarm.detector)
            if action != "log":
                core.alert(
                    "detector_alarm",
                    principal=key_id,
                    model=model,
                    detector=alarm.detector,
                    score=alarm.score,
                )
            key = (key_id, model, alarm.detector)
            if now - self._alarm_seen.get(key, -1e9) < 60.0 and action in ("log", "alert"):
                continue
            self._alarm_seen[key] = now
            log.warning(
                "extraction alarm: detector %s on model %s for key %s (score %s, action %s)",
                alarm.detector,
                model,
                key_id,
                alarm.score,
                action,
            )
            core.record(
                key_id,
                "detector.alarm",
                model_target(model),
                "success",
                {
                    "detector": alarm.detector,
                    "score": alarm.score,
                    "samples": alarm.samples,
                    "action": action,
                },
            )
        if action in ("throttle", "block"):
            reason = ", ".join(f"{a.detector} alarm (score {a.score})" for a in alarms)
            core.store.restrict_key(model, key_id, kind=action, reason=reason, now=core.clock())
            core.refresh()
            if action == "block":
                raise Forbidden(
                    f"access to model '{model}' is suspended for this key; an admin can lift it"
                    " with `modelkeep policy unblock`"
                )
