"""Verification of the whole audit log: the chain link by link, and every signed checkpoint.

What a failed verification means, by the first problem found in ``seq`` order:

- an entry's hash does not match its fields: that entry was edited;
- an entry's ``prev_hash`` is not the previous entry's hash: entries before it were inserted,
  removed, reordered or rewritten;
- a ``seq`` is missing: entries were deleted;
- a checkpoint's signature does not verify: the checkpoint is forged or altered;
- a checkpoint's hash differs from the entry it covers: the chain up to it was rewritten;
- a checkpoint covers an entry beyond the end of the log: the tail was cut off.

A hash chain needs no secret, so someone able to write the database can rewrite the entries after
the newest checkpoint consistently, or delete the log together with its checkpoints; only
checkpoints (and copies of them kept elsewhere) bound what goes unnoticed. See ``docs/audit.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.engine import Engine

from modelkeep.audit._chain import ChainBroken, ChainWalker, read_in_pages
from modelkeep.audit.checkpoint import verify_checkpoint
from modelkeep.audit.log import checkpoint_from_row
from modelkeep.errors import Unavailable
from modelkeep.store import schema as t

__all__ = ["VerifyResult", "verify_chain"]

_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :func:`verify_chain`.

    ``entries`` and ``checkpoints`` count what verified before any problem; ``first_bad_seq`` is
    the first entry (or checkpointed entry) proven bad and ``problem`` says how, both None when
    ``ok``. ``signatures_checked`` is False when no public key was given: checkpoints were then
    compared with the chain but their signatures not checked.
    """

    ok: bool
    entries: int
    checkpoints: int
    first_bad_seq: int | None
    problem: str | None
    signatures_checked: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "signatures_checked": self.signatures_checked,
        }


def verify_chain(
    engine: Engine, public_key: Ed25519PublicKey | None, *, page_size: int = _PAGE_SIZE
) -> VerifyResult:
    """Check every entry and checkpoint of the audit log in ``engine``'s database.

    Streams the log a page at a time. The log as it was when verification started is checked;
    entries appended meanwhile are left for the next run. With ``public_key`` None, checkpoint
    signatures are not checked (forged checkpoints go unnoticed). Unavailable if the database is.
    """
    try:
        # 1. Fix the extent first, in one statement (one snapshot, even under READ COMMITTED), so
        #    concurrent appends and checkpoints cannot make a checkpoint look newer than the log.
        with engine.connect() as conn:
            last_entry, last_checkpoint = conn.execute(
                sa.select(
                    sa.select(sa.func.max(t.audit_log.c.seq)).scalar_subquery(),
                    sa.select(sa.func.max(t.audit_checkpoints.c.seq)).scalar_subquery(),
                )
            ).one()
        return _Verification(public_key).run(
            engine,
            int(last_entry or 0),
            None if last_checkpoint is None else int(last_checkpoint),
            page_size,
        )
    except sa.exc.OperationalError as exc:
        raise Unavailable("the audit log database is unavailable", retry_after=1) from exc


class _Verification:
    def __init__(self, public_key: Ed25519PublicKey | None) -> None:
        self.public_key = public_key
        self.walker = ChainWalker()
        self.checkpoints = 0
        # The newest checkpoint that held: rewritten entries lie after it.
        self.trusted_upto = 0

    def run(
        self, engine: Engine, last_entry: int, last_checkpoint: int | None, page_size: int
    ) -> VerifyResult:
        checkpoints: Iterator[sa.Row[Any]] = iter(())
        if last_checkpoint is not None:
            checkpoints = read_in_pages(
                engine.connect, t.audit_checkpoints, upto=last_checkpoint, page_size=page_size
            )
        pending = next(checkpoints, None)
        try:
            # 2. Walk the chain; after each entry, check the checkpoints that cover it.
            for row in read_in_pages(
                engine.connect, t.audit_log, upto=last_entry, page_size=page_size
            ):
                self.walker.check(row)
                while pending is not None and int(pending.seq) <= int(row.seq):
                    self._check_checkpoint(pending, row)
                    pending = next(checkpoints, None)
            # 3. Checkpoints left over cover entries the log no longer has.
            while pending is not None:
                self._check_checkpoint(pending, None)
                pending = next(checkpoints, None)
        except ChainBroken as broken:
            return self._result(broken.seq, broken.problem)
        return self._result(None, None)

    def _check_checkpoint(self, checkpoint: Any, entry: Any) -> None:
        seq = int(checkpoint.seq)
        # a. Signed by the key the auditor holds, exactly as stored.
        if self.public_key is not None and not verify_checkpoint(
            checkpoint_from_row(checkpoint), self.public_key
        ):
            raise ChainBroken(
                seq,
                f"the checkpoint for entry {seq} has an invalid signature "
                "(forged, altered, or signed by another key)",
            )
        if entry is None:
            last = self.walker.next_seq - 1
            removed = f"entry {seq} was" if seq == last + 1 else f"entries {last + 1} to {seq} were"
            raise ChainBroken(
                last + 1,
                f"the log ends at entry {last} but a signed checkpoint covers entry {seq}: "
                f"{removed} removed",
            )
        # b. It covers an entry of the chain (a seq below 1 names none).
        if seq != int(entry.seq):
            raise ChainBroken(seq, f"the checkpoint for entry {seq} names no entry of the log")
        # c. The chain still ends in the hash that was signed.
        if checkpoint.head_hash != entry.hash:
            raise ChainBroken(
                seq,
                f"entry {seq} does not match its signed checkpoint: entries after "
                f"{self.trusted_upto} up to {seq} were rewritten",
            )
        self.trusted_upto = seq
        self.checkpoints += 1

    def _result(self, first_bad_seq: int | None, problem: str | None) -> VerifyResult:
        return VerifyResult(
            ok=problem is None,
            entries=self.walker.checked,
            checkpoints=self.checkpoints,
            first_bad_seq=first_bad_seq,
            problem=problem,
            signatures_checked=self.public_key is not None,
        )
