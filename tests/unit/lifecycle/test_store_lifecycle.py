"""The store's lifecycle writes on SQLite and the real PostgreSQL: the migration matches the
schema module, shredding is one transaction that refuses labelled or deleted versions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from modelkeep.crypto import InMemoryKeyService
from modelkeep.errors import Conflict, NotFound
from modelkeep.registry.blobs import InMemoryBlobStore
from modelkeep.registry.registry import Registry
from modelkeep.runtime.signature import ModelSignature
from modelkeep.store import schema as t
from modelkeep.store.metadata import MetadataStore, VersionDetails

NOW = datetime(2026, 12, 6, tzinfo=UTC)
DETAILS = VersionDetails(format="onnx", signature=ModelSignature((), ()), lineage='{"tags": {}}')


@pytest.fixture
def store(database_url: str) -> Iterator[MetadataStore]:
    store = MetadataStore(database_url)
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def test_the_migrated_schema_has_the_lifecycle_tables_and_columns(store: MetadataStore) -> None:
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), t.metadata)
    ours = {"retention_rules", "drift_configs", "lineage", "deleted_at", "deleted_by"}
    assert [d for d in diffs if any(name in repr(d) for name in ours)] == []
    inspector = sa.inspect(store.engine)
    assert {"retention_rules", "drift_configs"} <= set(inspector.get_table_names())


def test_shredding_refuses_labels_and_repeats_and_empties_the_key(store: MetadataStore) -> None:
    registry = Registry(store, InMemoryBlobStore(), InMemoryKeyService())
    store.put_model("m", actor="a", now=NOW)
    for _ in range(2):
        registry.add_version("m", b"model bytes", DETAILS, uploaded_by="a")
    store.set_label("m", "production", 2, actor="a", now=NOW)
    with pytest.raises(Conflict, match="production"):
        store.shred_version("m", 2, actor="a", now=NOW)
    shredded = store.shred_version("m", 1, actor="a", now=NOW)
    assert shredded.number == 1
    with pytest.raises(Conflict, match="already deleted"):
        store.shred_version("m", 1, actor="a", now=NOW)
    with pytest.raises(NotFound):
        store.shred_version("m", 3, actor="a", now=NOW)
    with pytest.raises(NotFound):
        store.set_label("m", "staging", 1, actor="a", now=NOW)
    with store.engine.connect() as conn:
        key = conn.execute(
            sa.select(t.versions.c.wrapped_key).where(t.versions.c.number == 1)
        ).scalar_one()
    assert bytes(key) == b""
    model = store.snapshot().models["m"]
    assert (sorted(model.versions), sorted(model.deleted)) == ([2], [1])
    assert model.versions[2].lineage == '{"tags": {}}'
    assert shredded.blob_key not in store.blob_keys()

    versions, captures = store.shred_model("m", actor="a", now=NOW)
    assert ([v.number for v in versions], captures) == ([2], 0)
    assert "m" not in store.snapshot().models
    with pytest.raises(NotFound):
        store.shred_model("m", actor="a", now=NOW)
    with pytest.raises(Conflict, match="reserved"):
        store.put_model("m", actor="a", now=NOW)


def test_retention_rules_round_trip(store: MetadataStore) -> None:
    store.put_model("m", actor="a", now=NOW)
    store.set_retention("m", keep_versions=2, capture_days=None, actor="a", now=NOW)
    assert [(r.model, r.keep_versions, r.capture_days) for r in store.retention_rules()] == [
        ("m", 2, None)
    ]
    store.set_retention("m", keep_versions=None, capture_days=None, actor="a", now=NOW)
    assert store.retention_rules() == []
