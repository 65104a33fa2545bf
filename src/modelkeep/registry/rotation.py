"""Key rotation: re-wrap every version's data key under the current KEK; blobs stay as they are.

Each version row records the key id of the KEK that wrapped its data key (``kek_id``). A pass
takes the versions whose ``kek_id`` is not the current one, asks the key service to re-wrap
each data key (inside the key service where it can: Transit ``rewrap``, KMS ``ReEncrypt``), then
writes the new wrapped keys in one transaction, each only if the row still holds the wrapped key
it started from. So a pass is idempotent per version and can stop anywhere (crash, Ctrl-C, key
service outage): the next pass picks up exactly the versions still wrapped by an older KEK.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import sqlalchemy as sa

from modelkeep.crypto import KeyService, associated_data_for
from modelkeep.errors import IntegrityError, KeyServiceError
from modelkeep.registry import _schema as t
from modelkeep.registry.store import MetadataStore

log = logging.getLogger(__name__)

#: Versions one pass re-wraps at most; each is one key service call.
MAX_BATCH = 500


@dataclass(frozen=True, slots=True)
class Refused:
    """A version whose data key could not be re-wrapped, and why (safe to show)."""

    model: str
    version: int
    reason: str


@dataclass(frozen=True, slots=True)
class RewrapPass:
    """What one pass did: the current key id, the versions moved to it, and what is left.

    ``after`` is the row cursor to hand to the next pass (None when the table is done).
    """

    key_id: str
    rewrapped: list[tuple[str, int]] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    remaining: int = 0
    after: int | None = None


class KeyRotation:
    """Counts and re-wraps the data keys of every version over one store and key service."""

    def __init__(self, store: MetadataStore, keys: KeyService) -> None:
        self._store = store
        self._keys = keys

    def counts(self) -> dict[str, int]:
        """How many versions each KEK (by key id) wraps now."""
        v = t.versions.c
        with self._store._connect(self._store.engine) as conn:
            rows = conn.execute(
                sa.select(v.kek_id, sa.func.count())
                .where(v.deleted_at.is_(None))
                .group_by(v.kek_id)
            ).all()
        return {str(row[0]): int(row[1]) for row in rows}

    def rewrap(self, *, limit: int = 100, after: int = 0) -> RewrapPass:
        """Re-wrap up to ``limit`` versions not under the current KEK, rows after ``after``.

        KeyServiceError (with retry) stops the pass before anything is written; a version whose
        KEK is gone or whose wrapped key does not verify is reported in ``refused`` and left
        as it is (it will not be served either way).
        """
        limit = max(1, min(limit, MAX_BATCH))
        current = self._keys.rotate(new_key=False)
        v = t.versions.c
        query = (
            sa.select(v.id, t.models.c.name, v.number, v.sha256, v.wrapped_key)
            .select_from(t.versions.join(t.models))
            # A crypto-shredded version has no data key left to re-wrap.
            .where(v.kek_id != current, v.id > after, v.deleted_at.is_(None))
            .order_by(v.id)
            .limit(limit)
        )
        with self._store._connect(self._store.engine) as conn:
            rows = conn.execute(query).all()
        done = RewrapPass(key_id=current)
        updates: list[tuple[int, bytes, bytes, str, tuple[str, int]]] = []
        for row in rows:
            old = bytes(row.wrapped_key)
            context = associated_data_for(row.name, row.number, row.sha256)
            try:
                new = self._keys.rewrap(old, context)
            except KeyServiceError as exc:
                if exc.retry_after is not None:
                    raise
                done.refused.append(Refused(row.name, row.number, exc.message))
                continue
            except IntegrityError:
                done.refused.append(Refused(row.name, row.number, "its data key does not verify"))
                continue
            updates.append((row.id, old, new, self._keys.key_id, (row.name, row.number)))
        if updates:
            with self._store._write() as conn:
                for row_id, old, new, key_id, name in updates:
                    changed = conn.execute(
                        sa.update(t.versions)
                        .where(v.id == row_id, v.wrapped_key == old)
                        .values(wrapped_key=new, kek_id=key_id)
                    ).rowcount
                    if changed:
                        done.rewrapped.append(name)
        for refused in done.refused:
            log.error(
                "cannot re-wrap model %s version %s: %s",
                refused.model,
                refused.version,
                refused.reason,
            )
        with self._store._connect(self._store.engine) as conn:
            remaining = conn.execute(
                sa.select(sa.func.count()).select_from(t.versions).where(v.kek_id != current)
            ).scalar_one()
        last = rows[-1].id if len(rows) == limit else None
        return RewrapPass(
            key_id=current,
            rewrapped=done.rewrapped,
            refused=done.refused,
            remaining=int(remaining),
            after=last,
        )
