"""The metadata store: models, versions, labels and API keys in SQLite or PostgreSQL.

One implementation over SQLAlchemy serves both databases. Every mutation runs in one transaction
that first bumps the `state.generation` row: that row lock serializes writers (so version numbers
stay unique and gapless) and tells every worker something changed: by the counter, which workers
poll, and on PostgreSQL also by a notification that wakes them at once (``_changes.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Connection, Engine

from modelkeep.auth.apikeys import KeyRecord
from modelkeep.errors import ConfigError, Conflict, NotFound, Unavailable
from modelkeep.registry.records import Canary, ModelRecord, Snapshot, VersionRecord
from modelkeep.runtime.signature import ModelSignature
from modelkeep.store import _push_keys as push_keys
from modelkeep.store import schema as t
from modelkeep.store._changes import NOTIFY, ChangeListener, libpq_url

# Re-exported: the registry and the service name them through the store.
from modelkeep.store._push_keys import PushKey as PushKey
from modelkeep.store._push_keys import PushKeyTaken as PushKeyTaken


class VersionTaken(Exception):
    """The tentative version number was taken by a concurrent push; seal again and retry."""


@dataclass(frozen=True, slots=True)
class VersionDetails:
    """What the push checks established about an artifact."""

    format: str
    signature: ModelSignature
    layout: str = "file"
    file_name: str = "model"
    signer: str | None = None
    bundle: bytes | None = None
    scan_report: str | None = None
    trusted_types: tuple[str, ...] = ()
    lineage: str | None = None  # validated JSON (registry/lineage.py)


@dataclass(frozen=True, slots=True)
class ShreddedVersion:
    """What is left to do, and to audit, after a version's data key was destroyed."""

    model: str
    number: int
    sha256: str
    blob_key: str
    kek_id: str


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """A model's retention rule; ``None`` fields are not limited."""

    model: str
    keep_versions: int | None
    capture_days: int | None


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What a push records once its sealed blob is durably stored."""

    model: str
    number: int
    sha256: str
    size: int
    uploaded_by: str
    created_at: datetime
    blob_key: str
    wrapped_key: bytes
    kek_id: str
    details: VersionDetails
    push_key: PushKey | None = None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # We issue BEGIN ourselves (see _begin) so that writers take the write lock up front.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: an acknowledged write survives power loss, not only a process kill.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    # Crypto-shredding (versions delete) must leave no old wrapped key in freed pages.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("modelkeep_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class MetadataStore:
    """Durable metadata. Reads return immutable records; writes are single transactions."""

    def __init__(self, url: str) -> None:
        try:
            self.engine: Engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise ConfigError("the database URL is not usable") from exc
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        self._writer = self.engine.execution_options(modelkeep_write=True)
        self._notifies = self.engine.dialect.name == "postgresql"
        # The snapshot reads many tables and must see one database state. SQLite's read
        # transaction already does (WAL: fixed at its first read); PostgreSQL's default, READ
        # COMMITTED, gives each statement its own, so a write committed between two of them
        # would show as half a change. REPEATABLE READ fixes it at the first statement; a
        # read-only transaction there never fails to serialize.
        self._reader = (
            self.engine.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            if self.engine.dialect.name == "postgresql"
            else self.engine
        )

    def close(self) -> None:
        self.engine.dispose()

    def listener(self, on_change: Callable[[], None]) -> ChangeListener | None:
        """A listener calling ``on_change`` at every committed change (PostgreSQL), else None."""
        if not self._notifies:
            return None
        return ChangeListener(libpq_url(self.engine.url), on_change)

    # -- schema --------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (Alembic)."""
        cfg = AlembicConfig()
        location = resources.files("modelkeep.store") / "migrations"
        cfg.set_main_option("script_location", str(location))
        with self._connect(self.engine) as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # -- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _connect(self, engine: Engine) -> Iterator[Connection]:
        try:
            with engine.begin() as conn:
                yield conn
        except sa.exc.OperationalError as exc:
            raise Unavailable("the metadata database is unavailable", retry_after=1) from exc

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._connect(self._writer) as conn:
            conn.execute(sa.update(t.state).values(generation=t.state.c.generation + 1))
            if self._notifies:
                conn.execute(NOTIFY)
            yield conn

    # -- reads ---------------------------------------------------------------------------

    def generation(self) -> int:
        with self._connect(self.engine) as conn:
            value = conn.execute(sa.select(t.state.c.generation)).scalar_one()
        return int(value)

    def snapshot(self) -> Snapshot:
        """Load keys, models, versions and labels in one consistent read."""
        with self._connect(self._reader) as conn:
            generation = int(conn.execute(sa.select(t.state.c.generation)).scalar_one())
            model_rows = conn.execute(
                sa.select(t.models).where(t.models.c.deleted_at.is_(None))
            ).all()
            version_rows = conn.execute(
                sa.select(t.versions).order_by(t.versions.c.model_id, t.versions.c.number)
            ).all()
            label_rows = conn.execute(
                sa.select(t.labels.c.model_id, t.labels.c.name, t.versions.c.number).join(
                    t.versions, t.versions.c.id == t.labels.c.version_id
                )
            ).all()
            key_rows = conn.execute(sa.select(t.api_keys)).all()
            publisher_rows = conn.execute(sa.select(t.publishers)).all()
            policy_rows = conn.execute(sa.select(t.model_policies)).all()
            restriction_rows = conn.execute(sa.select(t.key_restrictions)).all()
            drift_rows = conn.execute(sa.select(t.drift_configs)).all()
            canary_rows = conn.execute(
                sa.select(t.canaries).where(t.canaries.c.status == "active")
            ).all()
        names = {row.id: row.name for row in model_rows}
        by_model: dict[int, dict[int, VersionRecord]] = {row.id: {} for row in model_rows}
        deleted: dict[int, dict[int, VersionRecord]] = {row.id: {} for row in model_rows}
        for row in version_rows:
            if row.model_id not in names:
                continue  # a deleted model
            into = by_model if row.deleted_at is None else deleted
            into[row.model_id][row.number] = _version_record(names[row.model_id], row)
        drifts = {row.model_id: row.config for row in drift_rows}
        label_map: dict[int, dict[str, int]] = {row.id: {} for row in model_rows}
        for row in label_rows:
            if row.model_id in label_map:
                label_map[row.model_id][row.name] = row.number
        publishers: dict[int, dict[str, str]] = {row.id: {} for row in model_rows}
        for row in publisher_rows:
            if row.model_id in publishers:
                publishers[row.model_id][row.fingerprint] = row.pem
        policies = {row.model_id: row.policy for row in policy_rows}
        restrictions: dict[int, dict[str, tuple[str, str]]] = {row.id: {} for row in model_rows}
        for row in restriction_rows:
            if row.model_id in restrictions:
                restrictions[row.model_id][row.key_id] = (row.kind, row.reason)
        experiments: dict[tuple[int, str], dict[str, Canary]] = {}
        for row in canary_rows:
            if row.model_id in names:
                found = canary_from_row(names[row.model_id], row)
                experiments.setdefault((row.model_id, row.mode), {})[row.label] = found
        models = {
            row.name: ModelRecord(
                name=row.name,
                description=row.description,
                created_by=row.created_by,
                created_at=row.created_at,
                versions=MappingProxyType(by_model[row.id]),
                labels=MappingProxyType(label_map[row.id]),
                require_signature=bool(row.require_signature),
                publishers=MappingProxyType(publishers[row.id]),
                policy=policies.get(row.id),
                restrictions=MappingProxyType(restrictions[row.id]),
                deleted=MappingProxyType(deleted[row.id]),
                drift=drifts.get(row.id),
                canaries=MappingProxyType(experiments.get((row.id, "canary"), {})),
                shadows=MappingProxyType(experiments.get((row.id, "shadow"), {})),
            )
            for row in model_rows
        }
        keys = {row.id: _key_record(row) for row in key_rows}
        return Snapshot(generation, MappingProxyType(keys), MappingProxyType(models))

    def next_version_number(self, model: str) -> int:
        """The number the next version of ``model`` would get now (tentative; see add_version)."""
        with self._connect(self.engine) as conn:
            current = conn.execute(
                sa.select(sa.func.max(t.versions.c.number))
                .select_from(t.versions.join(t.models))
                .where(t.models.c.name == model)
            ).scalar()
        return int(current or 0) + 1

    def find_push(
        self, model: str, principal: str, key: str, *, now: datetime
    ) -> tuple[int, str] | None:
        """``(version number, request fingerprint)`` a live idempotency key recorded, or None."""
        with self._connect(self.engine) as conn:
            return push_keys.find(conn, model, principal, key, now)

    def purge_push_keys(self, now: datetime) -> int:
        """Forget idempotency keys past their time; returns how many."""
        with self._connect(self._writer) as conn:
            return push_keys.purge(conn, now)

    def blob_keys(self) -> set[str]:
        """Every blob key a row refers to: versions' and evaluation sets'."""
        with self._connect(self.engine) as conn:
            # A shredded version's blob is deleted after its key; if that delete failed, the
            # garbage collector finishes it.
            keys = set(
                conn.execute(
                    sa.select(t.versions.c.blob_key).where(t.versions.c.deleted_at.is_(None))
                ).scalars()
            )
            return keys | set(conn.execute(sa.select(t.eval_sets.c.blob_key)).scalars())

    # -- writes --------------------------------------------------------------------------

    def put_model(
        self,
        name: str,
        *,
        actor: str,
        now: datetime,
        description: str | None = None,
        require_signature: bool | None = None,
    ) -> bool:
        """Create a model, or change the given settings of an existing one; True if created."""
        with self._write() as conn:
            found = conn.execute(
                sa.select(t.models.c.id, t.models.c.deleted_at).where(t.models.c.name == name)
            ).first()
            if found is not None and found.deleted_at is not None:
                raise Conflict(
                    f"model '{name}' was deleted; its name stays reserved (the audit log names"
                    " it): choose another"
                )
            model_id = None if found is None else found.id
            if model_id is None:
                conn.execute(
                    sa.insert(t.models).values(
                        name=name,
                        description=description or "",
                        created_by=actor,
                        created_at=now,
                        require_signature=True if require_signature is None else require_signature,
                    )
                )
                return True
            values: dict[str, Any] = {}
            if description is not None:
                values["description"] = description
            if require_signature is not None:
                values["require_signature"] = require_signature
            if values:
                conn.execute(sa.update(t.models).where(t.models.c.id == model_id).values(**values))
            return False

    def add_publisher(
        self, model: str, fingerprint: str, pem: str, *, actor: str, now: datetime
    ) -> None:
        """Trust a publisher key for ``model`` (idempotent)."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            exists = conn.execute(
                sa.select(t.publishers.c.fingerprint).where(
                    t.publishers.c.model_id == model_id,
                    t.publishers.c.fingerprint == fingerprint,
                )
            ).scalar()
            if exists is None:
                conn.execute(
                    sa.insert(t.publishers).values(
                        model_id=model_id,
                        fingerprint=fingerprint,
                        pem=pem,
                        added_by=actor,
                        added_at=now,
                    )
                )

    def remove_publisher(self, model: str, fingerprint: str) -> None:
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            deleted = conn.execute(
                sa.delete(t.publishers).where(
                    t.publishers.c.model_id == model_id,
                    t.publishers.c.fingerprint == fingerprint,
                )
            ).rowcount
            if not deleted:
                raise NotFound(f"model '{model}' does not trust that publisher key")

    def set_policy(self, model: str, policy_json: str, *, actor: str, now: datetime) -> None:
        """Replace a model's guard policy (validated JSON made by modelkeep.guard.policy)."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            conn.execute(sa.delete(t.model_policies).where(t.model_policies.c.model_id == model_id))
            conn.execute(
                sa.insert(t.model_policies).values(
                    model_id=model_id, policy=policy_json, updated_by=actor, updated_at=now
                )
            )

    def save_privacy_report(
        self, model: str, version: int, report_json: str, *, actor: str, now: datetime
    ) -> None:
        """Keep the leakage report of a model version, replacing an earlier one."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            where = (t.privacy_reports.c.model_id == model_id) & (
                t.privacy_reports.c.version == version
            )
            conn.execute(sa.delete(t.privacy_reports).where(where))
            conn.execute(
                sa.insert(t.privacy_reports).values(
                    model_id=model_id,
                    version=version,
                    report=report_json,
                    created_by=actor,
                    created_at=now,
                )
            )

    def privacy_report(self, model: str, version: int) -> dict[str, Any] | None:
        """The kept leakage report of a model version, with who made it and when, or None."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            row = conn.execute(
                sa.select(t.privacy_reports).where(
                    (t.privacy_reports.c.model_id == model_id)
                    & (t.privacy_reports.c.version == version)
                )
            ).first()
        if row is None:
            return None
        report: dict[str, Any] = json.loads(row.report)
        return {**report, "created_by": row.created_by, "created_at": row.created_at.isoformat()}

    def restrict_key(
        self, model: str, key_id: str, *, kind: str, reason: str, now: datetime
    ) -> None:
        """Block or throttle a key on a model; a block is never weakened to a throttle."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            where = (t.key_restrictions.c.model_id == model_id) & (
                t.key_restrictions.c.key_id == key_id
            )
            current = conn.execute(sa.select(t.key_restrictions.c.kind).where(where)).scalar()
            if current == "block" or current == kind:
                return
            conn.execute(sa.delete(t.key_restrictions).where(where))
            conn.execute(
                sa.insert(t.key_restrictions).values(
                    model_id=model_id, key_id=key_id, kind=kind, reason=reason, created_at=now
                )
            )

    def lift_restriction(self, model: str, key_id: str) -> None:
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            deleted = conn.execute(
                sa.delete(t.key_restrictions).where(
                    (t.key_restrictions.c.model_id == model_id)
                    & (t.key_restrictions.c.key_id == key_id)
                )
            ).rowcount
            if not deleted:
                raise NotFound(f"key is neither blocked nor throttled on model '{model}'")

    def add_version(self, new: NewVersion) -> None:
        """Record a version whose sealed blob is already stored; the model must exist.

        Raises VersionTaken when another push got ``new.number`` first: the blob was sealed with
        that number in its associated data, so the caller must seal again with the next one.
        """
        with self._write() as conn:
            model_id = self._model_id(conn, new.model)
            current = conn.execute(
                sa.select(sa.func.max(t.versions.c.number)).where(t.versions.c.model_id == model_id)
            ).scalar()
            if new.push_key is not None:
                push_keys.claim(conn, model_id, new.push_key, new.created_at)
            if int(current or 0) + 1 != new.number:
                raise VersionTaken
            d = new.details
            inserted = conn.execute(
                sa.insert(t.versions).values(
                    model_id=model_id,
                    number=new.number,
                    sha256=new.sha256,
                    size=new.size,
                    format=d.format,
                    signature=json.dumps(d.signature.to_json()),
                    uploaded_by=new.uploaded_by,
                    created_at=new.created_at,
                    blob_key=new.blob_key,
                    wrapped_key=new.wrapped_key,
                    kek_id=new.kek_id,
                    layout=d.layout,
                    file_name=d.file_name,
                    signer=d.signer,
                    bundle=d.bundle,
                    scan_report=d.scan_report,
                    trusted_types=json.dumps(list(d.trusted_types)),
                    lineage=d.lineage,
                )
            )
            if new.push_key is not None:
                assert inserted.inserted_primary_key is not None
                version_id = int(inserted.inserted_primary_key.id)
                push_keys.record(conn, model_id, version_id, new.push_key, new.created_at)

    def set_label(
        self,
        model: str,
        label: str,
        number: int,
        *,
        actor: str,
        now: datetime,
        kind: str = "set",
        change_id: str | None = None,
    ) -> None:
        """Point ``label`` at version ``number``; the move is kept in the label's history.

        Conflict for a protected label: those move only through ``LifecycleStore`` (an approved
        change request), checked in this transaction so a protection set meanwhile holds.
        """
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            _refuse_protected(conn, model_id, label)
            put_label(conn, model_id, model, label, number, actor, now, kind, change_id)

    def delete_label(
        self, model: str, label: str, *, actor: str = "", now: datetime | None = None
    ) -> None:
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            where = (t.labels.c.model_id == model_id) & (t.labels.c.name == label)
            _refuse_protected(conn, model_id, label)
            previous = _label_version(conn, model_id, label)
            deleted = conn.execute(sa.delete(t.labels).where(where)).rowcount
            if not deleted:
                raise NotFound(f"model '{model}' has no label '{label}'")
            if now is not None:
                _add_history(conn, model_id, label, None, previous, "delete", actor, now, None)
                _end_experiments(conn, model_id, label, None, actor, now)

    def create_key(self, record: KeyRecord, *, created_by: str) -> None:
        with self._write() as conn:
            try:
                conn.execute(
                    sa.insert(t.api_keys).values(
                        id=record.key_id,
                        secret_hash=record.secret_hash,
                        role=record.role,
                        models=None if record.models is None else json.dumps(sorted(record.models)),
                        description=record.description,
                        created_by=created_by,
                        created_at=record.created_at,
                        expires_at=record.expires_at,
                        revoked_at=record.revoked_at,
                    )
                )
            except sa.exc.IntegrityError as exc:
                raise Conflict("an API key with this id already exists") from exc

    def revoke_key(self, key_id: str, *, now: datetime) -> None:
        """Revoke a key (idempotent: a second revocation keeps the first time)."""
        with self._write() as conn:
            found = conn.execute(
                sa.select(t.api_keys.c.revoked_at).where(t.api_keys.c.id == key_id)
            ).first()
            if found is None:
                raise NotFound("no such API key")
            if found.revoked_at is None:
                conn.execute(
                    sa.update(t.api_keys).where(t.api_keys.c.id == key_id).values(revoked_at=now)
                )

    # -- lifecycle: crypto-shredding, retention, drift ----------------------------------------

    def shred_version(
        self, model: str, number: int, *, actor: str, now: datetime
    ) -> ShreddedVersion:
        """Destroy a version's wrapped data key and mark it deleted, in one transaction.

        NotFound for no such version, Conflict if it is already deleted or a label points at
        it. The caller deletes the blob afterwards: once this commits, no copy of it opens.
        """
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            shredded = _shred(conn, model_id, model, number, actor=actor, now=now)
        self._checkpoint_wal()
        return shredded

    def shred_model(
        self, model: str, *, actor: str, now: datetime
    ) -> tuple[list[ShreddedVersion], int]:
        """Delete a model: shred every version, drop its labels, captures (their sealed records
        and wrapped keys), policy, publishers and rules, and mark it deleted. Returns the
        shredded versions and how many captures were destroyed."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            conn.execute(sa.delete(t.labels).where(t.labels.c.model_id == model_id))
            numbers = conn.execute(
                sa.select(t.versions.c.number).where(
                    t.versions.c.model_id == model_id, t.versions.c.deleted_at.is_(None)
                )
            ).scalars()
            shredded = [
                _shred(conn, model_id, model, int(n), actor=actor, now=now) for n in list(numbers)
            ]
            captures = conn.execute(
                sa.delete(t.payload_captures).where(t.payload_captures.c.model_id == model_id)
            ).rowcount
            # Lifecycle rows too: the evaluation set's wrapped key goes with its row (its blob is
            # then unreadable, and deleted by the caller or the garbage collector), and so do
            # the change requests with their approvals, protections, history and metrics.
            changes = sa.select(t.change_requests.c.id).where(
                t.change_requests.c.model_id == model_id
            )
            conn.execute(
                sa.delete(t.change_approvals).where(t.change_approvals.c.change_id.in_(changes))
            )
            for table in (
                t.canaries,
                t.model_policies,
                t.key_restrictions,
                t.publishers,
                t.retention_rules,
                t.drift_configs,
                t.privacy_reports,
                t.change_requests,
                t.label_history,
                t.protected_labels,
                t.evaluations,
                t.eval_sets,
            ):
                conn.execute(sa.delete(table).where(table.c.model_id == model_id))
            conn.execute(
                sa.update(t.models).where(t.models.c.id == model_id).values(deleted_at=now)
            )
        self._checkpoint_wal()
        return shredded, int(captures or 0)

    def _checkpoint_wal(self) -> None:
        # SQLite: the write-ahead log still holds pages as they were before the shred (and
        # the insert that wrote the key); fold it into the database, where secure_delete has
        # zeroed the freed space, and truncate it.
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def set_retention(
        self,
        model: str,
        *,
        keep_versions: int | None,
        capture_days: int | None,
        actor: str,
        now: datetime,
    ) -> None:
        """Replace a model's retention rule; both None removes it."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            table = t.retention_rules
            conn.execute(sa.delete(table).where(table.c.model_id == model_id))
            if keep_versions is not None or capture_days is not None:
                conn.execute(
                    sa.insert(table).values(
                        model_id=model_id,
                        keep_versions=keep_versions,
                        capture_days=capture_days,
                        updated_by=actor,
                        updated_at=now,
                    )
                )

    def retention_rules(self, model: str | None = None) -> list[RetentionRule]:
        """Every live model's retention rule (or ``model``'s only)."""
        r = t.retention_rules.c
        query = (
            sa.select(t.models.c.name, r.keep_versions, r.capture_days)
            .select_from(t.retention_rules.join(t.models))
            .where(t.models.c.deleted_at.is_(None))
            .order_by(t.models.c.name)
        )
        if model is not None:
            query = query.where(t.models.c.name == model)
        with self._connect(self.engine) as conn:
            rows = conn.execute(query).all()
        return [RetentionRule(row.name, row.keep_versions, row.capture_days) for row in rows]

    def set_drift(self, model: str, config_json: str, *, actor: str, now: datetime) -> None:
        """Replace a model's drift monitoring config (JSON made by modelkeep.guard.drift)."""
        with self._write() as conn:
            model_id = self._model_id(conn, model)
            table = t.drift_configs
            conn.execute(sa.delete(table).where(table.c.model_id == model_id))
            conn.execute(
                sa.insert(table).values(
                    model_id=model_id, config=config_json, updated_by=actor, updated_at=now
                )
            )

    @staticmethod
    def _model_id(conn: Connection, model: str) -> int:
        model_id = conn.execute(
            sa.select(t.models.c.id).where(
                t.models.c.name == model, t.models.c.deleted_at.is_(None)
            )
        ).scalar()
        if model_id is None:
            raise NotFound(f"no model named '{model}'")
        return int(model_id)


def _shred(
    conn: Connection, model_id: int, model: str, number: int, *, actor: str, now: datetime
) -> ShreddedVersion:
    v = t.versions.c
    row = conn.execute(
        sa.select(v.id, v.sha256, v.blob_key, v.kek_id, v.deleted_at).where(
            v.model_id == model_id, v.number == number
        )
    ).first()
    if row is None:
        raise NotFound(f"model '{model}' has no version {number}")
    if row.deleted_at is not None:
        raise Conflict(f"model '{model}' version {number} is already deleted")
    labelled = conn.execute(
        sa.select(t.labels.c.name).where(t.labels.c.version_id == row.id).order_by(t.labels.c.name)
    ).scalars()
    names = list(labelled)
    if names:
        raise Conflict(
            f"model '{model}' version {number} is under label(s) {', '.join(names)}: move or"
            " remove them first"
        )
    c = t.canaries.c
    running = conn.execute(
        sa.select(c.label)
        .where(c.model_id == model_id, c.version == number, live_canary())
        .order_by(c.label)
    ).scalars()
    experiments = sorted(set(running))
    if experiments:
        raise Conflict(
            f"model '{model}' version {number} is the canary or shadow of label(s)"
            f" {', '.join(experiments)}: abort them first (modelkeep canary abort)"
        )
    cr = t.change_requests.c
    pending = conn.execute(
        sa.select(cr.id)
        .where(
            cr.model_id == model_id,
            cr.version == number,
            cr.status == "pending",
            cr.kind != "protect",
            cr.expires_at > now,
        )
        .order_by(cr.id)
    ).scalars()
    waiting = list(pending)
    if waiting:
        raise Conflict(
            f"model '{model}' version {number} is the target of pending change request(s)"
            f" {', '.join(waiting)}: reject them first"
        )
    # A retried push must not answer with a version that is gone.
    conn.execute(sa.delete(t.push_keys).where(t.push_keys.c.version_id == row.id))
    # The data key goes first: from this commit on, no copy of the blob can be opened.
    conn.execute(
        sa.update(t.versions)
        .where(v.id == row.id)
        .values(wrapped_key=b"", deleted_at=now, deleted_by=actor)
    )
    return ShreddedVersion(model, number, row.sha256, row.blob_key, row.kek_id)


def _refuse_protected(conn: Connection, model_id: int, label: str) -> None:
    c = t.protected_labels.c
    found = conn.execute(
        sa.select(c.approvals).where(c.model_id == model_id, c.label == label)
    ).scalar()
    if found is not None:
        raise Conflict(f"label '{label}' is protected: it moves only through an approved change")


def _label_version(conn: Connection, model_id: int, label: str) -> int | None:
    """The version number ``label`` points at now, or None."""
    found = conn.execute(
        sa.select(t.versions.c.number)
        .select_from(t.labels.join(t.versions, t.versions.c.id == t.labels.c.version_id))
        .where(t.labels.c.model_id == model_id, t.labels.c.name == label)
    ).scalar()
    return None if found is None else int(found)


def _add_history(
    conn: Connection,
    model_id: int,
    label: str,
    version: int | None,
    previous: int | None,
    kind: str,
    actor: str,
    now: datetime,
    change_id: str | None,
) -> None:
    conn.execute(
        sa.insert(t.label_history).values(
            model_id=model_id,
            label=label,
            version=version,
            previous=previous,
            kind=kind,
            actor=actor,
            change_id=change_id,
            time=now,
        )
    )


def put_label(
    conn: Connection,
    model_id: int,
    model: str,
    label: str,
    number: int,
    actor: str,
    now: datetime,
    kind: str,
    change_id: str | None,
) -> int | None:
    """Point ``label`` at ``number`` inside a write transaction, recording the move in the
    label's history; returns the version it pointed at before (None: new label)."""
    version_id = conn.execute(
        sa.select(t.versions.c.id).where(
            t.versions.c.model_id == model_id,
            t.versions.c.number == number,
            t.versions.c.deleted_at.is_(None),
        )
    ).scalar()
    if version_id is None:
        raise NotFound(f"model '{model}' has no version {number}")
    previous = _label_version(conn, model_id, label)
    exists = conn.execute(
        sa.select(t.labels.c.name).where(t.labels.c.model_id == model_id, t.labels.c.name == label)
    ).scalar()
    values = {"version_id": version_id, "updated_by": actor, "updated_at": now}
    if exists is None:
        conn.execute(sa.insert(t.labels).values(model_id=model_id, name=label, **values))
    else:
        conn.execute(
            sa.update(t.labels)
            .where(t.labels.c.model_id == model_id, t.labels.c.name == label)
            .values(**values)
        )
    _add_history(conn, model_id, label, number, previous, kind, actor, now, change_id)
    if previous != number:
        _end_experiments(conn, model_id, label, number, actor, now)
    return previous


def live_canary() -> Any:
    """Where a canaries row is running, or waiting for a change request still pending (one
    whose request was rejected or expired is not live any more)."""
    c = t.canaries.c
    cr = t.change_requests.c
    waiting = sa.select(cr.id).where(cr.status == "pending")
    return (c.status == "active") | ((c.status == "pending") & c.change_id.in_(waiting))


def _end_experiments(
    conn: Connection, model_id: int, label: str, number: int | None, actor: str, now: datetime
) -> None:
    """A label moved to ``number`` (None: deleted): its canary ends (``promoted`` when it moved
    onto the canary's version), and so does a shadow of the version now served."""
    c = t.canaries.c
    live = (c.model_id == model_id) & (c.label == label) & c.status.in_(("active", "pending"))
    ended = {"ended_by": actor, "ended_at": now}
    if number is None:
        conn.execute(sa.update(t.canaries).where(live).values(status="ended", **ended))
        return
    conn.execute(
        sa.update(t.canaries)
        .where(live, (c.mode == "canary") | (c.version == number))
        .values(
            status=sa.case((c.version == number, "promoted"), else_="ended"),
            reason=sa.case(
                (c.version == number, "the label moved onto its version"),
                else_="the label moved",
            ),
            **ended,
        )
    )


def canary_from_row(model: str, row: Any) -> Canary:
    """A ``canaries`` row of ``model`` as a Canary."""
    return Canary(
        id=row.id,
        model=model,
        label=row.label,
        mode=row.mode,
        version=row.version,
        share=float(row.share),
        thresholds=row.thresholds,
        status=row.status,
        change_id=row.change_id,
        started_by=row.started_by,
        started_at=row.started_at,
        ended_by=row.ended_by,
        ended_at=row.ended_at,
        reason=row.reason,
    )


def _version_record(model: str, row: Any) -> VersionRecord:
    return VersionRecord(
        model=model,
        number=row.number,
        sha256=row.sha256,
        size=row.size,
        format=row.format,
        signature=ModelSignature.from_json(json.loads(row.signature)),
        uploaded_by=row.uploaded_by,
        created_at=row.created_at,
        blob_key=row.blob_key,
        wrapped_key=bytes(row.wrapped_key),
        kek_id=row.kek_id,
        layout=row.layout or "file",
        file_name=row.file_name or "model",
        signer=row.signer,
        bundle=None if row.bundle is None else bytes(row.bundle),
        scan_report=row.scan_report,
        trusted_types=tuple(json.loads(row.trusted_types)) if row.trusted_types else (),
        lineage=row.lineage,
        deleted_at=row.deleted_at,
        deleted_by=row.deleted_by,
    )


def _key_record(row: Any) -> KeyRecord:
    models = None if row.models is None else frozenset(json.loads(row.models))
    return KeyRecord(
        key_id=row.id,
        secret_hash=row.secret_hash,
        role=row.role,
        models=models,
        description=row.description,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


# -- lifecycle (docs/lifecycle.md) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredEvalSet:
    """A model's sealed evaluation set and its gates (JSON list of gate texts)."""

    model: str
    sha256: str
    size: int
    summary: str
    gates: str
    blob_key: str
    wrapped_key: bytes
    kek_id: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The metrics one version earned on one evaluation set (by digest)."""

    version: int
    evalset_sha256: str
    status: str  # pending, done, error
    metrics: dict[str, float] | None
    error: str | None
    evaluated_at: datetime


@dataclass(frozen=True, slots=True)
class LabelMove:
    """One entry of a label's history; ``version`` None means the label was deleted."""

    label: str
    version: int | None
    previous: int | None
    kind: str
    actor: str
    change_id: str | None
    time: datetime


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    """A move of a protected label (or a weakening of its protection) waiting for approvals."""

    id: str
    model: str
    label: str
    kind: str  # set, rollback, protect
    version: int | None
    previous: int | None
    new_approvals: int | None
    approvals_needed: int
    requester: str
    pusher: str | None
    status: str  # pending, applied, rejected, expired, failed
    reason: str | None
    created_at: datetime
    expires_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    approvals: tuple[str, ...] = ()


class StaleChange(Exception):
    """The label no longer points where the change request found it."""


class LifecycleStore:
    """Evaluation sets, metrics, protected labels, label history and change requests.

    Only applying a change moves a label, and only that bumps the change counter: the rest is
    read by management calls alone, never by the workers' snapshots.
    """

    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def _read(self) -> Any:
        return self._store._connect(self._store.engine)

    def _quiet_write(self) -> Any:
        return self._store._connect(self._store._writer)

    # -- evaluation sets and metrics ---------------------------------------------------------

    def put_evalset(self, new: StoredEvalSet) -> str | None:
        """Replace ``new.model``'s evaluation set; returns the blob key of the one replaced."""
        with self._quiet_write() as conn:
            model_id = MetadataStore._model_id(conn, new.model)
            where = t.eval_sets.c.model_id == model_id
            old = conn.execute(sa.select(t.eval_sets.c.blob_key).where(where)).scalar()
            conn.execute(sa.delete(t.eval_sets).where(where))
            conn.execute(
                sa.insert(t.eval_sets).values(
                    model_id=model_id,
                    sha256=new.sha256,
                    size=new.size,
                    summary=new.summary,
                    gates=new.gates,
                    blob_key=new.blob_key,
                    wrapped_key=new.wrapped_key,
                    kek_id=new.kek_id,
                    created_by=new.created_by,
                    created_at=new.created_at,
                )
            )
        return None if old is None else str(old)

    def evalset(self, model: str) -> StoredEvalSet | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.eval_sets)
                .select_from(t.eval_sets.join(t.models))
                .where(t.models.c.name == model)
            ).first()
        if row is None:
            return None
        return StoredEvalSet(
            model=model,
            sha256=row.sha256,
            size=row.size,
            summary=row.summary,
            gates=row.gates,
            blob_key=row.blob_key,
            wrapped_key=bytes(row.wrapped_key),
            kek_id=row.kek_id,
            created_by=row.created_by,
            created_at=row.created_at,
        )

    def evalset_blob_keys(self) -> set[str]:
        """Blob keys evaluation sets hold (so garbage collection leaves them)."""
        with self._read() as conn:
            return set(conn.execute(sa.select(t.eval_sets.c.blob_key)).scalars())

    def evalset_keys(self) -> list[tuple[str, str, bytes, str]]:
        """``(model, sha256, wrapped key, kek id)`` of every evaluation set (key rotation)."""
        e = t.eval_sets.c
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.models.c.name, e.sha256, e.wrapped_key, e.kek_id).select_from(
                    t.eval_sets.join(t.models)
                )
            ).all()
        return [(row[0], row[1], bytes(row[2]), row[3]) for row in rows]

    def rewrap_evalset(self, model: str, old: bytes, new: bytes, kek_id: str) -> bool:
        """Store a re-wrapped data key, only if the row still holds ``old``."""
        e = t.eval_sets.c
        with self._quiet_write() as conn:
            model_id = MetadataStore._model_id(conn, model)
            changed = conn.execute(
                sa.update(t.eval_sets)
                .where(e.model_id == model_id, e.wrapped_key == old)
                .values(wrapped_key=new, kek_id=kek_id)
            ).rowcount
        return bool(changed)

    def save_evaluation(
        self,
        model: str,
        version: int,
        evalset_sha256: str,
        *,
        status: str,
        metrics: dict[str, float] | None,
        error: str | None,
        now: datetime,
    ) -> None:
        with self._quiet_write() as conn:
            model_id = MetadataStore._model_id(conn, model)
            c = t.evaluations.c
            conn.execute(
                sa.delete(t.evaluations).where(
                    (c.model_id == model_id)
                    & (c.version == version)
                    & (c.evalset_sha256 == evalset_sha256)
                )
            )
            conn.execute(
                sa.insert(t.evaluations).values(
                    model_id=model_id,
                    version=version,
                    evalset_sha256=evalset_sha256,
                    status=status,
                    metrics=None if metrics is None else json.dumps(metrics, sort_keys=True),
                    error=error,
                    evaluated_at=now,
                )
            )

    def evaluations(self, model: str, evalset_sha256: str) -> dict[int, Evaluation]:
        """Every version's evaluation on the set with this digest, by version number."""
        c = t.evaluations.c
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.evaluations)
                .select_from(t.evaluations.join(t.models))
                .where(t.models.c.name == model, c.evalset_sha256 == evalset_sha256)
            ).all()
        return {
            row.version: Evaluation(
                version=row.version,
                evalset_sha256=row.evalset_sha256,
                status=row.status,
                metrics=None if row.metrics is None else json.loads(row.metrics),
                error=row.error,
                evaluated_at=row.evaluated_at,
            )
            for row in rows
        }

    # -- protected labels and history --------------------------------------------------------

    def protections(self, model: str) -> dict[str, int]:
        """Protected labels of ``model`` and the approvals each needs."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.protected_labels.c.label, t.protected_labels.c.approvals)
                .select_from(t.protected_labels.join(t.models))
                .where(t.models.c.name == model)
            ).all()
        return {row.label: int(row.approvals) for row in rows}

    def protect(self, model: str, label: str, approvals: int, *, actor: str, now: datetime) -> None:
        """Set the approvals ``label`` needs (0 removes the protection)."""
        with self._quiet_write() as conn:
            _set_protection(
                conn, MetadataStore._model_id(conn, model), label, approvals, actor, now
            )

    def history(
        self, model: str, label: str | None = None, *, limit: int = 1000
    ) -> list[LabelMove]:
        """Moves of ``model``'s labels (or of one label), oldest first, the last ``limit``."""
        c = t.label_history.c
        query = (
            sa.select(t.label_history)
            .select_from(t.label_history.join(t.models))
            .where(t.models.c.name == model)
            .order_by(c.id.desc())
            .limit(limit)
        )
        if label is not None:
            query = query.where(c.label == label)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            LabelMove(
                label=row.label,
                version=row.version,
                previous=row.previous,
                kind=row.kind,
                actor=row.actor,
                change_id=row.change_id,
                time=row.time,
            )
            for row in reversed(rows)
        ]

    def key_creators(self) -> dict[str, str]:
        """Each API key's id and the id of the key (or ``init``) that created it."""
        with self._read() as conn:
            rows = conn.execute(sa.select(t.api_keys.c.id, t.api_keys.c.created_by)).all()
        return {row.id: row.created_by for row in rows}

    # -- change requests ---------------------------------------------------------------------

    def add_change(self, change: ChangeRequest) -> None:
        with self._quiet_write() as conn:
            conn.execute(
                sa.insert(t.change_requests).values(
                    id=change.id,
                    model_id=MetadataStore._model_id(conn, change.model),
                    label=change.label,
                    kind=change.kind,
                    version=change.version,
                    previous=change.previous,
                    new_approvals=change.new_approvals,
                    approvals_needed=change.approvals_needed,
                    requester=change.requester,
                    pusher=change.pusher,
                    status=change.status,
                    reason=change.reason,
                    created_at=change.created_at,
                    expires_at=change.expires_at,
                )
            )

    def change(self, change_id: str) -> ChangeRequest:
        with self._read() as conn:
            found = self._changes(conn, t.change_requests.c.id == change_id)
        if not found:
            raise NotFound("no such change request")
        return found[0]

    def changes(self, *, status: str | None = None, limit: int = 500) -> list[ChangeRequest]:
        """Change requests, newest first (all, or those with ``status``)."""
        where = sa.true() if status is None else t.change_requests.c.status == status
        with self._read() as conn:
            return self._changes(conn, where, limit=limit)

    @staticmethod
    def _changes(conn: Connection, where: Any, *, limit: int = 500) -> list[ChangeRequest]:
        c = t.change_requests.c
        rows = conn.execute(
            sa.select(t.change_requests, t.models.c.name.label("model_name"))
            .select_from(t.change_requests.join(t.models))
            .where(where)
            .order_by(c.created_at.desc(), c.id)
            .limit(limit)
        ).all()
        ids = [row.id for row in rows]
        approvals: dict[str, list[str]] = {}
        if ids:
            for change_id, key_id in conn.execute(
                sa.select(t.change_approvals.c.change_id, t.change_approvals.c.key_id)
                .where(t.change_approvals.c.change_id.in_(ids))
                .order_by(t.change_approvals.c.time)
            ):
                approvals.setdefault(change_id, []).append(key_id)
        return [
            ChangeRequest(
                id=row.id,
                model=row.model_name,
                label=row.label,
                kind=row.kind,
                version=row.version,
                previous=row.previous,
                new_approvals=row.new_approvals,
                approvals_needed=row.approvals_needed,
                requester=row.requester,
                pusher=row.pusher,
                status=row.status,
                reason=row.reason,
                created_at=row.created_at,
                expires_at=row.expires_at,
                decided_by=row.decided_by,
                decided_at=row.decided_at,
                approvals=tuple(approvals.get(row.id, ())),
            )
            for row in rows
        ]

    def approve(self, change_id: str, key_id: str, *, now: datetime) -> int:
        """Record ``key_id``'s approval of a pending request; returns the approvals it has.

        Conflict if this key already approved it or it is no longer pending.
        """
        with self._quiet_write() as conn:
            status = conn.execute(
                sa.select(t.change_requests.c.status).where(t.change_requests.c.id == change_id)
            ).scalar()
            if status != "pending":
                raise Conflict(f"the change request is {status or 'gone'}, not pending")
            c = t.change_approvals.c
            exists = conn.execute(
                sa.select(c.key_id).where(c.change_id == change_id, c.key_id == key_id)
            ).scalar()
            if exists is not None:
                raise Conflict("this key has already approved the change request")
            conn.execute(
                sa.insert(t.change_approvals).values(change_id=change_id, key_id=key_id, time=now)
            )
            count = conn.execute(
                sa.select(sa.func.count())
                .select_from(t.change_approvals)
                .where(c.change_id == change_id)
            ).scalar_one()
        return int(count)

    def decide(
        self, change_id: str, status: str, *, by: str, now: datetime, reason: str | None = None
    ) -> bool:
        """Close a pending request as ``status``; False if it was not pending any more."""
        c = t.change_requests.c
        values: dict[str, Any] = {"status": status, "decided_by": by, "decided_at": now}
        if reason is not None:
            values["reason"] = reason
        with self._quiet_write() as conn:
            done = conn.execute(
                sa.update(t.change_requests)
                .where(c.id == change_id, c.status == "pending")
                .values(**values)
            ).rowcount
        return bool(done)

    def apply_change(self, change: ChangeRequest, *, by: str, now: datetime) -> None:
        """Carry out an approved request and mark it applied, in one transaction.

        Raises StaleChange when the label has moved since the request was made, and Conflict
        when the request is no longer pending (another worker applied or closed it).
        """
        c = t.change_requests.c
        with self._store._write() as conn:
            status = conn.execute(sa.select(c.status).where(c.id == change.id)).scalar()
            if status != "pending":
                raise Conflict(f"the change request is {status or 'gone'}, not pending")
            model_id = MetadataStore._model_id(conn, change.model)
            if change.kind == "protect":
                assert change.new_approvals is not None
                _set_protection(conn, model_id, change.label, change.new_approvals, by, now)
            elif change.kind == "canary":
                # Start the canary the request holds, if the label is still where it was.
                if _label_version(conn, model_id, change.label) != change.previous:
                    raise StaleChange
                cc = t.canaries.c
                started = conn.execute(
                    sa.update(t.canaries)
                    .where(cc.change_id == change.id, cc.status == "pending")
                    .values(status="active", started_at=now)
                ).rowcount
                if not started:
                    raise StaleChange
            else:
                if _label_version(conn, model_id, change.label) != change.previous:
                    raise StaleChange
                assert change.version is not None
                put_label(
                    conn,
                    model_id,
                    change.model,
                    change.label,
                    change.version,
                    by,
                    now,
                    change.kind,
                    change.id,
                )
            conn.execute(
                sa.update(t.change_requests)
                .where(c.id == change.id)
                .values(status="applied", decided_by=by, decided_at=now)
            )

    def move_now(
        self, model: str, label: str, number: int, *, actor: str, now: datetime, kind: str
    ) -> int | None:
        """Move ``label`` at once (an admin's declared emergency); returns where it was."""
        with self._store._write() as conn:
            model_id = MetadataStore._model_id(conn, model)
            return put_label(conn, model_id, model, label, number, actor, now, kind, None)


def _set_protection(
    conn: Connection, model_id: int, label: str, approvals: int, actor: str, now: datetime
) -> None:
    where = (t.protected_labels.c.model_id == model_id) & (t.protected_labels.c.label == label)
    conn.execute(sa.delete(t.protected_labels).where(where))
    if approvals > 0:
        conn.execute(
            sa.insert(t.protected_labels).values(
                model_id=model_id,
                label=label,
                approvals=approvals,
                updated_by=actor,
                updated_at=now,
            )
        )
