"""The service's core: snapshot and refresh, audit records, authentication, lookups, loading.

Nothing here imports HTTP. ``api/`` and ``cli/`` translate requests into calls on ``Service`` and
its errors into status codes. The hot path (``authenticate``, ``dataplane.infer``) reads only the
in-memory snapshot and loaded sessions; a background thread per worker polls the metadata store's
change counter and swaps in a fresh snapshot, which bounds how long a revoked key keeps working.
On PostgreSQL a change notification wakes that thread at once (``store/_changes.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from modelkeep import __version__
from modelkeep.audit import AuditEvent, AuditLog
from modelkeep.audit.alerts import Alerter, AlertRule, Webhook
from modelkeep.audit.metrics import Metrics
from modelkeep.auth import AuthFailure, Principal, authenticate
from modelkeep.crypto import KeyService
from modelkeep.crypto.signing import TrustedKey, load_public_key
from modelkeep.errors import (
    ConfigError,
    Forbidden,
    IntegrityError,
    InvalidInput,
    KeyServiceError,
    ModelkeepError,
    NotFound,
    Unavailable,
)
from modelkeep.guard.admission import Admission
from modelkeep.guard.gate import InferenceGate
from modelkeep.policy import Action, Authorizer
from modelkeep.registry.blobs import BlobStore
from modelkeep.registry.records import ModelRecord, Snapshot, VersionRecord, empty_snapshot
from modelkeep.registry.registry import Registry
from modelkeep.runtime._plaintext_file import plaintext_file
from modelkeep.runtime.base import LoadedModel
from modelkeep.runtime.loader import load_model
from modelkeep.service._shared import SnapshotMemo, is_safe_name
from modelkeep.service.backends import Backend, BackendProbe
from modelkeep.settings import Settings
from modelkeep.store.metadata import MetadataStore

__all__ = ["Core", "alerter_from", "resolve_version"]

# Log records keep the name they had before the service became a package.
log = logging.getLogger("modelkeep.service")


# Verified Authorization headers kept per snapshot, at most this many (one per valid key in use).
_MAX_VERIFIED = 4096


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Core:
    """What every part of the service shares in one worker process: the snapshot and its
    refresh, audited records and alerts, authentication, lookups and model loading.

    The parts (data plane, management, guard administration, audit, captures, key service)
    are built over it by the ``Service`` facade (``facade.py``); they hook into its snapshot
    changes, its poll loop and its shutdown with ``on_refresh``, ``on_poll`` and ``on_stop``.
    """

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
        self.clock = clock
        self._snapshot: Snapshot = empty_snapshot()
        self._refresh_lock = threading.Lock()
        self._sessions: dict[tuple[str, int], LoadedModel] = {}
        # Authorization headers already verified against one snapshot (see authenticate).
        self._verified: SnapshotMemo[str, Principal] = SnapshotMemo(_MAX_VERIFIED)
        self._failed: dict[tuple[str, int], ModelkeepError] = {}
        self._load_locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._last_forced_refresh = 0.0
        self.gate = gate or InferenceGate(Admission())
        self.gate.feed.on_drop = self.metrics.detector_feed_dropped
        self._stop = threading.Event()
        # Set by a change notification (PostgreSQL) to refresh before the poll interval is up.
        self._wake = threading.Event()
        self._poller: threading.Thread | None = None
        self._listener = store.listener(self._wake.set)
        # Set when the first warm-up after start has loaded every default version (readiness).
        self._warmed = True
        self.backends = BackendProbe(self._backends(), self.metrics.set_backend_up)
        # Set on SIGTERM (api/_drain.py): not ready any more, though requests are still served.
        self.draining = False
        # Work of the parts: after each new snapshot, after each poll, and at shutdown before
        # the store closes.
        self._refresh_hooks: list[Callable[[], object]] = []
        self._poll_hooks: list[Callable[[], object]] = []
        self._stop_hooks: list[Callable[[], object]] = []

    @property
    def stopped(self) -> threading.Event:
        """Set by ``stop``, cleared by ``start``: background work of the parts ends on it."""
        return self._stop

    def on_refresh(self, hook: Callable[[], object]) -> None:
        """Call ``hook`` after each new snapshot (under the refresh lock: keep it quick)."""
        self._refresh_hooks.append(hook)

    def on_poll(self, hook: Callable[[], object]) -> None:
        """Call ``hook`` after each poll of the store (on the poller thread)."""
        self._poll_hooks.append(hook)

    def on_stop(self, hook: Callable[[], object]) -> None:
        """Call ``hook`` on ``stop``, after the last audit record, before the store closes."""
        self._stop_hooks.append(hook)

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
            # Versions deleted elsewhere (crypto-shredded) are unloaded.
            self.forget_unlisted_sessions()
            for hook in self._refresh_hooks:
                hook()
            return True

    def forget_unlisted_sessions(self) -> None:
        """Drop loaded sessions of versions no longer in the snapshot (deleted anywhere)."""
        snapshot = self._snapshot
        for key in list(self._sessions):
            model = snapshot.models.get(key[0])
            if model is None or key[1] not in model.versions:
                self._sessions.pop(key, None)
                self.metrics.set_model_memory(model=key[0], version=key[1], nbytes=0)
        self.metrics.set_models_loaded(len(self._sessions))

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
        self._warmed = False
        self.backends.start()
        self._poller = threading.Thread(target=self._poll, name="modelkeep-refresh", daemon=True)
        self._poller.start()
        if self._listener is not None:
            self._listener.start()

    def stop(self) -> None:
        self._stop.set()
        # Requests queued for the detectors are fed, and their alarms audited, before the end.
        self.gate.feed.flush(timeout=5)
        self._wake.set()
        self.backends.stop()
        if self._listener is not None:
            self._listener.stop()
        if self._poller is not None:
            self._poller.join(timeout=5)
            with suppress(ModelkeepError):
                details = {"pid": os.getpid(), "settings_sha256": self.settings_digest()}
                self.record("server", "server.stop", "server", "success", details)
                self.audit.checkpoint()
        for hook in self._stop_hooks:
            hook()
        self.metrics.close()
        if self.alerter is not None:
            self.alerter.close(timeout=10)
        self.registry.keys.close()
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
    def audited(
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
        self._warmed = True
        last_checkpoint = time.monotonic()
        while True:
            # The poll interval, or sooner when a change notification arrives.
            self._wake.wait(self.settings.refresh_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
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
            for hook in self._poll_hooks:
                hook()

    def _warm(self) -> None:
        """Load every model's default version, and the versions of its canaries and shadows,
        so the first request does not pay for it."""
        for model in self._snapshot.models.values():
            number = model.default_version()
            numbers = [] if number is None else [number]
            numbers += [c.version for c in (*model.canaries.values(), *model.shadows.values())]
            for number in numbers:
                if number in model.versions and not self._stop.is_set():
                    # A failure is recorded in _failed and reported when the version is used.
                    with suppress(ModelkeepError):
                        self.session(model.versions[number])

    def ready(self) -> bool:
        """Serving: not draining, default versions loaded (or tried), database and limits up."""
        return (
            not self.draining
            and self._snapshot.generation >= 0
            and self._warmed
            and self.backends.required_up()
        )

    def _backends(self) -> list[Backend]:
        settings = self.settings
        return [
            Backend("database", self.store.engine.dialect.name, self.store.generation),
            Backend("limits", self.gate.admission.storage_kind, self.gate.admission.ping),
            Backend(
                "blobs",
                "s3" if settings.blob_url else "file",
                lambda: next(iter(self.registry.blobs.keys()), None),
            ),
            Backend(
                "keys",
                settings.key_service.split("+", 1)[0].split(":", 1)[0],
                lambda: self.registry.keys.rotate(new_key=False),
            ),
        ]

    def drain(self) -> None:
        """Report not ready from now on: the process is shutting down."""
        self.draining = True

    # -- identity ------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header, or ``AuthFailure``.

        A header that was verified once is remembered until the snapshot changes (a key
        created, revoked or changed anywhere makes a new one), so that a client's next request
        costs a dictionary lookup instead of parsing and hashing; an expiring key's expiry is
        checked again on every request. Only successes are remembered, so the cache holds at
        most one entry per header that carried a valid key. It holds those headers, secrets
        included, in this process's memory, which the request path holds them in anyway and
        which also holds decrypted models and data keys.
        """
        snapshot = self._snapshot
        verified = self._verified.table(snapshot)
        if authorization is not None:
            known = verified.get(authorization)
            if known is not None and (known.expires_at is None or self.clock() < known.expires_at):
                return known
        principal = self._verify(authorization, snapshot)
        if authorization is not None:
            self._verified.remember(verified, authorization, principal)
        return principal

    def _verify(self, authorization: str | None, snapshot: Snapshot) -> Principal:
        try:
            return authenticate(authorization, snapshot.keys, now=self.clock())
        except AuthFailure as exc:
            if exc.reason != "invalid":
                raise
            # A key created elsewhere moments ago. The snapshot may have moved on since this
            # request read it (a change notification, another request's refresh): look there.
            # Else read the store once more, at most every 100 ms per worker, so that floods of
            # bad keys cannot turn into database load.
            if self._snapshot is snapshot:
                now = time.monotonic()
                if now - self._last_forced_refresh < 0.1:
                    raise
                self._last_forced_refresh = now
                self.refresh()
                if self._snapshot is snapshot:
                    raise
            return authenticate(authorization, self._snapshot.keys, now=self.clock())

    # -- lookups -------------------------------------------------------------------------

    def authorized_model(self, principal: Principal, action: Action, model: str) -> ModelRecord:
        # Authorize before looking up, so a caller bound to other models learns nothing about
        # which names exist.
        self.authorizer.check(principal, action, model)
        record = self._snapshot.models.get(model)
        if record is None:
            raise NotFound(f"no model named '{model}'" if is_safe_name(model) else "no such model")
        return record

    def session(self, version: VersionRecord) -> LoadedModel:
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
            except KeyServiceError as exc:
                # Fail closed with the key service's own reason. Only a KEK that is gone for
                # good is remembered; an outage is retried by the next request.
                log.error("model %s version %s: %s", *key, exc.message)
                if exc.retry_after is None:
                    self._failed[key] = exc
                raise
            except Unavailable as exc:
                # A back end that is down (the blob store): retried by the next request, not
                # remembered as a failed load.
                log.error("model %s version %s: %s", *key, exc.message)
                raise
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

    def loaded(self, version: VersionRecord) -> LoadedModel:
        """The version's session if it is loaded, else the version loaded (verified) for this
        caller only, not kept (evaluations of versions that are not served)."""
        return self._sessions.get((version.model, version.number)) or self._load(version)

    def _load(self, version: VersionRecord) -> LoadedModel:
        """Load a version, verifying it as if it had just been pushed."""
        model = self._snapshot.models.get(version.model)
        trusted = self.trusted(model)
        require_signature = model is None or model.require_signature
        # 1-2. Decrypt, check the digest and the signature against the model's publishers and
        #      rule as they are now (registry). An ONNX model file is decrypted into a private
        #      tmpfs file that ONNX Runtime maps, as at push (written with pwrite off the
        #      decrypting thread: the fastest load measured); pre-packing, ONNX Runtime copies
        #      the weights and lets go of the file. Other runtimes (and ONNX in a directory, or
        #      without a usable tmpfs) parse bytes in memory.
        # 3. Only then the runtime sees the bytes, trusting only the types the scan approved.
        onnx_file = version.format == "onnx" and version.layout != "directory" and version.size > 0
        with plaintext_file(
            version.size, base=str(self.settings.plaintext_dir), enabled=onnx_file
        ) as plain:
            if plain is not None:
                self.registry.read_verified(
                    version, trusted, require_signature=require_signature, into=plain.writer()
                )
                return load_model("onnx", plain, threads=self.settings.runtime_threads)
        model_bytes = self.registry.open_verified(
            version, trusted, require_signature=require_signature
        )
        return load_model(
            version.format,
            model_bytes,
            threads=self.settings.runtime_threads,
            trusted_types=version.trusted_types,
        )

    @staticmethod
    def trusted(model: ModelRecord | None) -> list[TrustedKey]:
        if model is None:
            return []
        return [load_public_key(pem) for pem in model.publishers.values()]


def resolve_version(
    record: ModelRecord, version: str | int | None, label: str | None = None
) -> VersionRecord:
    """The version ``version`` (digits) or ``label`` names; neither: the default version (the
    ``production`` label, else the newest). ``NotFound`` for anything that names none."""
    if label is not None:
        if version is not None:
            raise InvalidInput("name a version or a label, not both")
        number = record.labels.get(label)
        if number is None:
            shown = f"'{label}'" if is_safe_name(label) else "of that name"
            raise NotFound(f"model '{record.name}' has no label {shown}")
    elif version is None:
        default = record.default_version()
        if default is None:
            raise NotFound(f"model '{record.name}' has no versions")
        number = default
    else:
        text = str(version)
        # isdigit() alone admits '²' and other digits int() refuses (a 500 once).
        if not (text.isascii() and text.isdigit()) or len(text) > 9:
            raise NotFound(f"model '{record.name}' has no such version")
        number = int(text)
    found = record.versions.get(number)
    if found is None:
        raise NotFound(f"model '{record.name}' has no version {number}")
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
        AlertRule("drift", "drift"),
        AlertRule("change-requested", "change_requested"),
        AlertRule("change-decided", "change_decided"),
        AlertRule("emergency-change", "emergency_change"),
        AlertRule("canary-rollback", "canary_rollback"),
    ]
    hooks = [Webhook(url, settings.alert_webhook_secret) for url in settings.alert_webhooks]
    return Alerter(hooks, rules)
