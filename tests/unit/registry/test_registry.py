"""Registry behaviour on SQLite and on PostgreSQL: versions, labels, keys, atomicity, integrity."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelkeep.auth import KeyRecord
from modelkeep.crypto import InMemoryKeyService
from modelkeep.errors import Conflict, IntegrityError, InvalidInput, NotFound
from modelkeep.registry.blobs import FileBlobStore
from modelkeep.registry.registry import Registry
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.store.metadata import MetadataStore, VersionDetails

SIG = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("label", "INT64", (-1,)),)
)
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> MetadataStore:
    s = MetadataStore(database_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def registry(store: MetadataStore, tmp_path: Path) -> Registry:
    return Registry(
        store, FileBlobStore(tmp_path / "blobs"), InMemoryKeyService(), clock=lambda: NOW
    )


def push(registry: Registry, model: str, data: bytes) -> int:
    if model not in registry.store.snapshot().models:
        registry.store.put_model(model, actor="k1", now=NOW)
    return registry.add_version(model, data, VersionDetails("onnx", SIG), uploaded_by="k1")


def test_versions_are_numbered_from_one_and_recorded_with_digest(registry: Registry) -> None:
    assert [push(registry, "iris", b"a" * 10), push(registry, "iris", b"b" * 20)] == [1, 2]
    assert push(registry, "other", b"c") == 1
    snap = registry.store.snapshot()
    iris = snap.models["iris"]
    assert sorted(iris.versions) == [1, 2]
    v2 = iris.versions[2]
    assert (v2.sha256, v2.size, v2.signature, v2.uploaded_by, v2.created_at) == (
        hashlib.sha256(b"b" * 20).hexdigest(),
        20,
        SIG,
        "k1",
        NOW,
    )
    assert iris.created_by == "k1"
    assert iris.latest_version == 2


def test_open_version_returns_the_plaintext(registry: Registry) -> None:
    data = bytes(range(256)) * 5000
    push(registry, "iris", data)
    version = registry.store.snapshot().models["iris"].versions[1]
    assert registry.open_version(version) == data


def test_concurrent_pushes_get_unique_gapless_numbers(registry: Registry) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results.append(push(registry, "iris", f"model {i}".encode()))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == list(range(1, 13))
    versions = registry.store.snapshot().models["iris"].versions
    assert sorted(versions) == list(range(1, 13))
    # Every version opens and holds what was pushed under that number.
    contents = {registry.open_version(v) for v in versions.values()}
    assert contents == {f"model {i}".encode() for i in range(12)}


def test_blob_swapped_between_versions_fails_integrity(registry: Registry, tmp_path: Path) -> None:
    push(registry, "iris", b"version one" * 100)
    push(registry, "iris", b"version two" * 100)
    versions = registry.store.snapshot().models["iris"].versions
    blobs = registry.blobs
    assert isinstance(blobs, FileBlobStore)
    p1, p2 = blobs._path(versions[1].blob_key), blobs._path(versions[2].blob_key)
    one, two = p1.read_bytes(), p2.read_bytes()
    p1.write_bytes(two)
    p2.write_bytes(one)
    for number in (1, 2):
        with pytest.raises(IntegrityError) as info:
            registry.open_version(versions[number])
        assert info.value.message == (
            f"model 'iris' version {number} failed integrity verification and will not be loaded"
        )


def test_flipped_byte_and_missing_blob_fail_integrity(registry: Registry) -> None:
    push(registry, "iris", b"x" * 5000)
    version = registry.store.snapshot().models["iris"].versions[1]
    blobs = registry.blobs
    assert isinstance(blobs, FileBlobStore)
    path = blobs._path(version.blob_key)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        registry.open_version(version)
    path.unlink()
    with pytest.raises(IntegrityError):
        registry.open_version(version)


def test_unreferenced_blob_is_invisible_and_collected(registry: Registry) -> None:
    push(registry, "iris", b"kept")
    # A push that crashed after writing its blob but before its commit.
    registry.blobs.put("deadbeef" * 4, lambda out: out.write(b"orphan"))
    assert sorted(registry.store.snapshot().models["iris"].versions) == [1]
    assert registry.collect_garbage(grace_s=0) == 1
    assert list(registry.blobs.keys()) == [
        registry.store.snapshot().models["iris"].versions[1].blob_key
    ]


def test_failed_commit_leaves_no_version_and_no_blob(registry: Registry) -> None:
    with pytest.raises(InvalidInput):
        registry.add_version("Bad Name!", b"x", VersionDetails("onnx", SIG), uploaded_by="k1")
    # The model does not exist: the commit fails after the blob was written.
    with pytest.raises(NotFound):
        registry.add_version("ghost", b"x", VersionDetails("onnx", SIG), uploaded_by="k1")
    assert registry.store.snapshot().models == {}
    assert list(registry.blobs.keys()) == []


def test_version_details_round_trip(registry: Registry) -> None:
    registry.store.put_model("signed", actor="k1", now=NOW, description="d")
    details = VersionDetails(
        format="skops",
        signature=SIG,
        layout="directory",
        file_name="model.skops",
        signer="sha256:abcd",
        bundle=b"{bundle}",
        scan_report='{"verdict": "safe"}',
        trusted_types=("sklearn.linear_model.LogisticRegression",),
    )
    registry.add_version("signed", b"payload", details, uploaded_by="k1")
    v = registry.store.snapshot().models["signed"].versions[1]
    assert (
        v.format,
        v.layout,
        v.file_name,
        v.signer,
        v.bundle,
        v.scan_report,
        v.trusted_types,
    ) == (
        "skops",
        "directory",
        "model.skops",
        "sha256:abcd",
        b"{bundle}",
        '{"verdict": "safe"}',
        ("sklearn.linear_model.LogisticRegression",),
    )


def test_models_settings_and_publishers(store: MetadataStore) -> None:
    assert store.put_model("m", actor="admin", now=NOW, description="first") is True
    m = store.snapshot().models["m"]
    assert (m.description, m.require_signature, dict(m.publishers)) == ("first", True, {})
    assert store.put_model("m", actor="admin", now=NOW, require_signature=False) is False
    m = store.snapshot().models["m"]
    assert (m.description, m.require_signature) == ("first", False)
    store.add_publisher("m", "sha256:aa", "PEM-A", actor="admin", now=NOW)
    store.add_publisher("m", "sha256:aa", "PEM-A", actor="admin", now=NOW)  # idempotent
    store.add_publisher("m", "sha256:bb", "PEM-B", actor="admin", now=NOW)
    assert dict(store.snapshot().models["m"].publishers) == {
        "sha256:aa": "PEM-A",
        "sha256:bb": "PEM-B",
    }
    store.remove_publisher("m", "sha256:aa")
    assert dict(store.snapshot().models["m"].publishers) == {"sha256:bb": "PEM-B"}
    with pytest.raises(NotFound):
        store.remove_publisher("m", "sha256:aa")
    with pytest.raises(NotFound):
        store.add_publisher("nope", "sha256:aa", "PEM", actor="admin", now=NOW)


def test_labels_point_at_versions(store: MetadataStore, registry: Registry) -> None:
    push(registry, "iris", b"1")
    push(registry, "iris", b"2")
    store.set_label("iris", "production", 1, actor="k1", now=NOW)
    assert dict(store.snapshot().models["iris"].labels) == {"production": 1}
    assert store.snapshot().models["iris"].default_version() == 1
    store.set_label("iris", "production", 2, actor="k1", now=NOW)
    assert dict(store.snapshot().models["iris"].labels) == {"production": 2}
    with pytest.raises(NotFound):
        store.set_label("iris", "production", 9, actor="k1", now=NOW)
    with pytest.raises(NotFound):
        store.set_label("nope", "production", 1, actor="k1", now=NOW)
    store.delete_label("iris", "production")
    assert dict(store.snapshot().models["iris"].labels) == {}
    with pytest.raises(NotFound):
        store.delete_label("iris", "production")


def _key(key_id: str, **kw: object) -> KeyRecord:
    fields: dict[str, object] = {
        "key_id": key_id,
        "secret_hash": "0" * 64,
        "role": "consumer",
        "models": frozenset({"iris"}),
        "description": "d",
        "created_at": NOW,
        "expires_at": NOW + timedelta(days=1),
        "revoked_at": None,
    }
    fields.update(kw)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def test_keys_round_trip_and_revoke(store: MetadataStore) -> None:
    record = _key("aaaaaaaaaaaa")
    store.create_key(record, created_by="admin")
    assert store.snapshot().keys["aaaaaaaaaaaa"] == record
    with pytest.raises(Conflict):
        store.create_key(record, created_by="admin")
    store.revoke_key("aaaaaaaaaaaa", now=NOW)
    later = NOW + timedelta(hours=1)
    store.revoke_key("aaaaaaaaaaaa", now=later)  # idempotent: keeps the first time
    assert store.snapshot().keys["aaaaaaaaaaaa"].revoked_at == NOW
    with pytest.raises(NotFound):
        store.revoke_key("bbbbbbbbbbbb", now=NOW)
    unscoped = _key("cccccccccccc", models=None, expires_at=None, role="admin")
    store.create_key(unscoped, created_by="admin")
    assert store.snapshot().keys["cccccccccccc"] == unscoped


def test_every_write_bumps_the_generation(store: MetadataStore, registry: Registry) -> None:
    seen = [store.generation()]
    push(registry, "iris", b"1")
    seen.append(store.generation())
    store.set_label("iris", "production", 1, actor="k", now=NOW)
    seen.append(store.generation())
    store.create_key(_key("dddddddddddd"), created_by="admin")
    seen.append(store.generation())
    store.revoke_key("dddddddddddd", now=NOW)
    seen.append(store.generation())
    assert seen == sorted(set(seen))
    assert store.snapshot().generation == seen[-1]


def test_migrate_is_idempotent(store: MetadataStore) -> None:
    store.migrate()
    store.migrate()
    assert store.generation() == 0


def test_policies_and_key_restrictions(store: MetadataStore) -> None:
    store.put_model("m", actor="admin", now=NOW)
    assert store.snapshot().models["m"].policy is None
    store.set_policy("m", '{"output": "round=2"}', actor="admin", now=NOW)
    store.set_policy("m", '{"output": "top_k=1"}', actor="admin", now=NOW)
    assert store.snapshot().models["m"].policy == '{"output": "top_k=1"}'
    store.restrict_key("m", "k1", kind="throttle", reason="prada", now=NOW)
    store.restrict_key("m", "k1", kind="block", reason="prada again", now=NOW)
    store.restrict_key("m", "k1", kind="throttle", reason="never weakens", now=NOW)
    assert dict(store.snapshot().models["m"].restrictions) == {"k1": ("block", "prada again")}
    store.lift_restriction("m", "k1")
    assert dict(store.snapshot().models["m"].restrictions) == {}
    with pytest.raises(NotFound):
        store.lift_restriction("m", "k1")
    with pytest.raises(NotFound):
        store.set_policy("nope", "{}", actor="admin", now=NOW)
