"""The one place that orders authentication, authorization, validation, runtime and storage.

Nothing here imports HTTP. ``api/`` and ``cli/`` translate requests into calls on ``Service`` and
its errors into status codes. The hot path (``authenticate`` then ``infer``) reads only the
in-memory snapshot and loaded sessions; a background thread per worker polls the metadata store's
change counter and swaps in a fresh snapshot, which bounds how long a revoked key keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelkeep import __version__
from modelkeep.audit import KEY_FILE as AUDIT_KEY_FILE
from modelkeep.audit import (
    AuditEntry,
    AuditEvent,
    AuditLog,
    CheckpointSigner,
    VerifyResult,
    public_key_path,
    tracing,
    verify_chain,
)
from modelkeep.audit import load_public_key as load_audit_public_key
from modelkeep.audit.alerts import Alerter, AlertRule, Webhook
from modelkeep.audit.capture import (
    MAX_CAPTURE_BYTES,
    CaptureRecord,
    CaptureWriter,
    current_request_id,
    expires_at,
    is_capture_id,
    is_expired,
    new_capture_id,
    open_record,
    seal_record,
    should_capture,
)
from modelkeep.audit.metrics import Metrics
from modelkeep.auth import AuthFailure, KeyRecord, Principal, authenticate, generate_api_key
from modelkeep.auth.principal import ROLES
from modelkeep.bootstrap import BLOB_DIR, DB_FILE, KEK_FILE
from modelkeep.crypto import KeyService, LocalKeyService
from modelkeep.crypto.signing import TrustedKey, load_public_key, verify_in_memory
from modelkeep.errors import (
    ConfigError,
    Forbidden,
    IntegrityError,
    InvalidInput,
    ModelkeepError,
    ModelRefused,
    NotFound,
    RateLimited,
    Unavailable,
)
from modelkeep.guard.admission import Admission
from modelkeep.guard.gate import Alarm, InferenceGate, calibrate, request_rows
from modelkeep.guard.policy import CapturePolicy, ModelPolicy
from modelkeep.guard.tensors import decode_infer_request, encode_infer_response
from modelkeep.policy import Action, Authorizer
from modelkeep.registry.blobs import BlobStore, FileBlobStore
from modelkeep.registry.intake import accept, unpack
from modelkeep.registry.records import (
    ModelRecord,
    Snapshot,
    VersionRecord,
    check_name,
    empty_snapshot,
)
from modelkeep.registry.registry import Registry
from modelkeep.registry.store import (
    CaptureInfo,
    CaptureStore,
    MetadataStore,
    NewCapture,
    VersionDetails,
)
from modelkeep.runtime.base import LoadedModel
from modelkeep.runtime.loader import load_model
from modelkeep.settings import Settings

log = logging.getLogger(__name__)

_MAX_DESCRIPTION = 1000
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "skops": "sklearn",
    "xgboost-json": "xgboost",
    "xgboost-ubj": "xgboost",
    "lightgbm-text": "lightgbm",
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    record: KeyRecord
    token: str


class Service:
    """modelkeep's core, shared by every protocol adapter in one worker process."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: MetadataStore,
        blobs: BlobStore,
        keys: KeyService,
        authorizer: Authorizer | None = None,
        audit: AuditLog | None = None,
        gate: InferenceGate | None = None,
        metrics: Metrics | None = None,
        alerter: Alerter | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.audit = audit or AuditLog(store.engine, clock=clock)
        self.metrics = metrics or Metrics()
        self.alerter = alerter
        self.registry = Registry(store, blobs, keys, clock=clock)
        self.authorizer = authorizer or Authorizer()
        self._clock = clock
        self._snapshot: Snapshot = empty_snapshot()
        self._refresh_lock = threading.Lock()
        self._sessions: dict[tuple[str, int], LoadedModel] = {}
        self._failed: dict[tuple[str, int], ModelkeepError] = {}
        self._load_locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._last_forced_refresh = 0.0
        self._alarm_seen: dict[tuple[str, str, str], float] = {}
        self.gate = gate or InferenceGate(Admission())
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Payload capture (opt-in per model): sealed and stored off the inference path.
        self.captures = CaptureStore(store)
        self.capture_writer: CaptureWriter[tuple[CaptureRecord, datetime]] = CaptureWriter(
            self._store_capture
        )
        self.capture_random: Callable[[], float] = random.random
        self._last_capture_purge = -float("inf")

    @classmethod
    def open(cls, settings: Settings) -> Service:
        """Open the data dir made by ``modelkeep init``; ConfigError if it is not usable."""
        data_dir = settings.data_dir
        if not (data_dir / KEK_FILE).is_file():
            raise ConfigError("not a modelkeep data directory (run `modelkeep init` first)")
        if settings.database_url is None and not (data_dir / DB_FILE).is_file():
            raise ConfigError("the data directory has no database (run `modelkeep init` first)")
        store = MetadataStore(settings.effective_database_url)
        store.migrate()
        service = cls(
            settings,
            store=store,
            blobs=FileBlobStore(data_dir / BLOB_DIR),
            keys=LocalKeyService.load(data_dir / KEK_FILE),
            audit=AuditLog(store.engine, signer=CheckpointSigner.load(data_dir / AUDIT_KEY_FILE)),
            gate=InferenceGate(Admission(settings.limits_storage)),
            alerter=alerter_from(settings),
        )
        service.refresh()
        return service

    # -- change propagation --------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def refresh(self) -> bool:
        """Reload the snapshot if the store changed; returns whether it did."""
        with self._refresh_lock:
            if self.store.generation() == self._snapshot.generation:
                return False
            self._snapshot = self.store.snapshot()
            self.metrics.set_known_models(
                {name: m.versions.keys() for name, m in self._snapshot.models.items()}
            )
            self.authorizer.clear_cache()
            # Publishers or settings may have changed: failed loads get another chance.
            self._failed.clear()
            return True

    def start(self) -> None:
        """Start the per-worker poller that refreshes the snapshot and warms default versions."""
        self.record(
            "server",
            "server.start",
            "server",
            "success",
            {"pid": os.getpid(), "version": __version__, "settings_sha256": self.settings_digest()},
        )
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="modelkeep-refresh", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            with suppress(ModelkeepError):
                self.record("server", "server.stop", "server", "success", {"pid": os.getpid()})
                self.audit.checkpoint()
        self.capture_writer.close(timeout=5)
        self.metrics.close()
        if self.alerter is not None:
            self.alerter.close(timeout=10)
        self.store.close()

    def settings_digest(self) -> str:
        """SHA-256 of the effective settings; URLs that may hold passwords count by scheme only,
        and the webhook secret not at all."""
        shown = self.settings.model_dump(
            mode="json", exclude={"database_url", "limits_storage", "alert_webhook_secret"}
        )
        shown["database"] = "postgresql" if self.settings.database_url else "sqlite"
        shown["limits_storage"] = self.settings.limits_storage.split(":", 1)[0]
        return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()

    # -- audit ---------------------------------------------------------------------------

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append to the audit log; durable on return (admin and security events)."""
        self.audit.append(AuditEvent(actor, action, target, outcome, details or {}))
        self.metrics.audit_entry(action=action, outcome=outcome)

    @contextmanager
    def _audited(
        self, principal: Principal, action: str, target: str, details: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        """Record the outcome of a management action, success or refusal, before answering.

        The body may add to ``details`` (e.g. the version a push got).
        """
        try:
            yield details
        except Forbidden:
            self.record(principal.key_id, action, target, "denied", details)
            raise
        except ModelkeepError as exc:
            self.record(
                principal.key_id, action, target, "failure", {**details, "error": exc.message}
            )
            raise
        self.record(principal.key_id, action, target, "success", details)

    def alert(self, kind: str, **fields: object) -> None:
        """Count an event toward the alert rules; delivery happens in the background."""
        if self.alerter is not None:
            self.alerter.observe(kind, **fields)

    def record_auth_failure(self, failure: AuthFailure, source: str | None) -> None:
        """Audit a refused credential (security event; durable before the 401 is sent)."""
        self.metrics.auth_failure(reason=failure.reason)
        self.alert("auth_failures", source=source, reason=failure.reason)
        self.record(
            "anonymous",
            "auth.failure",
            "server",
            "denied",
            {"reason": failure.reason, "source": source},
        )

    def _poll(self) -> None:
        self._warm()
        last_checkpoint = time.monotonic()
        while not self._stop.wait(self.settings.refresh_interval_s):
            if time.monotonic() - last_checkpoint >= self.settings.audit_checkpoint_interval_s:
                last_checkpoint = time.monotonic()
                try:
                    self.audit.checkpoint()
                except IntegrityError as exc:
                    log.error("audit checkpoint refused: %s", exc.message)
                    self.alert("audit_verify_failed", problem=exc.message)
                except ModelkeepError as exc:
                    log.error("audit checkpoint failed: %s", exc.message)
            try:
                if self.refresh():
                    self._warm()
            except ModelkeepError as exc:
                log.warning("refresh failed: %s", exc.message)
            except Exception:
                log.exception("refresh failed")
            self.purge_captures()

    def _warm(self) -> None:
        """Load every model's default version so the first request does not pay for it."""
        for model in self._snapshot.models.values():
            number = model.default_version()
            if number is not None and not self._stop.is_set():
                # A failure is recorded in _failed and reported when the version is used.
                with suppress(ModelkeepError):
                    self._session(model.versions[number])

    def ready(self) -> bool:
        return self._snapshot.generation >= 0

    # -- identity ------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal:
        try:
            return authenticate(authorization, self._snapshot.keys, now=self._clock())
        except AuthFailure as exc:
            # A key created on another worker moments ago: look once more, at most every
            # 100 ms per worker so that floods of bad keys cannot turn into database load.
            now = time.monotonic()
            if exc.reason != "invalid" or now - self._last_forced_refresh < 0.1:
                raise
            self._last_forced_refresh = now
            if not self.refresh():
                raise
            return authenticate(authorization, self._snapshot.keys, now=self._clock())

    # -- lookups -------------------------------------------------------------------------

    def _model(self, principal: Principal, action: Action, model: str) -> ModelRecord:
        # Authorize before looking up, so a caller bound to other models learns nothing about
        # which names exist.
        self.authorizer.check(principal, action, model)
        record = self._snapshot.models.get(model)
        if record is None:
            raise NotFound(f"no model named '{model}'" if _safe(model) else "no such model")
        return record

    def _version(self, record: ModelRecord, version: str | int | None) -> VersionRecord:
        if version is None:
            number = record.default_version()
            if number is None:
                raise NotFound(f"model '{record.name}' has no versions")
        else:
            text = str(version)
            if not text.isdigit() or len(text) > 9:
                raise NotFound(f"model '{record.name}' has no such version")
            number = int(text)
        found = record.versions.get(number)
        if found is None:
            raise NotFound(f"model '{record.name}' has no version {number}")
        return found

    def _session(self, version: VersionRecord) -> LoadedModel:
        key = (version.model, version.number)
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._locks_lock:
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:
            session = self._sessions.get(key)
            if session is not None:
                return session
            failed = self._failed.get(key)
            if failed is not None:
                raise failed
            try:
                session = self._load(version)
            except IntegrityError as exc:
                self.alert("tampering", model=version.model, version=version.number)
                self._failed[key] = Unavailable(exc.message)
                raise self._failed[key] from exc
            except ModelkeepError as exc:
                log.error("model %s version %s failed to load", *key)
                self._failed[key] = Unavailable(
                    f"model '{version.model}' version {version.number} could not be loaded"
                )
                raise self._failed[key] from exc
            self._sessions[key] = session
            self.metrics.set_models_loaded(len(self._sessions))
            self.metrics.set_model_memory(
                model=version.model, version=version.number, nbytes=version.size
            )
            return session

    def _load(self, version: VersionRecord) -> LoadedModel:
        """Load a version, verifying it as if it had just been pushed."""
        where = f"model '{version.model}' version {version.number}"
        # 1. Unwrap the data key, decrypt, and check the plaintext digest (registry).
        plaintext = self.registry.open_version(version)
        files = unpack(plaintext, version.file_name, is_directory=version.layout == "directory")
        # 2. The signature, against the model's trusted publishers as they are now: a row or
        #    blob changed behind the server's back does not verify.
        model = self._snapshot.models.get(version.model)
        if version.bundle is not None:
            try:
                verified = verify_in_memory(files, version.bundle, self._trusted(model))
            except ModelRefused as exc:
                log.error("%s: signature verification failed at load", where)
                raise IntegrityError(f"{where} failed signature verification at load") from exc
            if verified.signer != version.signer:
                raise IntegrityError(f"{where} is signed by a key other than the one recorded")
        elif model is None or model.require_signature:
            log.error("%s: no signature, but the model requires one", where)
            raise IntegrityError(f"{where} has no signature but its model requires one")
        # 3. Only now the runtime sees the bytes, trusting only the types the scan approved.
        return load_model(
            version.format,
            files[version.file_name],
            threads=self.settings.runtime_threads,
            trusted_types=version.trusted_types,
        )

    @staticmethod
    def _trusted(model: ModelRecord | None) -> list[TrustedKey]:
        if model is None:
            return []
        return [load_public_key(pem) for pem in model.publishers.values()]

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
        with tracing.span("modelkeep.infer", model=model, principal=principal.key_id):
            return self._infer(principal, model, version, body, header_length, stats)

    def _infer(
        self,
        principal: Principal,
        model: str,
        version: str | None,
        body: bytes,
        header_length: int | None,
        stats: dict[str, Any] | None,
    ) -> tuple[bytes, dict[str, str]]:
        # 1. Who may run what: Cedar, then any detector restriction on this key and model.
        record = self._model(principal, Action.MODEL_INFER, model)
        restriction = record.restrictions.get(principal.key_id)
        if restriction is not None and restriction[0] == "block":
            raise Forbidden(
                f"access to model '{record.name}' is suspended for this key; an admin can lift"
                " it with `modelkeep policy unblock`"
            )
        found = self._version(record, version)
        session = self._session(found)
        # 2. The request must fit the signature before anything is counted or run.
        with tracing.span("modelkeep.decode"):
            request = decode_infer_request(
                body,
                found.signature,
                header_length=header_length,
                max_elements=self.settings.max_tensor_elements,
            )
        policy = self.gate.policy(record.name, record.policy)
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
        with admitted:
            # Detectors need every output (the predicted label) even when the caller asked
            # for fewer; the encoder applies the caller's filter.
            names = None
            if request.outputs is not None and not policy.detect:
                names = [o.name for o in request.outputs]
            started = time.perf_counter()
            with tracing.span("modelkeep.run", version=found.number):
                outputs = session.run(request.inputs, names)
            self.metrics.observe_inference(
                model=record.name, version=found.number, seconds=time.perf_counter() - started
            )
        # 4. Watch the caller's query stream; an alarm acts before the answer leaves.
        alarms = self.gate.observe(
            principal.key_id,
            record.name,
            found.number,
            policy,
            request.inputs,
            outputs,
            found.signature,
        )
        if alarms:
            self._on_alarms(principal, record.name, policy, alarms)
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

    def _on_alarms(
        self, principal: Principal, model: str, policy: ModelPolicy, alarms: list[Alarm]
    ) -> None:
        """Apply the model's alarm action; audit each alarm at most once a minute per caller."""
        action = policy.on_alarm
        now = time.monotonic()
        for alarm in alarms:
            self.metrics.detector_alarm(model=model, detector=alarm.detector)
            if action != "log":
                self.alert(
                    "detector_alarm",
                    principal=principal.key_id,
                    model=model,
                    detector=alarm.detector,
                    score=alarm.score,
                )
            key = (principal.key_id, model, alarm.detector)
            if now - self._alarm_seen.get(key, -1e9) < 60.0 and action in ("log", "alert"):
                continue
            self._alarm_seen[key] = now
            log.warning(
                "extraction alarm: detector %s on model %s for key %s (score %s, action %s)",
                alarm.detector,
                model,
                principal.key_id,
                alarm.score,
                action,
            )
            self.record(
                principal.key_id,
                "detector.alarm",
                _target(model),
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
            self.store.restrict_key(
                model, principal.key_id, kind=action, reason=reason, now=self._clock()
            )
            self.refresh()
            if action == "block":
                raise Forbidden(
                    f"access to model '{model}' is suspended for this key; an admin can lift it"
                    " with `modelkeep policy unblock`"
                )

    # -- management ----------------------------------------------------------------------
    # Management calls refresh first: each worker's snapshot may lag other workers' writes
    # by up to refresh_interval_s, and a write must build on every acknowledged write. It
    # costs one indexed read; the inference path never does it.

    def authorize_push(self, principal: Principal, model: str) -> None:
        """Refuse early, before an upload is read, a caller who may not push to ``model``."""
        self.authorizer.check(principal, Action.MODEL_PUSH, model)

    def push(
        self,
        principal: Principal,
        model: str,
        data: bytes,
        *,
        file_name: str,
        is_directory: bool = False,
        bundle: bytes | None = None,
    ) -> VersionRecord:
        """Verify, scan, seal, store and record a new version; all or nothing, audited."""
        self.refresh()
        details: dict[str, Any] = {"size": len(data), "signed": bundle is not None}
        with self._audited(principal, "model.push", _target(model), details):
            record = self._model(principal, Action.MODEL_PUSH, model)
            if _FILE_NAME.fullmatch(file_name) is None:
                raise InvalidInput("invalid file name: use letters, digits, '.', '_', '+', '-'")
            if not data:
                raise InvalidInput("the upload is empty")
            files = unpack(data, file_name, is_directory=is_directory)
            try:
                accepted = accept(
                    files,
                    bundle=bundle,
                    trusted=self._trusted(record),
                    require_signature=record.require_signature,
                    model=model,
                )
            except ModelRefused as exc:
                report = (exc.details or {}).get("report")
                if isinstance(report, dict):
                    details["scan"] = report.get("verdict")
                    self.metrics.scan_refused(verdict=str(report.get("verdict")))
                raise
            details.update(
                sha256=hashlib.sha256(data).hexdigest(),
                format=accepted.format,
                signer=accepted.signer,
                scan=accepted.report.verdict.value,
            )
            if accepted.signer is None:
                details["unsafe_unsigned"] = True
            version = VersionDetails(
                format=accepted.format,
                signature=accepted.signature,
                layout="directory" if is_directory else "file",
                file_name=accepted.model_file,
                signer=accepted.signer,
                bundle=bundle,
                scan_report=json.dumps(accepted.report.to_json(), sort_keys=True),
                trusted_types=accepted.trusted_types,
            )
            number = self.registry.add_version(model, data, version, uploaded_by=principal.key_id)
            details["version"] = number
        self.refresh()
        return self._snapshot.models[model].versions[number]

    def put_model(
        self,
        principal: Principal,
        model: str,
        *,
        description: str | None = None,
        require_signature: bool | None = None,
    ) -> tuple[ModelRecord, bool]:
        """Create a model or change its settings; returns the model and whether it was created."""
        self.refresh()
        details: dict[str, Any] = {}
        if require_signature is not None:
            details["require_signature"] = require_signature
        with self._audited(principal, "model.configure", _target(model), details):
            self.authorizer.check(principal, Action.MODEL_CONFIGURE, model)
            check_name("model", model)
            if description is not None and len(description) > _MAX_DESCRIPTION:
                raise InvalidInput(f"description is longer than {_MAX_DESCRIPTION} characters")
            if require_signature is False:
                log.warning("unsafe: signatures no longer required for model %s", model)
            created = self.store.put_model(
                model,
                actor=principal.key_id,
                now=self._clock(),
                description=description,
                require_signature=require_signature,
            )
            details["created"] = created
        self.refresh()
        return self._snapshot.models[model], created

    def add_publisher(self, principal: Principal, model: str, pem: str) -> TrustedKey:
        """Trust a publisher's public key (EC P-256/P-384) for ``model``."""
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "publisher.add", _target(model), details):
            self._model(principal, Action.MODEL_CONFIGURE, model)
            key = load_public_key(pem)
            details["fingerprint"] = key.fingerprint
            self.store.add_publisher(
                model, key.fingerprint, key.pem, actor=principal.key_id, now=self._clock()
            )
        self.refresh()
        return key

    def remove_publisher(self, principal: Principal, model: str, fingerprint: str) -> None:
        self.refresh()
        details = {"fingerprint": fingerprint[:80]}
        with self._audited(principal, "publisher.remove", _target(model), details):
            self._model(principal, Action.MODEL_CONFIGURE, model)
            self.store.remove_publisher(model, fingerprint)
        self.refresh()

    # -- audit ---------------------------------------------------------------------------

    def audit_entries(
        self,
        principal: Principal,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        model: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """Audit entries matching the filters, newest first (auditors and admins)."""
        self.authorizer.check(principal, Action.AUDIT_READ)
        return list(
            self.audit.entries(
                since=since,
                until=until,
                actor=actor,
                action=action,
                model=model,
                limit=limit,
                newest_first=True,
            )
        )

    # -- payload capture -----------------------------------------------------------------

    def _capture(
        self,
        principal: Principal,
        version: VersionRecord,
        capture: CapturePolicy,
        body: bytes,
        content: bytes,
    ) -> None:
        """Queue a sampled request for sealing and storage; never blocks or fails inference."""
        if not should_capture(capture.sample, self.capture_random):
            return
        if len(body) + len(content) > MAX_CAPTURE_BYTES:
            self.capture_writer.skip_too_large()
            return
        now = self._clock()
        record = CaptureRecord(
            request_sha256=hashlib.sha256(body).hexdigest(),
            request_id=current_request_id(),
            principal=principal.key_id,
            model=version.model,
            version=version.number,
            time=now,
            input=bytes(body),
            output=bytes(content),
        )
        self.capture_writer.submit((record, expires_at(now, capture.days)))

    def _store_capture(self, item: tuple[CaptureRecord, datetime]) -> None:
        # On the writer thread: the wrap may call a remote key service, the insert waits on disk.
        record, expiry = item
        capture_id = new_capture_id()
        sealed = seal_record(record, capture_id, self.registry.keys)
        self.captures.add(
            NewCapture(
                id=capture_id,
                model=record.model,
                version=record.version,
                principal=record.principal,
                created_at=record.time,
                expires_at=expiry,
                input_size=len(record.input),
                output_size=len(record.output),
                wrapped_key=sealed.wrapped_key,
                kek_id=sealed.kek_id,
                sealed=sealed.sealed,
            )
        )

    def purge_captures(self, *, force: bool = False) -> int:
        """Delete expired captures, at most hourly unless ``force``; returns how many."""
        if not force and time.monotonic() - self._last_capture_purge < 3600.0:
            return 0
        self._last_capture_purge = time.monotonic()
        try:
            purged = self.captures.purge(self._clock())
        except ModelkeepError as exc:
            log.warning("purging expired captures failed: %s", exc.message)
            return 0
        if purged:
            log.info("purged %d expired payload captures", purged)
        return purged

    def list_captures(
        self,
        principal: Principal,
        model: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[CaptureInfo]:
        """Metadata of ``model``'s unexpired captures, newest first (auditors and admins)."""
        self.refresh()
        self.authorizer.check(principal, Action.AUDIT_READ)
        record = self._model(principal, Action.MODEL_READ, model)
        for bound in (since, until):
            if bound is not None and bound.tzinfo is None:
                raise InvalidInput("since and until need a time zone (e.g. a trailing Z)")
        found = self.captures.find(record.name, since=since, until=until, limit=limit)
        now = self._clock()
        return [info for info in found if not is_expired(info.expires_at, now)]

    def read_capture(
        self, principal: Principal, model: str, capture_id: str
    ) -> tuple[CaptureInfo, CaptureRecord]:
        """One decrypted capture (auditors and admins); the read is audited before it returns."""
        self.refresh()
        details: dict[str, Any] = {"id": capture_id[:64]}
        with self._audited(principal, "capture.read", _target(model), details):
            self.authorizer.check(principal, Action.AUDIT_READ)
            record = self._model(principal, Action.MODEL_READ, model)
            if not is_capture_id(capture_id):
                raise NotFound(f"model '{record.name}' has no such capture")
            info, wrapped_key, sealed = self.captures.get(record.name, capture_id)
            if is_expired(info.expires_at, self._clock()):
                raise NotFound(f"model '{record.name}' has no such capture")
            opened = open_record(record.name, capture_id, wrapped_key, sealed, self.registry.keys)
        return info, opened

    def metrics_exposition(self, principal: Principal) -> tuple[bytes, str]:
        """Prometheus text exposition (auditors and admins)."""
        self.authorizer.check(principal, Action.AUDIT_READ)
        return self.metrics.render()

    def audit_verify(self, principal: Principal) -> VerifyResult:
        """Verify the whole chain and its signed checkpoints (auditors and admins)."""
        self.authorizer.check(principal, Action.AUDIT_READ)
        public_key = None
        if self.settings.data_dir is not None:
            public_key = load_audit_public_key(
                public_key_path(self.settings.data_dir / AUDIT_KEY_FILE)
            )
        return verify_chain(self.store.engine, public_key)

    # -- guard policy --------------------------------------------------------------------

    def get_policy(self, principal: Principal, model: str) -> tuple[ModelPolicy, ModelRecord]:
        self.refresh()
        record = self._model(principal, Action.POLICY_READ, model)
        return self.gate.policy(record.name, record.policy), record

    def set_policy(self, principal: Principal, model: str, policy: dict[str, Any]) -> ModelPolicy:
        """Replace a model's guard policy (validated first); audited."""
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "policy.set", _target(model), details):
            self._model(principal, Action.MODEL_CONFIGURE, model)
            parsed = ModelPolicy.from_json(policy)
            shown = parsed.to_json()
            shown.pop("ood_reference", None)
            details["policy"] = shown
            self.store.set_policy(model, parsed.dumps(), actor=principal.key_id, now=self._clock())
        self.refresh()
        return parsed

    def calibrate_policy(
        self, principal: Principal, model: str, rows: list[list[float]]
    ) -> ModelPolicy:
        """Set the PRADA threshold and the OOD reference from benign rows of the default version.

        The rows are split among simulated benign callers; the threshold sits below the lowest
        Shapiro-Wilk W any of them reaches (``calibrate_prada``).
        """
        self.refresh()
        details: dict[str, Any] = {"rows": len(rows)}
        with self._audited(principal, "policy.calibrate", _target(model), details):
            record = self._model(principal, Action.MODEL_CONFIGURE, model)
            found = self._version(record, None)
            policy = self.gate.policy(record.name, record.policy)
            threshold, reference = calibrate(self._session(found), found.signature, rows)
            details["prada_threshold"] = threshold
            updated = policy.updated(prada_threshold=threshold, ood_reference=reference.to_json())
            self.store.set_policy(model, updated.dumps(), actor=principal.key_id, now=self._clock())
        self.refresh()
        return updated

    def unblock(self, principal: Principal, model: str, key_id: str) -> None:
        """Lift a detector's block or throttle of ``key_id`` on ``model``; audited."""
        self.refresh()
        with self._audited(principal, "policy.unblock", _target(model), {"key": key_id[:32]}):
            record = self._model(principal, Action.MODEL_CONFIGURE, model)
            self.store.lift_restriction(model, key_id)
            self.gate.reset(key_id, model, list(record.versions))
        self.refresh()

    def reset_budget(self, principal: Principal, model: str, key_id: str) -> None:
        self.refresh()
        with self._audited(principal, "budget.reset", _target(model), {"key": key_id[:32]}):
            self._model(principal, Action.MODEL_CONFIGURE, model)
            self.gate.admission.reset_budget(key_id, model)

    def list_models(self, principal: Principal) -> list[ModelRecord]:
        self.refresh()
        self.authorizer.check(principal, Action.SERVER_READ)
        return [
            m
            for name, m in sorted(self._snapshot.models.items())
            if self.authorizer.is_allowed(principal, Action.MODEL_READ, name)
        ]

    def get_model(self, principal: Principal, model: str) -> ModelRecord:
        self.refresh()
        return self._model(principal, Action.MODEL_READ, model)

    def get_version(self, principal: Principal, model: str, version: str) -> VersionRecord:
        self.refresh()
        return self._version(self._model(principal, Action.MODEL_READ, model), version)

    def set_label(self, principal: Principal, model: str, label: str, version: int) -> None:
        self.refresh()
        details: dict[str, Any] = {"label": label[:63], "version": version}
        with self._audited(principal, "label.set", _target(model), details):
            self._model(principal, Action.LABEL_SET, model)
            check_name("label", label)
            previous = self._snapshot.models[model].labels.get(label)
            details["previous"] = previous
            self.store.set_label(model, label, version, actor=principal.key_id, now=self._clock())
        self.refresh()

    def delete_label(self, principal: Principal, model: str, label: str) -> None:
        self.refresh()
        details: dict[str, Any] = {"label": label[:63]}
        with self._audited(principal, "label.delete", _target(model), details):
            self._model(principal, Action.LABEL_DELETE, model)
            check_name("label", label)
            self.store.delete_label(model, label)
        self.refresh()

    def create_key(
        self,
        principal: Principal,
        *,
        role: str,
        models: list[str] | None,
        expires_at: datetime | None,
        description: str = "",
    ) -> CreatedKey:
        details: dict[str, Any] = {"role": role[:32]}
        with self._audited(principal, "key.create", "server", details):
            self.authorizer.check(principal, Action.KEY_CREATE)
            record, token = self._new_key(role, models, expires_at, description)
            details.update(
                key=record.key_id,
                models=None if models is None else sorted(models),
                expires_at=None if expires_at is None else expires_at.isoformat(),
            )
            self.store.create_key(record, created_by=principal.key_id)
        self.refresh()
        return CreatedKey(record=record, token=token)

    def _new_key(
        self, role: str, models: list[str] | None, expires_at: datetime | None, description: str
    ) -> tuple[KeyRecord, str]:
        if role not in ROLES:
            raise InvalidInput(f"unknown role; use one of: {', '.join(ROLES)}")
        if role == "admin" and models is not None:
            raise InvalidInput("admin keys cannot be limited to models")
        if models is not None:
            if not models:
                raise InvalidInput("models must be a non-empty list, or null for every model")
            for name in models:
                check_name("model", name)
        now = self._clock()
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise InvalidInput("expires_at needs a time zone (e.g. a trailing Z)")
            if expires_at <= now:
                raise InvalidInput("expires_at is in the past")
        if len(description) > _MAX_DESCRIPTION:
            raise InvalidInput(f"description is longer than {_MAX_DESCRIPTION} characters")
        new = generate_api_key()
        record = KeyRecord(
            key_id=new.key_id,
            secret_hash=new.secret_hash,
            role=role,
            models=None if models is None else frozenset(models),
            description=description,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
        )
        return record, new.token

    def list_keys(self, principal: Principal) -> list[KeyRecord]:
        self.refresh()
        self.authorizer.check(principal, Action.KEY_LIST)
        return sorted(self._snapshot.keys.values(), key=lambda k: (k.created_at, k.key_id))

    def revoke_key(self, principal: Principal, key_id: str) -> KeyRecord:
        self.refresh()
        target = f"key:{key_id[:32]}"
        with self._audited(principal, "key.revoke", target, {}):
            self.authorizer.check(principal, Action.KEY_REVOKE)
            self.store.revoke_key(key_id, now=self._clock())
        self.refresh()
        found = self._snapshot.keys.get(key_id)
        if found is None:
            raise NotFound("no such API key")
        return found

    def whoami(self, principal: Principal) -> KeyRecord:
        found = self._snapshot.keys.get(principal.key_id)
        if found is None:
            raise NotFound("no such API key")
        return found


def alerter_from(settings: Settings) -> Alerter | None:
    """The alert rules of the issue, delivered to the configured webhooks (none: no alerts)."""
    if not settings.alert_webhooks:
        return None
    if settings.alert_webhook_secret is None:
        raise ConfigError("alert webhooks need MODELKEEP_ALERT_WEBHOOK_SECRET to sign bodies")
    rules = [
        AlertRule(
            "auth-failures",
            "auth_failures",
            threshold=settings.alert_auth_failures_per_minute,
            group_by="source",
        ),
        AlertRule("detector-alarm", "detector_alarm"),
        AlertRule("budget-spent", "budget_spent"),
        AlertRule("tampering", "tampering"),
        AlertRule("audit-verify-failed", "audit_verify_failed"),
    ]
    hooks = [Webhook(url, settings.alert_webhook_secret) for url in settings.alert_webhooks]
    return Alerter(hooks, rules)


def _target(model: str) -> str:
    return f"model:{model}" if _safe(model) else "model:?"


def _safe(name: str) -> bool:
    try:
        check_name("model", name)
    except InvalidInput:
        return False
    return True
