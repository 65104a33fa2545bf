"""The Open Inference Protocol calls of ``Service``: metadata, readiness and inference."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from modelkeep import __version__
from modelkeep._service._base import ServiceBase, SnapshotMemo, log, model_target
from modelkeep.audit import tracing
from modelkeep.auth import Principal
from modelkeep.errors import Forbidden, RateLimited, Unavailable
from modelkeep.guard.gate import Alarm, request_rows
from modelkeep.guard.policy import ModelPolicy
from modelkeep.guard.tensors import InferRequest, decode_infer_request, encode_infer_response
from modelkeep.policy import Action
from modelkeep.registry.records import ModelRecord, VersionRecord
from modelkeep.runtime.base import LoadedModel

PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "skops": "sklearn",
    "xgboost-json": "xgboost",
    "xgboost-ubj": "xgboost",
    "lightgbm-text": "lightgbm",
}


@dataclass(frozen=True, slots=True)
class InferTarget:
    """What an infer call resolves before it runs: the model, the version served, its loaded
    runtime and its guard policy. Valid for the snapshot it was resolved from."""

    record: ModelRecord
    version: VersionRecord
    session: LoadedModel
    policy: ModelPolicy


class InferenceMixin(ServiceBase):
    """Server and model metadata, readiness and inference (the hot path)."""

    _targets: SnapshotMemo[tuple[Any, ...], InferTarget]

    # -- Open Inference Protocol -------------------------------------------------------------

    def server_metadata(self, principal: Principal) -> dict[str, Any]:
        self.authorizer.check(principal, Action.SERVER_READ)
        return {"name": "modelkeep", "version": __version__, "extensions": ["binary_tensor_data"]}

    def model_metadata(
        self, principal: Principal, model: str, version: str | None
    ) -> dict[str, Any]:
        record = self._model(principal, Action.MODEL_READ, model)
        found = self._version(record, version)
        signature = found.signature.to_json()
        return {
            "name": record.name,
            "versions": [str(n) for n in sorted(record.versions)],
            "platform": PLATFORMS.get(found.format, found.format),
            "inputs": signature["inputs"],
            "outputs": signature["outputs"],
        }

    def model_ready(self, principal: Principal, model: str, version: str | None) -> bool:
        record = self._model(principal, Action.MODEL_READ, model)
        found = self._version(record, version)
        try:
            self._session(found)
        except Unavailable:
            return False
        return True

    def infer(
        self,
        principal: Principal,
        model: str,
        version: str | None,
        body: bytes,
        *,
        header_length: int | None = None,
        stats: dict[str, Any] | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """Validate a V2 request, admit it, run it, watch it, harden the answer, encode it.

        ``stats`` (the request's ASGI state) receives the rows and version for the access log.
        """
        if not tracing.enabled():
            return self._infer(principal, model, version, body, header_length, stats, False)
        with tracing.span("modelkeep.infer", model=model, principal=principal.key_id):
            return self._infer(principal, model, version, body, header_length, stats, True)

    def _infer(
        self,
        principal: Principal,
        model: str,
        version: str | None,
        body: bytes,
        header_length: int | None,
        stats: dict[str, Any] | None,
        traced: bool,
    ) -> tuple[bytes, dict[str, str]]:
        # ``traced``: spans are set up only when tracing is on, since on the request path even
        # a no-op context manager costs its two calls.
        # 1. Who may run what: Cedar, then any detector restriction on this key and model.
        target = self._target(principal, model, version)
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
                request = self._decode(body, found, header_length)
        else:
            request = self._decode(body, found, header_length)
        rows = request_rows(request.inputs)
        if stats is not None:
            stats["rows"] = rows
            stats["version"] = found.number
        # 3. Admission: rows per request, rates, budget, concurrency (counted across replicas).
        try:
            admitted = self.gate.admit(
                principal.key_id, record.name, rows, policy, throttled=restriction is not None
            )
        except RateLimited as exc:
            limit = str((exc.details or {}).get("limit", "other"))
            self.metrics.rate_limited(model=record.name, reason=limit)
            if limit == "budget":
                self.alert("budget_spent", principal=principal.key_id, model=record.name)
            raise
        try:
            # Detectors need every output (the predicted label) even when the caller asked
            # for fewer; the encoder applies the caller's filter.
            names = None
            if request.outputs is not None and not policy.detect:
                names = [o.name for o in request.outputs]
            started = time.perf_counter()
            if traced:
                with tracing.span("modelkeep.run", version=found.number):
                    outputs = session.run(request.inputs, names)
            else:
                outputs = session.run(request.inputs, names)
            self.metrics.observe_inference(
                model=record.name, version=found.number, seconds=time.perf_counter() - started
            )
        finally:
            admitted.release()
        # 4. Watch the caller's query stream. Throttle and block act before the answer leaves;
        # log and alert are fed off the request path and reach _on_alarms within a bounded delay.
        alarms = self.gate.observe(
            principal.key_id,
            record.name,
            found.number,
            policy,
            request.inputs,
            outputs,
            found.signature,
            sink=self._on_alarms,
        )
        if alarms:
            self._on_alarms(principal.key_id, record.name, policy, alarms)
        # Population drift: queued for the drift monitor's thread (a lookup when not monitored).
        self.drift.offer(record.name, request.inputs)
        # 5. Harden what the caller's role may see.
        hardened = self.gate.harden(policy, principal.role, outputs, found.signature)
        content, headers = encode_infer_response(
            model_name=record.name,
            model_version=str(found.number),
            request=request,
            outputs=hardened,
        )
        if admitted.budget_limit is not None:
            headers["X-Budget-Limit"] = str(admitted.budget_limit)
            headers["X-Budget-Remaining"] = str(admitted.budget_remaining)
            if admitted.budget_reset is not None:
                headers["X-Budget-Reset"] = admitted.budget_reset.isoformat()
        if policy.capture is not None:
            self._capture(principal, found, policy.capture, body, content)
        return content, headers

    def _decode(self, body: bytes, found: VersionRecord, header_length: int | None) -> InferRequest:
        return decode_infer_request(
            body,
            found.signature,
            header_length=header_length,
            max_elements=self.settings.max_tensor_elements,
        )

    def _target(self, principal: Principal, model: str, version: str | None) -> InferTarget:
        """Authorize ``principal`` to infer on ``model`` and resolve what the call runs.

        The same answer as ``_model``, ``_version``, ``_session`` and the gate's policy give,
        remembered until the snapshot changes (any key, label, version or policy change), so
        that a request that was allowed and found once costs one lookup afterwards. Refusals
        and failures are not remembered.
        """
        # Targets are only ever resolved from this snapshot or a newer one, so none can
        # outlive the snapshot it came from.
        targets = self._targets.table(self._snapshot)
        key = (principal.key_id, principal.role, principal.models, model, version)
        found = targets.get(key)
        if found is None:
            record = self._model(principal, Action.MODEL_INFER, model)
            served = self._version(record, version)
            found = InferTarget(
                record=record,
                version=served,
                session=self._session(served),
                policy=self.gate.policy(record.name, record.policy),
            )
            self._targets.remember(targets, key, found)
        return found

    def _on_alarms(self, key_id: str, model: str, policy: ModelPolicy, alarms: list[Alarm]) -> None:
        """Apply the model's alarm action; audit each alarm at most once a minute per caller.

        Called on the request path (throttle, block) or by the gate's detector thread (log,
        alert).
        """
        action = policy.on_alarm
        now = time.monotonic()
        for alarm in alarms:
            self.metrics.detector_alarm(model=model, detector=alarm.detector)
            if action != "log":
                self.alert(
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
            self.record(
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
            self.store.restrict_key(model, key_id, kind=action, reason=reason, now=self._clock())
            self.refresh()
            if action == "block":
                raise Forbidden(
                    f"access to model '{model}' is suspended for this key; an admin can lift it"
                    " with `modelkeep policy unblock`"
                )
