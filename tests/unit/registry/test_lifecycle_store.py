"""The lifecycle tables on SQLite and on PostgreSQL: history, evaluations, change requests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelkeep.crypto import InMemoryKeyService
from modelkeep.errors import Conflict
from modelkeep.registry.blobs import FileBlobStore
from modelkeep.registry.registry import Registry
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.store.metadata import (
    ChangeRequest,
    LifecycleStore,
    MetadataStore,
    StaleChange,
    VersionDetails,
)

SIG = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("label", "INT64", (-1,)),)
)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.fixture
def stores(database_url: str, tmp_path: Path) -> Iterator[tuple[MetadataStore, LifecycleStore]]:
    store = MetadataStore(database_url)
    store.migrate()
    store.put_model("iris", actor="k1", now=NOW)
    registry = Registry(store, FileBlobStore(tmp_path / "b"), InMemoryKeyService())
    for data in (b"one", b"two", b"three"):
        registry.add_version("iris", data, VersionDetails("onnx", SIG), uploaded_by="pub")
    yield store, LifecycleStore(store)
    store.close()


def change(
    label: str, version: int, previous: int | None, change_id: str = "a" * 32
) -> ChangeRequest:
    return ChangeRequest(
        id=change_id,
        model="iris",
        label=label,
        kind="set",
        version=version,
        previous=previous,
        new_approvals=None,
        approvals_needed=1,
        requester="pub",
        pusher="pub",
        status="pending",
        reason=None,
        created_at=NOW,
        expires_at=NOW + timedelta(days=1),
        decided_by=None,
        decided_at=None,
    )


def test_every_label_move_is_kept_in_order(stores: tuple[MetadataStore, LifecycleStore]) -> None:
    store, lifecycle = stores
    store.set_label("iris", "production", 1, actor="a", now=NOW)
    store.set_label("iris", "production", 2, actor="b", now=NOW)
    store.set_label("iris", "staging", 3, actor="c", now=NOW)
    store.delete_label("iris", "staging", actor="d", now=NOW)
    moves = [(m.label, m.version, m.previous, m.kind, m.actor) for m in lifecycle.history("iris")]
    assert moves == [
        ("production", 1, None, "set", "a"),
        ("production", 2, 1, "set", "b"),
        ("staging", 3, None, "set", "c"),
        ("staging", None, 3, "delete", "d"),
    ]
    assert len(lifecycle.history("iris", "production")) == 2


def test_a_change_applies_once_and_only_where_the_label_still_is(
    stores: tuple[MetadataStore, LifecycleStore],
) -> None:
    store, lifecycle = stores
    store.set_label("iris", "production", 1, actor="a", now=NOW)
    lifecycle.protect("iris", "production", 1, actor="a", now=NOW)
    assert lifecycle.protections("iris") == {"production": 1}
    good, stale = change("production", 2, 1), change("production", 3, 1, "b" * 32)
    lifecycle.add_change(good)
    lifecycle.add_change(stale)
    assert lifecycle.approve(good.id, "appr", now=NOW) == 1
    with pytest.raises(Conflict):
        lifecycle.approve(good.id, "appr", now=NOW)
    generation = store.generation()
    lifecycle.apply_change(good, by="appr", now=NOW)
    assert store.generation() > generation  # workers see the move
    assert store.snapshot().models["iris"].labels["production"] == 2
    with pytest.raises(Conflict):
        lifecycle.apply_change(good, by="appr", now=NOW)
    with pytest.raises(StaleChange):
        lifecycle.apply_change(stale, by="appr", now=NOW)
    assert store.snapshot().models["iris"].labels["production"] == 2
    assert lifecycle.change(good.id).status == "applied"
    assert lifecycle.change(good.id).approvals == ("appr",)
    assert lifecycle.history("iris", "production")[-1].change_id == good.id
    assert lifecycle.decide(stale.id, "rejected", by="x", now=NOW, reason="no")
    assert not lifecycle.decide(stale.id, "expired", by="x", now=NOW)


def test_evaluations_are_kept_per_version_and_set(
    stores: tuple[MetadataStore, LifecycleStore],
) -> None:
    _, lifecycle = stores
    lifecycle.save_evaluation(
        "iris", 1, "f" * 64, status="done", metrics={"accuracy": 0.5}, error=None, now=NOW
    )
    lifecycle.save_evaluation(
        "iris", 1, "f" * 64, status="done", metrics={"accuracy": 0.75}, error=None, now=NOW
    )
    lifecycle.save_evaluation("iris", 2, "e" * 64, status="error", metrics=None, error="x", now=NOW)
    found = lifecycle.evaluations("iris", "f" * 64)
    assert {n: e.metrics for n, e in found.items()} == {1: {"accuracy": 0.75}}
    assert lifecycle.evaluations("iris", "e" * 64)[2].error == "x"


def test_a_protected_label_never_moves_or_goes_by_the_plain_calls(
    stores: tuple[MetadataStore, LifecycleStore],
) -> None:
    store, lifecycle = stores
    store.set_label("iris", "production", 1, actor="a", now=NOW)
    lifecycle.protect("iris", "production", 2, actor="a", now=NOW)
    with pytest.raises(Conflict, match="protected"):
        store.set_label("iris", "production", 2, actor="a", now=NOW)
    with pytest.raises(Conflict, match="protected"):
        store.delete_label("iris", "production", actor="a", now=NOW)
    lifecycle.protect("iris", "production", 0, actor="a", now=NOW)
    store.set_label("iris", "production", 2, actor="a", now=NOW)
    assert store.snapshot().models["iris"].labels["production"] == 2
