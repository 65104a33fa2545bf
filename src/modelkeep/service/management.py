"""Models, versions, labels, publishers, API keys and pushes: the management part of the service."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from modelkeep.auth import KeyRecord, Principal, generate_api_key
from modelkeep.auth.principal import ROLES
from modelkeep.crypto.signing import TrustedKey, load_public_key
from modelkeep.errors import InvalidInput, ModelRefused, NotFound
from modelkeep.policy import Action
from modelkeep.registry.intake import accept
from modelkeep.registry.lineage import Lineage
from modelkeep.registry.records import ModelRecord, VersionRecord, check_name
from modelkeep.registry.upload import Upload
from modelkeep.service._shared import log, model_target
from modelkeep.service.changes import Changes
from modelkeep.service.core import Core, resolve_version
from modelkeep.service.lineage import check_lineage
from modelkeep.store.metadata import ChangeRequest, PushKey, VersionDetails

_MAX_DESCRIPTION = 1000
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
# What an Idempotency-Key may look like: a UUID, a random token, up to 128 characters.
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=/-]{7,127}")


@dataclass(frozen=True, slots=True)
class CreatedKey:
    record: KeyRecord
    token: str


class Management:
    """Management calls: models, versions, labels, publishers, keys, pushes.

    Label moves go through ``changes`` (protected labels open change requests) and each push
    is evaluated in the background on the model's evaluation set."""

    def __init__(self, core: Core, changes: Changes) -> None:
        self.core = core
        # Protected labels move through change requests; pushes are evaluated (lifecycle).
        self.changes = changes
        self.settings = core.settings
        self.store = core.store
        self.registry = core.registry
        self.authorizer = core.authorizer
        self.metrics = core.metrics
        self.refresh = core.refresh
        self._model = core.authorized_model
        self._audited = core.audited
        self._clock = core.clock
        self._trusted = core.trusted

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
        data: Upload | bytes,
        *,
        file_name: str,
        is_directory: bool = False,
        bundle: bytes | None = None,
        idempotency_key: str | None = None,
        lineage: Lineage | None = None,
    ) -> VersionRecord:
        """Verify, scan, seal, store and record a new version; all or nothing, audited.

        ``data`` is a finished upload (streamed in and sealed by the caller) or the bytes.
        With ``idempotency_key``, a push this caller already made to this model with the same
        key and request returns that version instead of making another; the same key with a
        different request is a Conflict.
        """
        if isinstance(data, bytes):
            with Upload.of(data, self.registry.staging_dir) as upload:
                return self.push(
                    principal,
                    model,
                    upload,
                    file_name=file_name,
                    is_directory=is_directory,
                    bundle=bundle,
                    idempotency_key=idempotency_key,
                    lineage=lineage,
                )
        self.refresh()
        details: dict[str, Any] = {"size": data.size, "signed": bundle is not None}
        with self._audited(principal, "model.push", model_target(model), details):
            record = self._model(principal, Action.MODEL_PUSH, model)
            if _FILE_NAME.fullmatch(file_name) is None:
                raise InvalidInput("invalid file name: use letters, digits, '.', '_', '+', '-'")
            if not data.size:
                raise InvalidInput("the upload is empty")
            if lineage is not None:
                # Declared lineage (registry/lineage.py): its digest is audited, it is kept.
                check_lineage(record, lineage)
                details["lineage_sha256"] = hashlib.sha256(lineage.dumps().encode()).hexdigest()
            push_key = self._push_key(
                principal,
                data,
                file_name,
                is_directory,
                bundle,
                idempotency_key,
                None if lineage is None else lineage.dumps(),
            )
            details["sha256"] = data.sha256
            if push_key is not None:
                details["idempotency_key"] = hashlib.sha256(push_key.key.encode()).hexdigest()[:16]
                number = self.registry.pushed_with(model, push_key)
                if number is not None:
                    details.update(version=number, replayed=True)
                    # Another worker may have made it since this one last looked.
                    self.refresh()
                    return self.core.snapshot.models[model].versions[number]
            try:
                accepted = accept(
                    data,
                    file_name=file_name,
                    is_directory=is_directory,
                    bundle=bundle,
                    trusted=self._trusted(record),
                    require_signature=record.require_signature,
                    model=model,
                    plaintext_dir=str(self.settings.plaintext_dir),
                )
            except ModelRefused as exc:
                report = (exc.details or {}).get("report")
                if isinstance(report, dict):
                    details["scan"] = report.get("verdict")
                    self.metrics.scan_refused(verdict=str(report.get("verdict")))
                raise
            details.update(
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
                lineage=None if lineage is None else lineage.dumps(),
            )
            number = self.registry.add_version(
                model, data, version, uploaded_by=principal.key_id, push_key=push_key
            )
            details["version"] = number
        self.refresh()
        # Metrics on the model's evaluation set, computed in the background (lifecycle).
        self.changes.evaluations.schedule_evaluation(model, number)
        return self.core.snapshot.models[model].versions[number]

    def _push_key(
        self,
        principal: Principal,
        upload: Upload,
        file_name: str,
        is_directory: bool,
        bundle: bytes | None,
        key: str | None,
        lineage: str | None = None,
    ) -> PushKey | None:
        if key is None:
            return None
        if _IDEMPOTENCY_KEY.fullmatch(key) is None:
            raise InvalidInput(
                "invalid Idempotency-Key: 8 to 128 letters, digits or '._:+=/-' (a UUID will do)"
            )
        request = json.dumps(
            [
                upload.sha256,
                file_name,
                is_directory,
                None if bundle is None else hashlib.sha256(bundle).hexdigest(),
            ]
            # Declared lineage is part of the request (a key reused with another is refused);
            # without it the fingerprint stays what it was before lineage existed.
            + ([] if lineage is None else [hashlib.sha256(lineage.encode()).hexdigest()])
        )
        return PushKey(
            principal=principal.key_id,
            key=key,
            request_sha256=hashlib.sha256(request.encode()).hexdigest(),
            expires_at=self._clock() + timedelta(seconds=self.settings.push_key_ttl_s),
        )

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
        with self._audited(principal, "model.configure", model_target(model), details):
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
        return self.core.snapshot.models[model], created

    def add_publisher(self, principal: Principal, model: str, pem: str) -> TrustedKey:
        """Trust a publisher's public key (EC P-256/P-384) for ``model``."""
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "publisher.add", model_target(model), details):
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
        with self._audited(principal, "publisher.remove", model_target(model), details):
            self._model(principal, Action.MODEL_CONFIGURE, model)
            self.store.remove_publisher(model, fingerprint)
        self.refresh()

    def list_models(self, principal: Principal) -> list[ModelRecord]:
        self.refresh()
        self.authorizer.check(principal, Action.SERVER_READ)
        return [
            m
            for name, m in sorted(self.core.snapshot.models.items())
            if self.authorizer.is_allowed(principal, Action.MODEL_READ, name)
        ]

    def get_model(self, principal: Principal, model: str) -> ModelRecord:
        self.refresh()
        return self._model(principal, Action.MODEL_READ, model)

    def get_version(self, principal: Principal, model: str, version: str) -> VersionRecord:
        self.refresh()
        return resolve_version(self._model(principal, Action.MODEL_READ, model), version)

    def set_label(
        self, principal: Principal, model: str, label: str, version: int
    ) -> ChangeRequest | None:
        """Point ``label`` at ``version``; a protected label gets a change request instead."""
        change = self.changes.protected_move(principal, model, label, version)
        if change is not None:
            return change
        details: dict[str, Any] = {"label": label[:63], "version": version}
        with self._audited(principal, "label.set", model_target(model), details):
            self._model(principal, Action.LABEL_SET, model)
            check_name("label", label)
            previous = self.core.snapshot.models[model].labels.get(label)
            details["previous"] = previous
            self.store.set_label(model, label, version, actor=principal.key_id, now=self._clock())
        self.refresh()
        return None

    def delete_label(self, principal: Principal, model: str, label: str) -> None:
        self.refresh()
        details: dict[str, Any] = {"label": label[:63]}
        with self._audited(principal, "label.delete", model_target(model), details):
            self._model(principal, Action.LABEL_DELETE, model)
            check_name("label", label)
            self.changes.refuse_protected_delete(model, label)
            self.store.delete_label(model, label, actor=principal.key_id, now=self._clock())
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
        return sorted(self.core.snapshot.keys.values(), key=lambda k: (k.created_at, k.key_id))

    def revoke_key(self, principal: Principal, key_id: str) -> KeyRecord:
        self.refresh()
        target = f"key:{key_id[:32]}"
        with self._audited(principal, "key.revoke", target, {}):
            self.authorizer.check(principal, Action.KEY_REVOKE)
            self.store.revoke_key(key_id, now=self._clock())
        self.refresh()
        found = self.core.snapshot.keys.get(key_id)
        if found is None:
            raise NotFound("no such API key")
        return found

    def whoami(self, principal: Principal) -> KeyRecord:
        found = self.core.snapshot.keys.get(principal.key_id)
        if found is None:
            raise NotFound("no such API key")
        return found
