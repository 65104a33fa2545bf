"""verify_chain on SQLite and PostgreSQL: every kind of tampering, done with plain SQL, is found
and the first bad entry is named."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from modelkeep.audit import AuditEvent, AuditLog, CheckpointSigner, verify_chain
from modelkeep.audit._chain import entry_hash
from modelkeep.store.metadata import MetadataStore
from modelkeep.store.schema import audit_checkpoints, audit_log

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
# Smaller than the log, so every verification below reads several pages.
PAGE = 4


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    store = MetadataStore(database_url)
    store.migrate()
    yield store.engine
    store.close()


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner.generate()


@pytest.fixture
def log(engine: Engine, signer: CheckpointSigner) -> AuditLog:
    ticks = itertools.count()
    return AuditLog(engine, signer=signer, clock=lambda: NOW + timedelta(seconds=next(ticks)))


def event(n: int) -> AuditEvent:
    return AuditEvent(
        actor=f"key:user{n % 3}",
        action="model.push",
        target=f"model:iris/versions/{n}",
        outcome="success",
        details={"n": n},
    )


@pytest.fixture
def ten(log: AuditLog) -> AuditLog:
    """Entries 1 to 10 with checkpoints at 5 and 10."""
    log.append_many([event(n) for n in range(1, 6)])
    log.checkpoint()
    log.append_many([event(n) for n in range(6, 11)])
    log.checkpoint()
    return log


def tamper(engine: Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def row(conn: Connection, seq: int) -> sa.Row[tuple[object, ...]]:
    return conn.execute(sa.select(audit_log).where(audit_log.c.seq == seq)).one()


def verify(engine: Engine, signer: CheckpointSigner) -> tuple[bool, int | None, str]:
    result = verify_chain(engine, signer.public_key, page_size=PAGE)
    return result.ok, result.first_bad_seq, result.problem or ""


# -- intact logs ------------------------------------------------------------------------------


def test_an_intact_log_verifies_with_every_entry_and_checkpoint_counted(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    result = verify_chain(engine, signer.public_key, page_size=PAGE)

    assert (result.ok, result.entries, result.checkpoints) == (True, 10, 2)
    assert (result.first_bad_seq, result.problem, result.signatures_checked) == (None, None, True)


def test_an_empty_log_verifies(engine: Engine, signer: CheckpointSigner) -> None:
    result = verify_chain(engine, signer.public_key)

    assert (result.ok, result.entries, result.checkpoints) == (True, 0, 0)


def test_verification_reads_the_log_in_pages_never_whole(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "FROM audit_log" in statement and "max(" not in statement:
            statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        assert verify_chain(engine, signer.public_key, page_size=PAGE).ok
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)

    # Ten entries in pages of four: three page reads, each one bounded.
    assert len(statements) == 3
    assert all("LIMIT" in statement for statement in statements)


# -- entries ----------------------------------------------------------------------------------


def test_edited_details_are_found_at_the_edited_entry(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(audit_log).where(audit_log.c.seq == 4).values(details='{"n":99}'))

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 4)
    assert "entry 4 was altered" in problem


def test_an_edit_with_a_recomputed_hash_is_found_at_the_next_entry(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    with engine.begin() as conn:
        old = row(conn, 7)
        forged = entry_hash(
            seq=7,
            time=old.time,
            actor="key:nobody",
            action=old.action,
            target=old.target,
            outcome=old.outcome,
            details=old.details,
            prev_hash=old.prev_hash,
        )
        conn.execute(
            sa.update(audit_log).where(audit_log.c.seq == 7).values(actor="key:nobody", hash=forged)
        )

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 8)
    assert "entry 8 does not follow entry 7" in problem


def test_a_deleted_middle_entry_is_named(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    tamper(engine, "DELETE FROM audit_log WHERE seq = 6")

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 6)
    assert "entry 6 is missing" in problem


def test_a_forged_entry_added_at_the_end_is_found(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    with engine.begin() as conn:
        last = row(conn, 10)
        conn.execute(
            sa.insert(audit_log).values(
                seq=11,
                time=NOW,
                actor="key:mallory",
                action="key.create",
                target="key:backdoor",
                outcome="success",
                details="{}",
                prev_hash=last.hash,
                hash="ab" * 32,
            )
        )

    ok, first_bad, _ = verify(engine, signer)

    assert (ok, first_bad) == (False, 11)


def test_a_forged_entry_inserted_in_the_middle_is_found_where_the_chain_breaks(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    """The forger renumbers the later entries and gives the new entry 7 a correct hash: it links
    to entry 6, so the chain breaks at the renumbered entry after it."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 7"))
        conn.execute(sa.text("UPDATE audit_log SET seq = seq - 999 WHERE seq > 1000"))
        six = row(conn, 6)
        fields = {
            "seq": 7,
            "time": six.time,
            "actor": "key:mallory",
            "action": "label.set",
            "target": "model:iris/labels/production",
            "outcome": "success",
            "details": "{}",
            "prev_hash": six.hash,
        }
        conn.execute(sa.insert(audit_log).values(**fields, hash=entry_hash(**fields)))

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 8)
    assert "entry 8" in problem


def test_two_entries_with_swapped_contents_are_found_at_the_first(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    columns = ("time", "actor", "action", "target", "outcome", "details", "prev_hash", "hash")
    with engine.begin() as conn:
        three, four = row(conn, 3), row(conn, 4)
        for seq, source in ((3, four), (4, three)):
            conn.execute(
                sa.update(audit_log)
                .where(audit_log.c.seq == seq)
                .values({name: getattr(source, name) for name in columns})
            )

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 3)
    assert "entry 3 does not follow entry 2" in problem


# -- checkpoints ------------------------------------------------------------------------------


def test_a_tail_cut_after_a_checkpoint_is_found(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    tamper(engine, "DELETE FROM audit_log WHERE seq > 7")

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 8)
    assert "entries 8 to 10 were removed" in problem


def test_a_tail_cut_and_rewritten_is_found_at_the_checkpointed_entry(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    tamper(engine, "DELETE FROM audit_log WHERE seq > 7")
    for n in range(3):
        ten.append(AuditEvent("key:mallory", "model.push", "model:iris", "success", {"n": n}))

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 10)
    assert "entry 10 does not match its signed checkpoint" in problem
    assert "after 5" in problem


def test_a_corrupted_checkpoint_signature_is_found(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    with engine.begin() as conn:
        signature = conn.execute(
            sa.select(audit_checkpoints.c.signature).where(audit_checkpoints.c.seq == 5)
        ).scalar_one()
        flipped = bytes([signature[0] ^ 1]) + bytes(signature[1:])
        conn.execute(
            sa.update(audit_checkpoints)
            .where(audit_checkpoints.c.seq == 5)
            .values(signature=flipped)
        )

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 5)
    assert "checkpoint for entry 5 has an invalid signature" in problem


def test_a_checkpoint_signed_by_another_key_is_found(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    tamper(engine, "DELETE FROM audit_log WHERE seq > 7", "DELETE FROM audit_checkpoints")
    mallory = AuditLog(engine, signer=CheckpointSigner.generate())
    mallory.checkpoint()

    ok, first_bad, problem = verify(engine, signer)

    assert (ok, first_bad) == (False, 7)
    assert "invalid signature" in problem


def test_a_checkpoint_moved_to_another_entry_is_found(
    ten: AuditLog, engine: Engine, signer: CheckpointSigner
) -> None:
    tamper(engine, "UPDATE audit_checkpoints SET seq = 4 WHERE seq = 5")

    ok, first_bad, _ = verify(engine, signer)

    assert (ok, first_bad) == (False, 4)


def test_without_a_public_key_signatures_are_skipped_but_truncation_is_found(
    ten: AuditLog, engine: Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.update(audit_checkpoints).where(audit_checkpoints.c.seq == 5).values(signature=b"")
        )
    intact = verify_chain(engine, None, page_size=PAGE)
    tamper(engine, "DELETE FROM audit_log WHERE seq > 7")
    cut = verify_chain(engine, None, page_size=PAGE)

    assert (intact.ok, intact.checkpoints, intact.signatures_checked) == (True, 2, False)
    assert (cut.ok, cut.first_bad_seq) == (False, 8)
