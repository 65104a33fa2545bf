"""Payload capture: sealed records, sampling, the background writer, retention in the store."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from modelkeep.audit.capture import (
    CaptureRecord,
    CaptureWriter,
    associated_data_for,
    expires_at,
    is_capture_id,
    is_expired,
    new_capture_id,
    open_record,
    seal_record,
    should_capture,
)
from modelkeep.crypto import InMemoryKeyService
from modelkeep.errors import IntegrityError, InvalidInput, NotFound
from modelkeep.guard.policy import CapturePolicy, ModelPolicy
from modelkeep.store.captures import CaptureStore, NewCapture
from modelkeep.store.metadata import MetadataStore

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
MARKER = b'{"inputs":[{"name":"input","data":[7.77777]}]}'


def _record(model: str = "iris", *, output: bytes = b'{"outputs":[]}') -> CaptureRecord:
    return CaptureRecord(
        request_sha256="ab" * 32,
        request_id="req-1",
        principal="consumer1234",
        model=model,
        version=3,
        time=NOW,
        input=MARKER,
        output=output,
    )


# -- sealing -------------------------------------------------------------------------------


def test_a_sealed_record_opens_to_exactly_what_was_sealed() -> None:
    keys = InMemoryKeyService()
    record = _record(output=bytes(range(256)))
    capture_id = new_capture_id()

    sealed = seal_record(record, capture_id, keys)

    assert record == open_record("iris", capture_id, sealed.wrapped_key, sealed.sealed, keys)
    assert keys.key_id == sealed.kek_id
    assert MARKER not in sealed.sealed
    assert MARKER not in sealed.wrapped_key


def test_every_record_gets_its_own_data_key() -> None:
    keys = InMemoryKeyService()
    first, second = new_capture_id(), new_capture_id()
    a = seal_record(_record(), first, keys)
    b = seal_record(_record(), second, keys)

    key_a = keys.unwrap(a.wrapped_key, associated_data_for("iris", first))
    key_b = keys.unwrap(b.wrapped_key, associated_data_for("iris", second))

    assert key_a != key_b


def test_another_kek_model_or_id_is_refused() -> None:
    keys = InMemoryKeyService()
    capture_id = new_capture_id()
    sealed = seal_record(_record(), capture_id, keys)

    attempts = [
        (InMemoryKeyService(), "iris", capture_id),
        (keys, "other", capture_id),
        (keys, "iris", new_capture_id()),
    ]
    for attempt_keys, model, attempt_id in attempts:
        with pytest.raises(IntegrityError) as caught:
            open_record(model, attempt_id, sealed.wrapped_key, sealed.sealed, attempt_keys)
        assert "failed verification" in caught.value.message


def test_a_key_or_blob_swapped_between_records_or_a_flipped_byte_is_refused() -> None:
    keys = InMemoryKeyService()
    first, second = new_capture_id(), new_capture_id()
    a = seal_record(_record(), first, keys)
    b = seal_record(_record(), second, keys)
    flipped = bytearray(a.sealed)
    flipped[len(flipped) // 2] ^= 1

    for wrapped, sealed in [(b.wrapped_key, a.sealed), (a.wrapped_key, b.sealed)]:
        with pytest.raises(IntegrityError):
            open_record("iris", first, wrapped, sealed, keys)
    with pytest.raises(IntegrityError):
        open_record("iris", first, a.wrapped_key, bytes(flipped), keys)


def test_associated_data_is_unambiguous() -> None:
    assert associated_data_for("ab", "c" * 32) != associated_data_for("a", "bc" * 16 + "c")
    assert associated_data_for("iris", "0" * 32) == associated_data_for("iris", "0" * 32)


def test_capture_ids_are_32_hex_characters_and_anything_else_is_not_one() -> None:
    assert is_capture_id(new_capture_id())
    assert new_capture_id() != new_capture_id()
    for bad in ["", "../etc", "A" * 32, "0" * 31, "0" * 33, "g" * 32]:
        assert not is_capture_id(bad)


# -- sampling and retention ---------------------------------------------------------------


def test_sampling_captures_when_the_draw_is_below_the_rate() -> None:
    assert should_capture(0.25, lambda: 0.2499)
    assert not should_capture(0.25, lambda: 0.25)
    assert not should_capture(0.0, lambda: 0.0)
    assert should_capture(1.0, lambda: 0.999999)


def test_sampling_rate_holds_over_a_fixed_sequence_of_draws() -> None:
    draws = iter([i / 100 for i in range(100)])

    taken = sum(should_capture(0.1, lambda: next(draws)) for _ in range(100))

    assert taken == 10


def test_expiry_is_days_after_capture_and_inclusive() -> None:
    expiry = expires_at(NOW, 7)

    assert NOW + timedelta(days=7) == expiry
    assert not is_expired(expiry, expiry - timedelta(microseconds=1))
    assert is_expired(expiry, expiry)


def test_the_capture_policy_validates_and_round_trips() -> None:
    policy = ModelPolicy.from_json({"capture": {"sample": 0.5, "days": 30}})

    assert CapturePolicy(sample=0.5, days=30) == policy.capture
    assert policy == ModelPolicy.loads(policy.dumps())
    assert ModelPolicy().capture is None
    assert ModelPolicy.from_json({"capture": None}).capture is None
    assert policy.to_json()["capture"] == {"sample": 0.5, "days": 30}
    for bad in [
        {"sample": 1.5, "days": 1},
        {"sample": -0.1, "days": 1},
        {"sample": True, "days": 1},
        {"sample": "1", "days": 1},
        {"sample": 0.5, "days": 0},
        {"sample": 0.5, "days": 366},
        {"sample": 0.5, "days": 1.5},
        {"sample": 0.5},
        {"sample": 0.5, "days": 1, "extra": 1},
        "on",
    ]:
        with pytest.raises(InvalidInput):
            ModelPolicy.from_json({"capture": bad})


# -- the background writer ------------------------------------------------------------------


def test_a_full_queue_drops_counts_and_logs_without_blocking_or_showing_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    started = threading.Event()
    written: list[bytes] = []

    def slow_write(item: bytes) -> None:
        started.set()
        release.wait(10)
        written.append(item)

    writer: CaptureWriter[bytes] = CaptureWriter(slow_write, max_queue=2)
    try:
        assert writer.submit(b"first " + MARKER)
        assert started.wait(10)  # the thread holds the first item; the queue is empty
        with caplog.at_level(logging.WARNING, logger="modelkeep.audit.capture"):
            accepted = [writer.submit(b"next " + MARKER) for _ in range(5)]
        assert accepted == [True, True, False, False, False]
        assert writer.dropped == 3
        assert "3 captures dropped" not in caplog.text  # logged once, at the first drop
        assert "1 captures dropped" in caplog.text
        assert MARKER.decode() not in caplog.text
        release.set()
        assert writer.flush(10)
        assert len(written) == 3
        assert writer.written == 3
    finally:
        release.set()
        writer.close()


def test_a_failed_write_is_counted_and_logged_without_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def failing(item: bytes) -> None:
        raise RuntimeError(item.decode())

    writer: CaptureWriter[bytes] = CaptureWriter(failing)
    try:
        with caplog.at_level(logging.ERROR, logger="modelkeep.audit.capture"):
            assert writer.submit(MARKER)
            assert writer.flush(10)
        assert (writer.failed, writer.written) == (1, 0)
        assert "payload capture not stored" in caplog.text
        assert MARKER.decode() not in caplog.text
    finally:
        writer.close()


def test_a_closed_writer_takes_nothing_and_a_fresh_one_runs_no_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    writer: CaptureWriter[bytes] = CaptureWriter(lambda item: None)
    assert "modelkeep-capture" not in {t.name for t in threading.enumerate()} - before
    writer.close()
    assert not writer.submit(b"x")


# -- the store ------------------------------------------------------------------------------


@pytest.fixture
def store(database_url: str) -> Iterator[MetadataStore]:
    store = MetadataStore(database_url)
    store.migrate()
    store.put_model("iris", actor="admin", now=NOW)
    store.put_model("other", actor="admin", now=NOW)
    yield store
    store.close()


def _stored(store: MetadataStore, model: str, created: datetime, days: int) -> str:
    keys = InMemoryKeyService()
    capture_id = new_capture_id()
    sealed = seal_record(_record(model), capture_id, keys)
    CaptureStore(store).add(
        NewCapture(
            id=capture_id,
            model=model,
            version=3,
            principal="consumer1234",
            created_at=created,
            expires_at=expires_at(created, days),
            input_size=len(MARKER),
            output_size=14,
            wrapped_key=sealed.wrapped_key,
            kek_id=sealed.kek_id,
            sealed=sealed.sealed,
        )
    )
    return capture_id


def test_the_store_lists_metadata_newest_first_within_bounds(store: MetadataStore) -> None:
    captures = CaptureStore(store)
    old = _stored(store, "iris", NOW - timedelta(hours=2), 1)
    new = _stored(store, "iris", NOW, 1)
    _stored(store, "other", NOW, 1)
    generation = store.generation()

    assert [new, old] == [c.id for c in captures.find("iris")]
    assert [new] == [c.id for c in captures.find("iris", since=NOW - timedelta(hours=1))]
    assert [old] == [c.id for c in captures.find("iris", until=NOW)]
    assert [new] == [c.id for c in captures.find("iris", limit=1)]
    listed = captures.find("iris")[0]
    assert (3, "consumer1234", len(MARKER), 14) == (
        listed.version,
        listed.principal,
        listed.input_size,
        listed.output_size,
    )
    assert listed.sealed_size > len(MARKER)
    # Captures are not snapshot data: workers are not told to reload.
    assert generation == store.generation()


def test_the_store_returns_one_record_of_its_model_only(store: MetadataStore) -> None:
    captures = CaptureStore(store)
    capture_id = _stored(store, "iris", NOW, 1)

    info, wrapped, sealed = captures.get("iris", capture_id)

    assert (capture_id, "iris") == (info.id, info.model)
    assert len(sealed) == info.sealed_size
    assert wrapped
    with pytest.raises(NotFound):
        captures.get("other", capture_id)
    with pytest.raises(NotFound):
        captures.get("iris", new_capture_id())


def test_purge_removes_exactly_the_expired_records(store: MetadataStore) -> None:
    captures = CaptureStore(store)
    expired = _stored(store, "iris", NOW - timedelta(days=3), 2)
    at_the_edge = _stored(store, "iris", NOW - timedelta(days=1), 1)
    kept = _stored(store, "iris", NOW - timedelta(days=1), 30)

    purged = captures.purge(NOW)

    assert purged == 2
    assert [kept] == [c.id for c in captures.find("iris")]
    for gone in (expired, at_the_edge):
        with pytest.raises(NotFound):
            captures.get("iris", gone)
    assert captures.purge(NOW) == 0
