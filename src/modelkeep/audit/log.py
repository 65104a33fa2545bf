"""The append-only, hash-chained audit log in the metadata database (SQLite or PostgreSQL).

Every entry gets the next ``seq`` (1, 2, 3... without gaps) and a hash over its fields and the
previous entry's hash (see ``_chain``). Appends from any number of processes keep one chain: each
runs in one transaction that first takes the log's write lock, then reads the head and inserts
after it, and returns only once committed.

- SQLite: the transaction starts with ``BEGIN IMMEDIATE`` (the metadata store's engine does this
  for connections with the ``modelkeep_write`` option), which takes the database write lock up
  front; the store also sets ``synchronous=FULL``, so a returned entry survives power loss.
- PostgreSQL: a transaction-scoped advisory lock keyed on the ``audit_log`` table's oid. It
  serializes audit writers only, without contending with metadata writes on the ``state`` row,
  and it is per schema. Under READ COMMITTED (the default) the head read after the lock sees every
  entry committed before it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from modelkeep.audit._chain import (
    GENESIS_HASH,
    ChainBroken,
    ChainWalker,
    canonical_details,
    entry_hash,
    iso_time,
    read_in_pages,
)
from modelkeep.audit.checkpoint import Checkpoint, CheckpointSigner, verify_checkpoint
from modelkeep.errors import ConfigError, IntegrityError, InternalError, InvalidInput, Unavailable
from modelkeep.store import schema as t

__all__ = ["OUTCOMES", "AuditEntry", "AuditEvent", "AuditLog", "utcnow"]

#: The only outcomes an entry may record.
OUTCOMES = frozenset({"success", "denied", "failure"})
_MAX_ACTION = 64
_PAGE_SIZE = 1000
# High half of the PostgreSQL advisory lock key ("mkau"); the low half is the table's oid.
_PG_LOCK_CLASS = 0x6D6B6175
_PG_LOCK = sa.text(
    "SELECT pg_advisory_xact_lock(:lock_class, "
    "CAST(CAST(CAST('audit_log' AS regclass) AS oid) AS integer))"
).bindparams(lock_class=_PG_LOCK_CLASS)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC: the default clock of the audit log."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class AuditEvent:
    """Something to record: who (``actor``) did what (``action``) to what (``target``), and how it
    ended (``outcome``: success, denied or failure). ``details`` must be JSON-serializable; it is
    stored as canonical JSON and must never hold secrets."""

    actor: str
    action: str
    target: str
    outcome: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEntry:
    """A recorded event: its place in the chain (``seq``), when, and the hashes linking it."""

    seq: int
    time: datetime
    actor: str
    action: str
    target: str
    outcome: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """A JSON object with every field; ``time`` in the exact form the hash covers."""
        return {
            "seq": self.seq,
            "time": iso_time(self.time),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class AuditLog:
    """Appends to and reads the audit log through ``engine``.

    ``engine`` must be the metadata store's engine (``MetadataStore(url).engine``): on SQLite it
    is the store's connection setup that begins writers with ``BEGIN IMMEDIATE``. ``signer``
    signs checkpoints; ``clock`` stamps entries (pass one in tests).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        signer: CheckpointSigner | None = None,
        clock: Callable[[], datetime] = utcnow,
        page_size: int = _PAGE_SIZE,
    ) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ConfigError("the audit log needs SQLite or PostgreSQL")
        if page_size < 1:
            raise ValueError("page_size must be positive")
        self._engine = engine
        self._writer = engine.execution_options(modelkeep_write=True)
        self._signer = signer
        self._clock = clock
        self._page_size = page_size

    # -- writes ---------------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditEntry:
        """Record ``event`` as the new head of the chain; it is committed (durable) on return.

        InvalidInput if the event cannot be recorded faithfully; Unavailable if the database is.
        """
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        """Record ``events`` in order, in one transaction: all are durable on return, or none."""
        prepared = [(event, _checked_details(event)) for event in events]
        if not prepared:
            return []
        entries: list[AuditEntry] = []
        rows: list[dict[str, Any]] = []
        with self._write() as conn:
            seq, prev_hash = _head(conn)
            now = self._now()
            for event, details in prepared:
                seq += 1
                row: dict[str, Any] = {
                    "seq": seq,
                    "time": now,
                    "actor": event.actor,
                    "action": event.action,
                    "target": event.target,
                    "outcome": event.outcome,
                    "details": details,
                    "prev_hash": prev_hash,
                }
                prev_hash = row["hash"] = entry_hash(**row)
                rows.append(row)
                entries.append(AuditEntry(**{**row, "details": json.loads(details)}))
            try:
                conn.execute(sa.insert(t.audit_log), rows)
            except sa.exc.IntegrityError as exc:
                # Only possible if writers are not serialized (an engine not made by the store).
                raise InternalError("two audit appends took one sequence number") from exc
        return entries

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current head and store the checkpoint; None while the log is empty.

        Before signing, the entries since the newest checkpoint are verified, so a broken chain is
        never signed (IntegrityError, naming the first bad entry). Returns the existing checkpoint
        if the head is already covered. ConfigError without a signer.
        """
        signer = self._signer
        if signer is None:
            raise ConfigError("no audit checkpoint signing key is configured")
        with self._write() as conn:
            head_seq, head_hash = _head(conn)
            newest = conn.execute(
                sa.select(t.audit_checkpoints).order_by(t.audit_checkpoints.c.seq.desc()).limit(1)
            ).first()
            walker = _anchor(conn, newest, signer, head_seq)
            if head_seq == 0:
                return None
            try:
                for row in read_in_pages(
                    lambda: nullcontext(conn),
                    t.audit_log,
                    after=walker.next_seq - 1,
                    upto=head_seq,
                    page_size=self._page_size,
                ):
                    walker.check(row)
            except ChainBroken as broken:
                raise IntegrityError(
                    f"the audit log fails verification at entry {broken.seq}; refusing to sign it"
                ) from None
            if newest is not None and int(newest.seq) == head_seq:
                return checkpoint_from_row(newest)
            checkpoint = signer.sign(seq=head_seq, head_hash=head_hash, time=self._now())
            conn.execute(
                sa.insert(t.audit_checkpoints).values(
                    seq=checkpoint.seq,
                    head_hash=checkpoint.head_hash,
                    time=checkpoint.time,
                    signature=checkpoint.signature,
                    key_id=checkpoint.key_id,
                )
            )
        return checkpoint

    # -- reads ----------------------------------------------------------------------------------

    def entries(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> Iterator[AuditEntry]:
        """Entries matching every given filter, oldest first (or newest first), streamed.

        ``since`` is inclusive and ``until`` exclusive; ``model`` matches the targets
        ``model:<name>`` and ``model:<name>/...``. Entries are not verified here: use
        ``verify_chain`` for that.
        """
        where: list[sa.ColumnElement[bool]] = []
        log = t.audit_log.c
        if since is not None:
            where.append(log.time >= _aware(since, "since"))
        if until is not None:
            where.append(log.time < _aware(until, "until"))
        if actor is not None:
            where.append(log.actor == actor)
        if action is not None:
            where.append(log.action == action)
        if model is not None:
            where.append(
                sa.or_(
                    log.target == f"model:{model}",
                    log.target.startswith(f"model:{model}/", autoescape=True),
                )
            )
        if limit is not None and limit < 0:
            raise InvalidInput("limit must not be negative")
        return self._stream(where, limit, newest_first)

    def _stream(
        self, where: list[sa.ColumnElement[bool]], limit: int | None, newest_first: bool
    ) -> Iterator[AuditEntry]:
        if limit == 0:
            return
        page_size = self._page_size if limit is None else min(limit, self._page_size)
        count = 0
        try:
            for row in read_in_pages(
                self._engine.connect,
                t.audit_log,
                where=where,
                newest_first=newest_first,
                page_size=page_size,
            ):
                yield entry_from_row(row)
                count += 1
                if count == limit:
                    return
        except sa.exc.OperationalError as exc:
            raise Unavailable("the audit log database is unavailable", retry_after=1) from exc

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self._writer.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(_PG_LOCK)
                yield conn
        except sa.exc.OperationalError as exc:
            raise Unavailable("the audit log database is unavailable", retry_after=1) from exc

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise InternalError("the audit clock returned a naive datetime")
        return now.astimezone(UTC)


def entry_from_row(row: Any) -> AuditEntry:
    """An ``audit_log`` row as an AuditEntry; IntegrityError if its details are not JSON."""
    try:
        details = json.loads(row.details)
    except ValueError:
        raise IntegrityError(f"audit entry {row.seq} holds malformed details") from None
    return AuditEntry(
        seq=int(row.seq),
        time=row.time,
        actor=row.actor,
        action=row.action,
        target=row.target,
        outcome=row.outcome,
        details=details,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def checkpoint_from_row(row: Any) -> Checkpoint:
    """An ``audit_checkpoints`` row as a Checkpoint (not verified)."""
    return Checkpoint(
        seq=int(row.seq),
        head_hash=row.head_hash,
        time=row.time,
        signature=bytes(row.signature),
        key_id=row.key_id,
    )


def _head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(
        sa.select(t.audit_log.c.seq, t.audit_log.c.hash).order_by(t.audit_log.c.seq.desc()).limit(1)
    ).first()
    return (0, GENESIS_HASH) if row is None else (int(row.seq), row.hash)


def _anchor(conn: Connection, newest: Any, signer: CheckpointSigner, head_seq: int) -> ChainWalker:
    """Where checking starts before signing: after the newest checkpoint, if it still holds."""
    if newest is None:
        return ChainWalker()
    seq = int(newest.seq)
    # 1. The newest checkpoint is ours and intact (else a forged one could anchor a forged tail).
    if not verify_checkpoint(checkpoint_from_row(newest), signer.public_key):
        raise IntegrityError(
            f"the audit checkpoint for entry {seq} does not verify with this signing key; "
            "refusing to sign"
        )
    # 2. The log still reaches it (else its tail was cut).
    if seq > head_seq:
        raise IntegrityError(
            f"the audit log ends at entry {head_seq} but a checkpoint covers entry {seq}; "
            "refusing to sign"
        )
    # 3. The entry it covers still has the signed hash (else the chain up to it was rewritten).
    stored = conn.execute(sa.select(t.audit_log.c.hash).where(t.audit_log.c.seq == seq)).scalar()
    if stored != newest.head_hash:
        raise IntegrityError(
            f"audit entry {seq} does not match its signed checkpoint; refusing to sign"
        )
    return ChainWalker(next_seq=seq + 1, prev_hash=newest.head_hash)


def _checked_details(event: AuditEvent) -> str:
    """``event``'s details as canonical JSON, after checking every field can be stored as is."""
    for name in ("actor", "action", "target", "outcome"):
        value = getattr(event, name)
        if not isinstance(value, str):
            raise InvalidInput(f"audit event {name} must be a string")
        # PostgreSQL text cannot hold NUL, and lone surrogates have no UTF-8 form to hash.
        if "\x00" in value:
            raise InvalidInput(f"audit event {name} must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"audit event {name} is not valid Unicode text") from None
    if not event.actor:
        raise InvalidInput("audit event actor must not be empty")
    if not event.action or len(event.action) > _MAX_ACTION:
        raise InvalidInput(f"audit event action must have 1 to {_MAX_ACTION} characters")
    if event.outcome not in OUTCOMES:
        raise InvalidInput("audit event outcome must be one of: denied, failure, success")
    if not isinstance(event.details, Mapping):
        raise InvalidInput("audit event details must be a mapping")
    try:
        return canonical_details(event.details)
    except (TypeError, ValueError):
        raise InvalidInput("audit event details must be plain JSON (no NaN, no objects)") from None


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise InvalidInput(f"{name} must be a timezone-aware datetime")
    return moment
