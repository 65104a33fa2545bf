"""Captured payloads (``modelkeep.audit.capture``) in the metadata database.

Captures have a store of their own over the metadata store's engine: they are written off the
inference path, and nothing a worker's snapshot holds depends on them, so their writes do not
bump the change counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from modelkeep.errors import NotFound
from modelkeep.store import schema as t
from modelkeep.store.metadata import MetadataStore

__all__ = ["CaptureInfo", "CaptureStore", "NewCapture"]


@dataclass(frozen=True, slots=True)
class CaptureInfo:
    """What may be listed about a captured payload: never any of its content."""

    id: str
    model: str
    version: int
    principal: str
    created_at: datetime
    expires_at: datetime
    input_size: int
    output_size: int
    sealed_size: int


@dataclass(frozen=True, slots=True)
class NewCapture:
    """A sealed capture record ready to store; ``wrapped_key`` is bound to (model, id)."""

    id: str
    model: str
    version: int
    principal: str
    created_at: datetime
    expires_at: datetime
    input_size: int
    output_size: int
    wrapped_key: bytes
    kek_id: str
    sealed: bytes


class CaptureStore:
    """Captured payloads in the metadata database.

    Writes do not bump the change counter: a capture changes nothing the workers' snapshots
    hold, and bumping it would make every worker reload after every sampled request.
    """

    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def add(self, new: NewCapture) -> None:
        """Store one sealed record; NotFound if the model is gone."""
        with self._store._connect(self._store._writer) as conn:
            conn.execute(
                sa.insert(t.payload_captures).values(
                    id=new.id,
                    model_id=MetadataStore._model_id(conn, new.model),
                    version=new.version,
                    principal=new.principal,
                    created_at=new.created_at,
                    expires_at=new.expires_at,
                    input_size=new.input_size,
                    output_size=new.output_size,
                    wrapped_key=new.wrapped_key,
                    kek_id=new.kek_id,
                    sealed=new.sealed,
                )
            )

    def find(
        self,
        model: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[CaptureInfo]:
        """Metadata of ``model``'s records created in [since, until), newest first."""
        c = t.payload_captures.c
        query = (
            sa.select(
                c.id,
                c.version,
                c.principal,
                c.created_at,
                c.expires_at,
                c.input_size,
                c.output_size,
                sa.func.length(c.sealed).label("sealed_size"),
            )
            .select_from(t.payload_captures.join(t.models))
            .where(t.models.c.name == model)
            .order_by(c.created_at.desc(), c.id)
            .limit(limit)
        )
        if since is not None:
            query = query.where(c.created_at >= since)
        if until is not None:
            query = query.where(c.created_at < until)
        with self._store._connect(self._store.engine) as conn:
            rows = conn.execute(query).all()
        return [
            CaptureInfo(
                id=row.id,
                model=model,
                version=row.version,
                principal=row.principal,
                created_at=row.created_at,
                expires_at=row.expires_at,
                input_size=row.input_size,
                output_size=row.output_size,
                sealed_size=int(row.sealed_size),
            )
            for row in rows
        ]

    def get(self, model: str, capture_id: str) -> tuple[CaptureInfo, bytes, bytes]:
        """One record of ``model``: its metadata, wrapped data key and sealed bytes (NotFound)."""
        c = t.payload_captures.c
        with self._store._connect(self._store.engine) as conn:
            row = conn.execute(
                sa.select(t.payload_captures)
                .select_from(t.payload_captures.join(t.models))
                .where(t.models.c.name == model, c.id == capture_id)
            ).first()
        if row is None:
            raise NotFound(f"model '{model}' has no such capture")
        sealed = bytes(row.sealed)
        info = CaptureInfo(
            id=row.id,
            model=model,
            version=row.version,
            principal=row.principal,
            created_at=row.created_at,
            expires_at=row.expires_at,
            input_size=row.input_size,
            output_size=row.output_size,
            sealed_size=len(sealed),
        )
        return info, bytes(row.wrapped_key), sealed

    def purge(self, now: datetime) -> int:
        """Delete every record whose ``expires_at`` is at or before ``now``; returns how many."""
        with self._store._connect(self._store._writer) as conn:
            deleted = conn.execute(
                sa.delete(t.payload_captures).where(t.payload_captures.c.expires_at <= now)
            ).rowcount
        return int(deleted or 0)

    def purge_before(self, model: str, cutoff: datetime) -> int:
        """Destroy ``model``'s captures created before ``cutoff`` (record and wrapped key)."""
        c = t.payload_captures.c
        with self._store._connect(self._store._writer) as conn:
            model_id = MetadataStore._model_id(conn, model)
            deleted = conn.execute(
                sa.delete(t.payload_captures).where(c.model_id == model_id, c.created_at < cutoff)
            ).rowcount
        if deleted:
            self._store._checkpoint_wal()
        return int(deleted or 0)
