"""Key rotation: re-wrap every data key under the current KEK; blobs and sealed bytes stay.

Two kinds of rows hold a wrapped data key and the key id of the KEK that wrapped it
(``kek_id``): model versions and captured payloads. A pass takes the rows whose ``kek_id`` is not
the current one, versions first and then captures, asks the key service to re-wrap each data key
(inside the key service where it can: Transit ``rewrap``, KMS ``ReEncrypt``), then writes the new
wrapped keys in one transaction, each only if the row still holds the wrapped key it started
from. So a pass is idempotent per row and can stop anywhere (crash, Ctrl-C, key service outage):
the next pass picks up exactly the rows still wrapped by an older KEK.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from modelkeep.audit.capture import associated_data_for as capture_associated_data
from modelkeep.crypto import KeyService, associated_data_for
from modelkeep.errors import IntegrityError, KeyServiceError
from modelkeep.store import schema as t
from modelkeep.store.metadata import MetadataStore

log = logging.getLogger(__name__)

#: Rows one pass re-wraps at most; each is one key service call.
MAX_BATCH = 500


@dataclass(frozen=True, slots=True)
class Refused:
    """A row whose data key could not be re-wrapped, and why (safe to show): a version, or the
    captured payload ``capture`` of that model and version."""

    model: str
    version: int
    reason: str
    capture: str | None = None


@dataclass(frozen=True, slots=True)
class RewrapPass:
    """What one pass did: the current key id, the rows moved to it, and what is left.

    ``after`` is the versions' row cursor to hand to the next pass, None once every version
    was visited; ``capture_after`` the same for captures, which a pass reaches only then.
    The rotation is finished when both are None.
    """

    key_id: str
    rewrapped: list[tuple[str, int]] = field(default_factory=list)
    rewrapped_captures: list[str] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    remaining: int = 0
    remaining_captures: int = 0
    after: int | None = None
    capture_after: str | None = None


@dataclass(frozen=True, slots=True)
class _Holders:
    """One kind of row holding a wrapped data key: its table, the rows a pass reads (with
    ``id``, ``name``, ``number``, ``wrapped_key``) and the associated data each key is bound to."""

    table: sa.Table
    query: Callable[[str], sa.Select[Any]]
    context: Callable[[Any], bytes]
    refused: Callable[[Any, str], Refused]


def _version_rows(current: str) -> sa.Select[Any]:
    v = t.versions.c
    return (
        sa.select(v.id, t.models.c.name, v.number, v.sha256, v.wrapped_key)
        .select_from(t.versions.join(t.models))
        # A crypto-shredded version has no data key left to re-wrap.
        .where(v.kek_id != current, v.deleted_at.is_(None))
        .order_by(v.id)
    )


def _capture_rows(current: str) -> sa.Select[Any]:
    c = t.payload_captures.c
    return (
        sa.select(c.id, t.models.c.name, c.version.label("number"), c.wrapped_key)
        .select_from(t.payload_captures.join(t.models))
        .where(c.kek_id != current)
        .order_by(c.id)
    )


_VERSIONS = _Holders(
    table=t.versions,
    query=_version_rows,
    context=lambda row: associated_data_for(row.name, row.number, row.sha256),
    refused=lambda row, reason: Refused(row.name, row.number, reason),
)
_CAPTURES = _Holders(
    table=t.payload_captures,
    query=_capture_rows,
    context=lambda row: capture_associated_data(row.name, row.id),
    refused=lambda row, reason: Refused(row.name, row.number, reason, capture=row.id),
)


class KeyRotation:
    """Counts and re-wraps the data keys of every version and captured payload over one store
    and key service."""

    def __init__(self, store: MetadataStore, keys: KeyService) -> None:
        self._store = store
        self._keys = keys

    def counts(self) -> dict[str, int]:
        """How many versions each KEK (by key id) wraps now."""
        return self._counts(t.versions)

    def capture_counts(self) -> dict[str, int]:
        """How many captured payloads each KEK (by key id) wraps now."""
        return self._counts(t.payload_captures)

    def _counts(self, table: sa.Table) -> dict[str, int]:
        kek_id = table.c.kek_id
        with self._store._connect(self._store.engine) as conn:
            query = sa.select(kek_id, sa.func.count()).group_by(kek_id)
            if table is t.versions:
                # A crypto-shredded version holds no data key any more.
                query = query.where(table.c.deleted_at.is_(None))
            rows = conn.execute(query).all()
        return {str(row[0]): int(row[1]) for row in rows}

    def rewrap(
        self, *, limit: int = 100, after: int | None = 0, capture_after: str | None = ""
    ) -> RewrapPass:
        """Re-wrap up to ``limit`` rows not under the current KEK: versions after the row
        ``after``, then (once every version was visited, ``after`` None) captures after
        ``capture_after``.

        KeyServiceError (with retry) stops the pass before anything is written; a row whose
        KEK is gone or whose wrapped key does not verify is reported in ``refused`` and left
        as it is (it will not be served or opened either way).
        """
        limit = max(1, min(limit, MAX_BATCH))
        current = self._keys.rotate(new_key=False)
        refused: list[Refused] = []
        rewrapped: list[Any] = []
        next_after: int | None = None
        if after is not None:
            rows = self._rewrap(_VERSIONS, current, after, limit, rewrapped, refused)
            next_after = rows[-1].id if len(rows) == limit else None
            limit -= len(rows)
        versions = [(row.name, row.number) for row in rewrapped]
        rewrapped = []
        next_capture: str | None = capture_after
        if next_after is None and capture_after is not None and limit > 0:
            rows = self._rewrap(_CAPTURES, current, capture_after, limit, rewrapped, refused)
            next_capture = rows[-1].id if len(rows) == limit else None
        for item in refused:
            log.error(
                "cannot re-wrap model %s version %s%s: %s",
                item.model,
                item.version,
                "" if item.capture is None else f" capture {item.capture}",
                item.reason,
            )
        return RewrapPass(
            key_id=current,
            rewrapped=versions,
            rewrapped_captures=[row.id for row in rewrapped],
            refused=refused,
            remaining=self._left(t.versions, current),
            remaining_captures=self._left(t.payload_captures, current),
            after=next_after,
            capture_after=next_capture,
        )

    def _rewrap(
        self,
        holders: _Holders,
        current: str,
        after: int | str,
        limit: int,
        rewrapped: list[Any],
        refused: list[Refused],
    ) -> Sequence[Any]:
        """Re-wrap the next ``limit`` rows of ``holders`` after ``after``; the rows read."""
        query = holders.query(current).where(holders.table.c.id > after).limit(limit)
        with self._store._connect(self._store.engine) as conn:
            rows = conn.execute(query).all()
        updates: list[tuple[Any, bytes, bytes, str]] = []
        for row in rows:
            old = bytes(row.wrapped_key)
            try:
                new = self._keys.rewrap(old, holders.context(row))
            except KeyServiceError as exc:
                if exc.retry_after is not None:
                    raise
                refused.append(holders.refused(row, exc.message))
                continue
            except IntegrityError:
                refused.append(holders.refused(row, "its data key does not verify"))
                continue
            updates.append((row, old, new, self._keys.key_id))
        if updates:
            c = holders.table.c
            with self._store._write() as conn:
                for row, old, new, key_id in updates:
                    changed = conn.execute(
                        sa.update(holders.table)
                        .where(c.id == row.id, c.wrapped_key == old)
                        .values(wrapped_key=new, kek_id=key_id)
                    ).rowcount
                    if changed:
                        rewrapped.append(row)
        return rows

    def _left(self, table: sa.Table, current: str) -> int:
        with self._store._connect(self._store.engine) as conn:
            count = conn.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.kek_id != current)
            ).scalar_one()
        return int(count)
