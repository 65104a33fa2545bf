"""Deletion by crypto-shredding, and retention rules: the lifecycle's end (``Retention``).

Deleting a version destroys its wrapped data key in the metadata store first (one transaction,
which also refuses while a label points at the version), then deletes its sealed blob. The
blob's ciphertext is useless without that data key, so every copy of it (backups, object-store
replicas, a file copied aside) is unreadable from the commit on, whatever happens to the blob
delete. The version's row stays, marked deleted, so its digest and history remain, and the
audit log records who deleted what. Deleting a model does this for every version and destroys
its captured payloads (each sealed under its own data key, stored in the same row).

Retention rules run in every server's background poller (``apply_retention``, hooked on the
core's ``on_poll``), at most every
``retention_interval_s``; each deletion they make is audited with the actor ``retention``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput, ModelkeepError, NotFound
from modelkeep.policy import Action
from modelkeep.registry.records import VersionRecord
from modelkeep.service._shared import log, model_target
from modelkeep.service.core import Core
from modelkeep.store.captures import CaptureStore
from modelkeep.store.metadata import LifecycleStore, RetentionRule, ShreddedVersion

RETENTION_ACTOR = "retention"
MAX_KEEP_VERSIONS = 10_000
MAX_CAPTURE_DAYS = 3650


@dataclass(frozen=True, slots=True)
class DeletedModel:
    model: str
    versions: list[ShreddedVersion]
    captures: int


def _number(text: str | int) -> int:
    value = str(text)
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise NotFound("no such version")
    return int(value)


def _check_rule(name: str, value: int | None, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise InvalidInput(f"{name} must be a whole number from 1 to {high}, or null for no rule")


class Retention:
    """Crypto-shredding deletion and retention rules."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.settings = core.settings
        self.store = core.store
        self.registry = core.registry
        self.refresh = core.refresh
        self.record = core.record
        self.forget_unlisted_sessions = core.forget_unlisted_sessions
        self._model = core.authorized_model
        self._audited = core.audited
        self._clock = core.clock
        self._lifecycle = LifecycleStore(core.store)
        self._captures = CaptureStore(core.store)
        self._last_retention = -float("inf")
        core.on_poll(self.apply_retention)

    def delete_version(self, principal: Principal, model: str, version: str | int) -> VersionRecord:
        """Crypto-shred one version (admin): Conflict while a label points at it."""
        self.refresh()
        details: dict[str, Any] = {"version": str(version)[:12]}
        with self._audited(principal, "version.delete", model_target(model), details):
            record = self._model(principal, Action.VERSION_DELETE, model)
            number = _number(version)
            details["version"] = number
            shredded = self.store.shred_version(
                record.name, number, actor=principal.key_id, now=self._clock()
            )
            details.update(sha256=shredded.sha256, kek_id=shredded.kek_id)
            details["blob_deleted"] = self._delete_blob(
                shredded.model, shredded.number, shredded.blob_key
            )
        self.refresh()
        self.forget_unlisted_sessions()
        return self.core.snapshot.models[record.name].deleted[number]

    def delete_model(self, principal: Principal, model: str) -> DeletedModel:
        """Delete a model (admin): every version crypto-shredded, labels, captures, policy and
        rules destroyed; the name stays reserved."""
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "model.delete", model_target(model), details):
            record = self._model(principal, Action.MODEL_DELETE, model)
            evalset = self._lifecycle.evalset(record.name)
            shredded, captures = self.store.shred_model(
                record.name, actor=principal.key_id, now=self._clock()
            )
            details.update(
                versions=[{"version": s.number, "sha256": s.sha256} for s in shredded],
                labels=dict(record.labels),
                captures=captures,
            )
            # Every blob is tried, not only up to the first failure.
            results = [self._delete_blob(s.model, s.number, s.blob_key) for s in shredded]
            if evalset is not None:
                # Its wrapped key went with the model's rows: the blob is already unreadable.
                details["evalset_sha256"] = evalset.sha256
                results.append(self._delete_blob(record.name, None, evalset.blob_key))
            details["blobs_deleted"] = all(results)
        self.refresh()
        self.forget_unlisted_sessions()
        return DeletedModel(record.name, shredded, captures)

    def _delete_blob(self, model: str, number: int | None, blob_key: str) -> bool:
        # The key is already gone; a blob left behind is unreadable and the garbage collector
        # (``collect_garbage``) removes it later. ``number`` None: the evaluation set's blob.
        try:
            self.registry.blobs.delete(blob_key)
        except Exception as exc:  # the shred has committed: it must still be audited
            reason = exc.message if isinstance(exc, ModelkeepError) else type(exc).__name__
            log.warning(
                "model %s %s: key destroyed, blob not deleted yet: %s",
                model,
                "evaluation set" if number is None else f"version {number}",
                reason,
            )
            return False
        return True

    # -- retention ------------------------------------------------------------------------

    def get_retention(self, principal: Principal, model: str) -> RetentionRule:
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        found = self.store.retention_rules(record.name)
        return found[0] if found else RetentionRule(record.name, None, None)

    def set_retention(
        self,
        principal: Principal,
        model: str,
        *,
        keep_versions: int | None,
        capture_days: int | None,
    ) -> RetentionRule:
        """Set (or with both None, remove) a model's retention rule (admin); audited."""
        self.refresh()
        details: dict[str, Any] = {"keep_versions": keep_versions, "capture_days": capture_days}
        with self._audited(principal, "retention.set", model_target(model), details):
            record = self._model(principal, Action.RETENTION_SET, model)
            _check_rule("keep_versions", keep_versions, MAX_KEEP_VERSIONS)
            _check_rule("capture_days", capture_days, MAX_CAPTURE_DAYS)
            self.store.set_retention(
                record.name,
                keep_versions=keep_versions,
                capture_days=capture_days,
                actor=principal.key_id,
                now=self._clock(),
            )
        return RetentionRule(record.name, keep_versions, capture_days)

    def apply_retention(self, *, force: bool = False) -> int:
        """Apply every retention rule (poller thread); returns how many things it deleted."""
        interval = self.settings.retention_interval_s
        if not force and time.monotonic() - self._last_retention < interval:
            return 0
        self._last_retention = time.monotonic()
        try:
            self.refresh()
            rules = self.store.retention_rules()
        except ModelkeepError as exc:
            log.warning("retention rules not applied: %s", exc.message)
            return 0
        done = 0
        for rule in rules:
            try:
                done += self._retain_versions(rule) + self._retain_captures(rule)
            except ModelkeepError as exc:
                log.warning("retention of model %s failed: %s", rule.model, exc.message)
        if done:
            self.refresh()
            self.forget_unlisted_sessions()
        return done

    def _retain_versions(self, rule: RetentionRule) -> int:
        model = self.core.snapshot.models.get(rule.model)
        if rule.keep_versions is None or model is None:
            return 0
        labelled = set(model.labels.values())
        # A running canary or shadow needs its version as much as a label does (a pending one
        # is refused by the store).
        labelled.update(c.version for c in (*model.canaries.values(), *model.shadows.values()))
        older = sorted(model.versions)[: -rule.keep_versions]
        done = 0
        for number in older:
            if number in labelled:
                continue  # a label is the operator's word that it is still needed
            target = model_target(rule.model)
            details: dict[str, Any] = {
                "version": number,
                "rule": f"keep_versions={rule.keep_versions}",
            }
            try:
                shredded = self.store.shred_version(
                    rule.model, number, actor=RETENTION_ACTOR, now=self._clock()
                )
            except ModelkeepError as exc:
                # Another worker got there first, or a label moved onto it since.
                log.info(
                    "retention skipped model %s version %s: %s", rule.model, number, exc.message
                )
                continue
            details.update(
                sha256=shredded.sha256,
                blob_deleted=self._delete_blob(shredded.model, shredded.number, shredded.blob_key),
            )
            self.record(RETENTION_ACTOR, "version.delete", target, "success", details)
            done += 1
        return done

    def _retain_captures(self, rule: RetentionRule) -> int:
        if rule.capture_days is None:
            return 0
        cutoff = self._clock() - timedelta(days=rule.capture_days)
        purged = self._captures.purge_before(rule.model, cutoff)
        if purged:
            self.record(
                RETENTION_ACTOR,
                "capture.purge",
                model_target(rule.model),
                "success",
                {"count": purged, "older_than_days": rule.capture_days},
            )
        return purged
