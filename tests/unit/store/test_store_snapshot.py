"""The snapshot every worker serves from is one consistent read, on SQLite and PostgreSQL.

``snapshot()`` reads nine tables in nine statements. A write committed by another connection
between two of them must be seen entirely or not at all: every write bumps ``state.generation``
in its own transaction, so seeing the change without the bump (or the bump without the change)
is half a write, and a worker would hold it as that generation until the next change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from modelkeep.auth.apikeys import KeyRecord
from modelkeep.crypto import InMemoryKeyService
from modelkeep.registry.blobs import InMemoryBlobStore
from modelkeep.registry.records import Snapshot
from modelkeep.registry.registry import Registry
from modelkeep.runtime.signature import ModelSignature
from modelkeep.store.metadata import MetadataStore, VersionDetails

NOW = datetime(2026, 12, 6, tzinfo=UTC)
DETAILS = VersionDetails(format="onnx", signature=ModelSignature((), ()))
KEY = KeyRecord("newkey000001", "00" * 32, "consumer", None, "", NOW, None, None)

# Before the snapshot's statement reading this table, another connection commits this write.
WRITES: dict[str, Callable[[MetadataStore], object]] = {
    "models": lambda other: other.put_model("b", actor="a", now=NOW),
    "labels": lambda other: other.set_label("a", "production", 2, actor="a", now=NOW),
    "api_keys": lambda other: other.create_key(KEY, created_by="a"),
    "drift_configs": lambda other: other.set_drift("a", '{"psi": 0.2}', actor="a", now=NOW),
}


@pytest.fixture
def store(database_url: str) -> Iterator[MetadataStore]:
    store = MetadataStore(database_url)
    try:
        store.migrate()
        store.put_model("a", actor="a", now=NOW)
        registry = Registry(store, InMemoryBlobStore(), InMemoryKeyService())
        for _ in range(2):
            registry.add_version("a", b"model bytes", DETAILS, uploaded_by="a")
        store.set_label("a", "production", 1, actor="a", now=NOW)
        yield store
    finally:
        store.close()


def snapshot_with_a_write_before(
    store: MetadataStore, table: str, write: Callable[[MetadataStore], object]
) -> Snapshot:
    """``store.snapshot()``, with ``write`` committed from another connection just before the
    statement reading ``table`` runs."""
    other = MetadataStore(str(store.engine.url.render_as_string(hide_password=False)))
    reads_table = re.compile(rf"\bFROM {table}\b")
    injected: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not injected and reads_table.search(statement):
            injected.append(statement)
            write(other)

    sa.event.listen(store.engine, "before_cursor_execute", before)
    try:
        snapshot = store.snapshot()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", before)
        other.close()
    assert len(injected) == 1, "the write was not injected"
    return snapshot


@pytest.mark.parametrize("table", list(WRITES))
def test_a_write_committed_between_the_snapshots_reads_is_seen_whole_or_not_at_all(
    store: MetadataStore, table: str
) -> None:
    before = store.snapshot()

    during = snapshot_with_a_write_before(store, table, WRITES[table])

    after = store.snapshot()
    assert after.generation == before.generation + 1
    assert after != before
    assert during in (before, after)


def test_the_snapshot_reads_from_its_first_statement_on(store: MetadataStore) -> None:
    """The read is fixed by its first statement: a write after that is not seen at all."""
    before = store.snapshot()

    during = snapshot_with_a_write_before(store, "drift_configs", WRITES["drift_configs"])

    assert before == during
    assert store.snapshot().models["a"].drift == '{"psi": 0.2}'


def test_the_snapshots_isolation_stays_with_the_snapshot(postgres_url: str) -> None:
    """Writers get the pooled connection back as READ COMMITTED and writable (PostgreSQL)."""
    store = MetadataStore(postgres_url)
    try:
        store.migrate()
        store.snapshot()
        with store.engine.connect() as conn:
            isolation = conn.exec_driver_sql("SHOW transaction_isolation").scalar_one()
            read_only = conn.exec_driver_sql("SHOW transaction_read_only").scalar_one()
        assert (isolation, read_only) == ("read committed", "off")
        assert store.engine.pool.checkedin() == 1  # the very connection the snapshot used
        store.put_model("a", actor="a", now=NOW)
    finally:
        store.close()
