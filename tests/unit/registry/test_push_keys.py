"""Idempotency keys of pushes, on SQLite and on PostgreSQL: one key, one version, ever."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelkeep.crypto import InMemoryKeyService
from modelkeep.errors import Conflict
from modelkeep.registry.blobs import FileBlobStore
from modelkeep.registry.registry import Registry
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.store.metadata import MetadataStore, PushKey, VersionDetails

SIG = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("label", "INT64", (-1,)),)
)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Registry:
    store = MetadataStore(database_url)
    store.migrate()
    store.put_model("iris", actor="k1", now=NOW)
    yield Registry(
        store, FileBlobStore(tmp_path / "blobs"), InMemoryKeyService(), clock=lambda: NOW
    )
    store.close()


def key(request: str = "r1", *, principal: str = "k1", name: str = "key-0001") -> PushKey:
    return PushKey(principal=principal, key=name, request_sha256=request * 32, expires_at=LATER)


def add(registry: Registry, data: bytes, push_key: PushKey | None) -> int:
    return registry.add_version(
        "iris", data, VersionDetails("onnx", SIG), uploaded_by="k1", push_key=push_key
    )


def blobs(registry: Registry) -> set[str]:
    return set(registry.blobs.keys())


def test_a_repeated_key_returns_the_first_version_and_keeps_one_blob(registry: Registry) -> None:
    assert add(registry, b"model", key()) == 1
    first_blobs = blobs(registry)
    assert add(registry, b"model", key()) == 1
    assert sorted(registry.store.snapshot().models["iris"].versions) == [1]
    assert blobs(registry) == first_blobs
    assert registry.pushed_with("iris", key()) == 1


def test_a_repeated_key_with_another_request_is_a_conflict_and_stores_nothing(
    registry: Registry,
) -> None:
    add(registry, b"model", key("r1"))
    before = blobs(registry)
    with pytest.raises(Conflict, match="already used for a different upload"):
        add(registry, b"other model", key("r2"))
    with pytest.raises(Conflict, match="already used for a different upload"):
        registry.pushed_with("iris", key("r2"))
    assert sorted(registry.store.snapshot().models["iris"].versions) == [1]
    assert blobs(registry) == before


def test_keys_belong_to_one_caller_and_one_model(registry: Registry) -> None:
    registry.store.put_model("other", actor="k1", now=NOW)
    assert add(registry, b"model", key()) == 1
    assert add(registry, b"model", key(principal="k2")) == 2
    assert (
        registry.add_version(
            "other", b"model", VersionDetails("onnx", SIG), uploaded_by="k1", push_key=key()
        )
        == 1
    )
    assert registry.pushed_with("iris", key(principal="k3")) is None


def test_an_expired_key_is_forgotten(registry: Registry) -> None:
    expired = PushKey(principal="k1", key="key-0001", request_sha256="a" * 64, expires_at=NOW)
    assert add(registry, b"model", expired) == 1
    assert registry.pushed_with("iris", expired) is None
    assert add(registry, b"model", key()) == 2
    assert registry.store.purge_push_keys(LATER + timedelta(seconds=1)) == 1


def test_concurrent_pushes_with_one_key_make_exactly_one_version(registry: Registry) -> None:
    results: list[int] = []
    barrier = threading.Barrier(6)

    def run() -> None:
        barrier.wait()
        results.append(add(registry, b"same model", key()))

    threads = [threading.Thread(target=run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [1] * 6
    assert sorted(registry.store.snapshot().models["iris"].versions) == [1]
    assert blobs(registry) == registry.store.blob_keys()
