"""The one place that orders authentication, authorization, validation, runtime and storage.

Nothing here imports HTTP. ``api/`` and ``cli/`` translate requests into calls on ``Service`` and
its errors into status codes. The hot path (``authenticate`` then ``infer``) reads only the
in-memory snapshot and loaded sessions; a background thread per worker polls the metadata store's
change counter and swaps in a fresh snapshot, which bounds how long a revoked key keeps working.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelkeep import __version__
from modelkeep.auth import KeyRecord, Principal, authenticate, generate_api_key
from modelkeep.auth.principal import ROLES
from modelkeep.bootstrap import BLOB_DIR, DB_FILE, KEK_FILE
from modelkeep.crypto import KeyService, LocalKeyService
from modelkeep.errors import (
    ConfigError,
    IntegrityError,
    InvalidInput,
    ModelkeepError,
    NotFound,
    Unavailable,
)
from modelkeep.guard.tensors import decode_infer_request, encode_infer_response
from modelkeep.policy import Action, Authorizer
from modelkeep.registry.blobs import BlobStore, FileBlobStore
from modelkeep.registry.records import (
    ModelRecord,
    Snapshot,
    VersionRecord,
    check_name,
    empty_snapshot,
)
from modelkeep.registry.registry import Registry
from modelkeep.registry.store import MetadataStore
from modelkeep.runtime.onnx import OnnxModel, inspect_onnx
from modelkeep.settings import Settings

log = logging.getLogger(__name__)

_MAX_DESCRIPTION = 1000


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
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = Registry(store, blobs, keys, clock=clock)
        self.authorizer = authorizer or Authorizer()
        self._clock = clock
        self._snapshot: Snapshot = empty_snapshot()
        self._refresh_lock = threading.Lock()
        self._sessions: dict[tuple[str, int], OnnxModel] = {}
        self._failed: dict[tuple[str, int], ModelkeepError] = {}
        self._load_locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

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
            self.authorizer.clear_cache()
            return True

    def start(self) -> None:
        """Start the per-worker poller that refreshes the snapshot and warms default versions."""
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="modelkeep-refresh", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        self.store.close()

    def _poll(self) -> None:
        self._warm()
        while not self._stop.wait(self.settings.refresh_interval_s):
            try:
                if self.refresh():
                    self._warm()
            except ModelkeepError as exc:
                log.warning("refresh failed: %s", exc.message)
            except Exception:
                log.exception("refresh failed")

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

    def _session(self, version: VersionRecord) -> OnnxModel:
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
                # Verified at every load: unwrap, decrypt, digest, then the runtime.
                plaintext = self.registry.open_version(version)
                session = OnnxModel.load(plaintext, threads=self.settings.runtime_threads)
            except IntegrityError as exc:
                self._failed[key] = Unavailable(exc.message)
                raise self._failed[key] from exc
            except ModelkeepError as exc:
                log.error("model %s version %s failed to load", *key)
                self._failed[key] = Unavailable(
                    f"model '{version.model}' version {version.number} could not be loaded"
                )
                raise self._failed[key] from exc
            self._sessions[key] = session
            return session

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
            "platform": "onnxruntime_onnx",
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
    ) -> tuple[bytes, dict[str, str]]:
        """Validate a V2 request against the version's signature, run it, encode the answer."""
        record = self._model(principal, Action.MODEL_INFER, model)
        found = self._version(record, version)
        session = self._session(found)
        request = decode_infer_request(
            body,
            found.signature,
            header_length=header_length,
            max_elements=self.settings.max_tensor_elements,
        )
        names = None if request.outputs is None else [o.name for o in request.outputs]
        outputs = session.run(request.inputs, names)
        return encode_infer_response(
            model_name=record.name,
            model_version=str(found.number),
            request=request,
            outputs=outputs,
        )

    # -- management ----------------------------------------------------------------------

    def authorize_push(self, principal: Principal, model: str) -> None:
        """Refuse early, before an upload is read, a caller who may not push to ``model``."""
        self.authorizer.check(principal, Action.MODEL_PUSH, model)

    def push(
        self, principal: Principal, model: str, data: bytes, *, description: str = ""
    ) -> VersionRecord:
        """Check, seal, store and record a new version; all or nothing."""
        self.authorizer.check(principal, Action.MODEL_PUSH, model)
        check_name("model", model)
        if len(description) > _MAX_DESCRIPTION:
            raise InvalidInput(f"description is longer than {_MAX_DESCRIPTION} characters")
        if not data:
            raise InvalidInput("the upload is empty")
        # The runtime's own view of the model is its signature; refusals explain themselves.
        signature = inspect_onnx(data)
        number = self.registry.add_version(
            model,
            data,
            fmt="onnx",
            signature=signature,
            uploaded_by=principal.key_id,
            description=description,
        )
        self.refresh()
        return self._snapshot.models[model].versions[number]

    def list_models(self, principal: Principal) -> list[ModelRecord]:
        self.authorizer.check(principal, Action.SERVER_READ)
        return [
            m
            for name, m in sorted(self._snapshot.models.items())
            if self.authorizer.is_allowed(principal, Action.MODEL_READ, name)
        ]

    def get_model(self, principal: Principal, model: str) -> ModelRecord:
        return self._model(principal, Action.MODEL_READ, model)

    def get_version(self, principal: Principal, model: str, version: str) -> VersionRecord:
        return self._version(self._model(principal, Action.MODEL_READ, model), version)

    def set_label(self, principal: Principal, model: str, label: str, version: int) -> None:
        self._model(principal, Action.LABEL_SET, model)
        check_name("label", label)
        self.store.set_label(model, label, version, actor=principal.key_id, now=self._clock())
        self.refresh()

    def delete_label(self, principal: Principal, model: str, label: str) -> None:
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
        self.authorizer.check(principal, Action.KEY_CREATE)
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
        self.store.create_key(record, created_by=principal.key_id)
        self.refresh()
        return CreatedKey(record=record, token=new.token)

    def list_keys(self, principal: Principal) -> list[KeyRecord]:
        self.authorizer.check(principal, Action.KEY_LIST)
        return sorted(self._snapshot.keys.values(), key=lambda k: (k.created_at, k.key_id))

    def revoke_key(self, principal: Principal, key_id: str) -> KeyRecord:
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


def _safe(name: str) -> bool:
    try:
        check_name("model", name)
    except InvalidInput:
        return False
    return True
