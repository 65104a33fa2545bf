"""The bytes that are hashed and signed: one canonical, unambiguous encoding, versioned by a tag.

Every hashed or signed message is a sequence of fields, each written as its length (8 bytes, big
endian) followed by its bytes, and the first field is a domain tag. Length prefixes make the
encoding injective (no two field lists give the same bytes, whatever the fields contain), and the
tags keep an entry hash from ever being read as a checkpoint message or anything else::

    entry hash  = SHA-256(frame("modelkeep/audit-entry/v1", seq, time, actor, action, target,
                                outcome, details, prev_hash))
    checkpoint  = Ed25519(frame("modelkeep/audit-checkpoint/v1", seq, head_hash, time, key_id))

``seq`` is written in decimal ASCII, ``time`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC, always
microseconds), ``details`` as the stored canonical JSON text, hashes as lowercase hex, and the
other fields in UTF-8. ``docs/audit.md`` repeats this so that an export can be checked by others.

The module also holds the walk that checks stored entries link by link, and the paged reader both
the log and the verifier use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

ENTRY_DOMAIN = b"modelkeep/audit-entry/v1"
CHECKPOINT_DOMAIN = b"modelkeep/audit-checkpoint/v1"
#: ``prev_hash`` of entry 1.
GENESIS_HASH = "0" * 64


def frame(*fields: bytes) -> bytes:
    """``fields`` joined so that they can be split again unambiguously (length-prefixed)."""
    return b"".join(len(field).to_bytes(8, "big") + field for field in fields)


def iso_time(moment: datetime) -> str:
    """The one text form of a time that is hashed and exported: UTC with microseconds and ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_details(details: Mapping[str, Any]) -> str:
    """``details`` as canonical JSON: sorted keys, no whitespace, ASCII only, no NaN.

    ASCII-only text survives any database encoding byte for byte, and parsing then re-encoding it
    gives the same text, so an exported entry can be hashed again by a third party. Raises
    TypeError or ValueError for anything JSON cannot represent exactly.
    """
    return json.dumps(
        dict(details), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def entry_hash(
    *,
    seq: int,
    time: datetime,
    actor: str,
    action: str,
    target: str,
    outcome: str,
    details: str,
    prev_hash: str,
) -> str:
    """Hex SHA-256 of one entry, chained to the previous one through ``prev_hash``."""
    message = frame(
        ENTRY_DOMAIN,
        str(seq).encode("ascii"),
        iso_time(time).encode("ascii"),
        actor.encode("utf-8"),
        action.encode("utf-8"),
        target.encode("utf-8"),
        outcome.encode("utf-8"),
        details.encode("utf-8"),
        prev_hash.encode("utf-8"),
    )
    return hashlib.sha256(message).hexdigest()


def checkpoint_message(*, seq: int, head_hash: str, time: datetime, key_id: str) -> bytes:
    """The exact bytes an audit checkpoint signature covers."""
    return frame(
        CHECKPOINT_DOMAIN,
        str(seq).encode("ascii"),
        head_hash.encode("utf-8"),
        iso_time(time).encode("ascii"),
        key_id.encode("utf-8"),
    )


class ChainBroken(Exception):
    """Verification stopped: ``seq`` is the first entry proven bad, ``problem`` says how."""

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


class ChainWalker:
    """Checks stored entries one after another, in ``seq`` order, from a trusted starting point.

    Each :meth:`check` holds (or raises ChainBroken naming the entry):

    1. ``seq`` is the next number: no entry was removed or renumbered before it;
    2. ``prev_hash`` is the previous entry's hash: nothing was inserted or reordered before it;
    3. ``hash`` is the hash of the entry's own fields: the entry was not edited.
    """

    def __init__(self, *, next_seq: int = 1, prev_hash: str = GENESIS_HASH) -> None:
        self.next_seq = next_seq
        self.prev_hash = prev_hash
        self.checked = 0

    def check(self, row: Any) -> None:
        """Accept ``row`` (an ``audit_log`` row) as the next link of the chain, or raise."""
        seq = int(row.seq)
        if seq != self.next_seq:
            raise ChainBroken(
                self.next_seq, f"entry {self.next_seq} is missing (the next entry is {seq})"
            )
        if row.prev_hash != self.prev_hash:
            raise ChainBroken(
                seq,
                f"entry {seq} does not follow entry {seq - 1}: its prev_hash does not match "
                "(entries were inserted, removed, reordered or rewritten before it)",
            )
        expected = entry_hash(
            seq=seq,
            time=row.time,
            actor=row.actor,
            action=row.action,
            target=row.target,
            outcome=row.outcome,
            details=row.details,
            prev_hash=row.prev_hash,
        )
        if row.hash != expected:
            raise ChainBroken(seq, f"entry {seq} was altered: its hash does not match its contents")
        self.prev_hash = row.hash
        self.next_seq = seq + 1
        self.checked += 1


def read_in_pages(
    connect: Callable[[], AbstractContextManager[Connection]],
    table: sa.Table,
    *,
    where: Sequence[sa.ColumnElement[bool]] = (),
    after: int = 0,
    upto: int | None = None,
    newest_first: bool = False,
    page_size: int,
) -> Iterator[sa.Row[Any]]:
    """Rows of ``table`` in ``seq`` order, fetched ``page_size`` at a time by ``seq`` ranges.

    Each page is its own short read, so a log of millions of rows is never held in memory and no
    read transaction stays open while the caller works. ``after``/``upto`` bound ``seq``
    (``after`` is the last seq already seen; ignored when ``newest_first``).
    """
    seq = table.c.seq
    last: int | None = None if newest_first else after
    while True:
        query = sa.select(table).where(*where)
        if upto is not None:
            query = query.where(seq <= upto)
        if newest_first:
            if last is not None:
                query = query.where(seq < last)
            query = query.order_by(seq.desc())
        else:
            query = query.where(seq > last).order_by(seq)
        with connect() as conn:
            rows = conn.execute(query.limit(page_size)).all()
        yield from rows
        if len(rows) < page_size:
            return
        last = int(rows[-1].seq)
