"""Idempotency keys of pushes in the metadata store: claimed, recorded, found and forgotten.

A key is recorded in the same transaction as the version it made, so a crash can never leave
one without the other. ``claim`` runs under the store's writer lock, so of two pushes with one
key only the first to commit makes a version; the other learns which (``PushKeyTaken``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelkeep.store import schema as t

__all__ = ["PushKey", "PushKeyTaken", "claim", "find", "purge", "record"]


class PushKeyTaken(Exception):
    """A push with the same idempotency key committed first: its version stands."""

    def __init__(self, number: int, request_sha256: str) -> None:
        super().__init__(number)
        self.number = number
        self.request_sha256 = request_sha256


@dataclass(frozen=True, slots=True)
class PushKey:
    """A caller's ``Idempotency-Key`` for a push of one model, remembered until ``expires_at``.

    ``request_sha256`` fingerprints what was sent (body digest, file name, layout, signature),
    so a key reused for a different request is told apart from a retry.
    """

    principal: str
    key: str
    request_sha256: str
    expires_at: datetime


_KEYS = t.push_keys


def _live(model_id: int, principal: str, key: str) -> sa.ColumnElement[bool]:
    return (
        (_KEYS.c.model_id == model_id)
        & (_KEYS.c.principal == principal)
        & (_KEYS.c.idempotency_key == key)
    )


def claim(conn: Connection, model_id: int, push_key: PushKey, now: datetime) -> None:
    """Raise PushKeyTaken if the key is live; forget expired keys (this one included)."""
    purge(conn, now)
    row = conn.execute(
        sa.select(t.versions.c.number, _KEYS.c.request_sha256)
        .select_from(_KEYS.join(t.versions, t.versions.c.id == _KEYS.c.version_id))
        .where(_live(model_id, push_key.principal, push_key.key))
    ).first()
    if row is not None:
        raise PushKeyTaken(int(row.number), str(row.request_sha256))


def record(
    conn: Connection, model_id: int, version_id: int, push_key: PushKey, now: datetime
) -> None:
    """Remember that ``push_key`` made the version ``version_id`` (after ``claim``)."""
    conn.execute(
        sa.insert(_KEYS).values(
            model_id=model_id,
            principal=push_key.principal,
            idempotency_key=push_key.key,
            request_sha256=push_key.request_sha256,
            version_id=version_id,
            created_at=now,
            expires_at=push_key.expires_at,
        )
    )


def find(
    conn: Connection, model: str, principal: str, key: str, now: datetime
) -> tuple[int, str] | None:
    """``(version number, request fingerprint)`` of a live key, or None."""
    row = conn.execute(
        sa.select(t.versions.c.number, _KEYS.c.request_sha256)
        .select_from(
            _KEYS.join(t.models, t.models.c.id == _KEYS.c.model_id).join(
                t.versions, t.versions.c.id == _KEYS.c.version_id
            )
        )
        .where(
            t.models.c.name == model,
            _KEYS.c.principal == principal,
            _KEYS.c.idempotency_key == key,
            _KEYS.c.expires_at > now,
        )
    ).first()
    return None if row is None else (int(row.number), str(row.request_sha256))


def purge(conn: Connection, now: datetime) -> int:
    """Forget keys past their time; returns how many."""
    return int(conn.execute(sa.delete(_KEYS).where(_KEYS.c.expires_at <= now)).rowcount)
