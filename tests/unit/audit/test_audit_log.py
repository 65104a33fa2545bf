"""AuditLog on SQLite and PostgreSQL: appends, hash encoding, validation, reads, checkpoints."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from modelkeep.audit import (
    AuditEntry,
    AuditEvent,
    AuditLog,
    CheckpointSigner,
    verify_chain,
    verify_checkpoint,
)
from modelkeep.errors import ConfigError, IntegrityError, InternalError, InvalidInput
from modelkeep.store.metadata import MetadataStore
from modelkeep.store.schema import audit_log

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
GENESIS = "0" * 64


def ticking_clock(start: datetime = NOW) -> Callable[[], datetime]:
    """A clock that moves one second per reading, with microseconds to prove they are kept."""
    ticks = itertools.count()
    return lambda: start + timedelta(seconds=next(ticks), microseconds=123456)


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
    return AuditLog(engine, signer=signer, clock=ticking_clock())


def event(n: int = 0, **changes: object) -> AuditEvent:
    fields: dict[str, object] = {
        "actor": "key:alice",
        "action": "model.push",
        "target": f"model:iris/versions/{n}",
        "outcome": "success",
        "details": {"n": n},
    }
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def documented_hash(entry: AuditEntry, details_text: str) -> str:
    """The entry hash as docs/audit.md specifies it, written independently of modelkeep.audit."""
    fields = [
        b"modelkeep/audit-entry/v1",
        str(entry.seq).encode(),
        entry.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode(),
        entry.actor.encode(),
        entry.action.encode(),
        entry.target.encode(),
        entry.outcome.encode(),
        details_text.encode(),
        entry.prev_hash.encode(),
    ]
    return hashlib.sha256(b"".join(len(f).to_bytes(8, "big") + f for f in fields)).hexdigest()


def stored(engine: Engine, column: str, seq: int) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.select(audit_log.c[column]).where(audit_log.c.seq == seq)).scalar()


# -- appending --------------------------------------------------------------------------------


def test_entries_are_numbered_from_one_and_chained_from_the_genesis_hash(log: AuditLog) -> None:
    first, second, third = (log.append(event(n)) for n in range(3))

    assert [first.seq, second.seq, third.seq] == [1, 2, 3]
    assert [GENESIS, first.hash, second.hash] == [
        first.prev_hash,
        second.prev_hash,
        third.prev_hash,
    ]
    assert NOW + timedelta(microseconds=123456) == first.time


def test_hash_follows_the_documented_encoding(log: AuditLog, engine: Engine) -> None:
    entry = log.append(event(details={"b": [1, 2], "a": "é"}))

    details_text = '{"a":"\\u00e9","b":[1,2]}'
    assert details_text == stored(engine, "details", 1)
    assert documented_hash(entry, details_text) == entry.hash
    assert entry.hash == stored(engine, "hash", 1)


def test_an_appended_entry_reads_back_identically_through_a_new_connection(
    log: AuditLog, database_url: str
) -> None:
    entry = log.append(event(7, details={"nested": {"z": None, "a": 1.5}}))

    other = MetadataStore(database_url)
    try:
        assert [entry] == list(AuditLog(other.engine).entries())
    finally:
        other.close()


def test_append_many_records_a_batch_as_consecutive_entries(log: AuditLog) -> None:
    log.append(event(0))

    batch = log.append_many([event(1), event(2), event(3)])

    assert [e.seq for e in batch] == [2, 3, 4]
    assert batch[0].time == batch[2].time
    assert [batch[0].hash, batch[1].hash] == [batch[1].prev_hash, batch[2].prev_hash]
    assert batch == list(log.entries())[1:]


def test_append_many_of_nothing_records_nothing(log: AuditLog) -> None:
    assert log.append_many([]) == []
    assert list(log.entries()) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"outcome": "ok"},
        {"action": ""},
        {"action": "x" * 65},
        {"actor": ""},
        {"actor": "key:\x00alice"},
        {"target": "model:\udcff"},
        {"details": {"score": float("nan")}},
        {"details": {"when": datetime(2026, 1, 1, tzinfo=UTC)}},
        {"details": ["not", "a", "mapping"]},
        {"actor": 42},
    ],
    ids=lambda bad: next(iter(bad)) + "=" + repr(next(iter(bad.values())))[:20],
)
def test_an_event_that_cannot_be_stored_faithfully_is_refused(
    log: AuditLog, bad: dict[str, object]
) -> None:
    with pytest.raises(InvalidInput):
        log.append(event(**bad))

    assert list(log.entries()) == []


def test_a_batch_with_one_bad_event_records_none_of_it(log: AuditLog) -> None:
    with pytest.raises(InvalidInput):
        log.append_many([event(1), event(2, outcome="maybe")])

    assert list(log.entries()) == []


def test_a_naive_clock_is_a_bug_not_an_entry(engine: Engine) -> None:
    log = AuditLog(engine, clock=lambda: datetime(2026, 1, 1))

    with pytest.raises(InternalError):
        log.append(event())
    assert list(log.entries()) == []


# -- reading with filters ---------------------------------------------------------------------


@pytest.fixture
def varied(log: AuditLog) -> list[AuditEntry]:
    return [
        log.append(event(actor="key:alice", action="model.push", target="model:iris/versions/1")),
        log.append(event(actor="key:bob", action="label.set", target="model:iris/labels/prod")),
        log.append(event(actor="key:alice", action="key.create", target="key:k2")),
        log.append(event(actor="key:bob", action="model.push", target="model:iris2/versions/1")),
        log.append(event(actor="key:carol", action="infer", target="model:iris")),
        log.append(event(actor="key:carol", action="infer", target="model:a_b")),
        log.append(event(actor="key:carol", action="infer", target="model:axb")),
    ]


def seqs(entries: Iterator[AuditEntry]) -> list[int]:
    return [entry.seq for entry in entries]


def test_entries_without_filters_are_all_entries_oldest_first(
    log: AuditLog, varied: list[AuditEntry]
) -> None:
    assert varied == list(log.entries())


def test_model_filter_matches_the_model_and_its_sub_targets_only(
    log: AuditLog, varied: list[AuditEntry]
) -> None:
    assert seqs(log.entries(model="iris")) == [1, 2, 5]
    # '_' is a LIKE wildcard: it must match itself only.
    assert seqs(log.entries(model="a_b")) == [6]


def test_actor_and_action_filters_match_exactly_and_combine(
    log: AuditLog, varied: list[AuditEntry]
) -> None:
    assert seqs(log.entries(actor="key:alice")) == [1, 3]
    assert seqs(log.entries(action="model.push")) == [1, 4]
    assert seqs(log.entries(actor="key:bob", action="model.push")) == [4]
    assert seqs(log.entries(actor="key:alice", action="infer")) == []


def test_time_filters_include_since_and_exclude_until(
    log: AuditLog, varied: list[AuditEntry]
) -> None:
    since, until = varied[2].time, varied[4].time

    assert seqs(log.entries(since=since, until=until)) == [3, 4]
    assert seqs(log.entries(since=since)) == [3, 4, 5, 6, 7]


def test_limit_and_newest_first_stream_across_pages(engine: Engine) -> None:
    log = AuditLog(engine, clock=ticking_clock(), page_size=2)
    log.append_many([event(n) for n in range(7)])

    assert seqs(log.entries()) == [1, 2, 3, 4, 5, 6, 7]
    assert seqs(log.entries(limit=3)) == [1, 2, 3]
    assert seqs(log.entries(newest_first=True)) == [7, 6, 5, 4, 3, 2, 1]
    assert seqs(log.entries(newest_first=True, limit=3)) == [7, 6, 5]
    assert seqs(log.entries(limit=0)) == []


def test_a_naive_time_filter_is_refused(log: AuditLog) -> None:
    with pytest.raises(InvalidInput):
        log.entries(since=datetime(2026, 1, 1))


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_of_an_empty_log_is_none(log: AuditLog) -> None:
    assert log.checkpoint() is None


def test_checkpoint_needs_a_signer(engine: Engine) -> None:
    log = AuditLog(engine)
    log.append(event())

    with pytest.raises(ConfigError):
        log.checkpoint()


def test_checkpoint_signs_the_head_and_is_reused_until_the_head_moves(
    log: AuditLog, signer: CheckpointSigner, engine: Engine
) -> None:
    log.append(event(1))
    head = log.append(event(2))

    first = log.checkpoint()
    again = log.checkpoint()
    log.append(event(3))
    later = log.checkpoint()

    assert first is not None
    assert later is not None
    assert (2, head.hash, signer.key_id) == (first.seq, first.head_hash, first.key_id)
    assert verify_checkpoint(first, signer.public_key)
    assert first == again
    assert later.seq == 3
    assert verify_chain(engine, signer.public_key).checkpoints == 2


def test_checkpoint_refuses_to_sign_an_edited_tail(log: AuditLog, engine: Engine) -> None:
    log.append_many([event(n) for n in range(5)])
    log.checkpoint()
    log.append_many([event(n) for n in range(5, 8)])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET actor = 'key:mallory' WHERE seq = 7"))

    with pytest.raises(IntegrityError, match="entry 7"):
        log.checkpoint()


def test_checkpoint_refuses_to_sign_a_log_cut_below_its_newest_checkpoint(
    log: AuditLog, engine: Engine
) -> None:
    log.append_many([event(n) for n in range(5)])
    log.checkpoint()
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE seq > 3"))
    log.append(event(9))

    with pytest.raises(IntegrityError, match="ends at entry 4"):
        log.checkpoint()


def test_checkpoint_refuses_an_anchor_signed_by_another_key(log: AuditLog, engine: Engine) -> None:
    log.append(event())
    log.checkpoint()
    log.append(event())
    other = AuditLog(engine, signer=CheckpointSigner.generate())

    with pytest.raises(IntegrityError, match="does not verify"):
        other.checkpoint()
