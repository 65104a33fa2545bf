"""Re-wrapping every version's data key under the current KEK: resumable, idempotent, honest.

A small in-test key service holds a ring of AES-GCM KEKs, so rotation, retirement and a key
service that fails mid-pass can be staged without a server (the real ones are in
tests/integration/test_key_services.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelkeep.audit.capture import CaptureRecord, open_record, seal_record
from modelkeep.errors import IntegrityError, KeyServiceError
from modelkeep.registry.blobs import FileBlobStore
from modelkeep.registry.registry import Registry
from modelkeep.registry.rotation import KeyRotation
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.store.captures import CaptureStore, NewCapture
from modelkeep.store.metadata import MetadataStore, VersionDetails

SIG = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("label", "INT64", (-1,)),)
)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


class RingKeyService:
    """KEKs k1, k2, ... ; wrapped = key number (1 byte) || nonce || AES-GCM(data key, context)."""

    def __init__(self) -> None:
        self.ring: dict[int, AESGCM] = {1: AESGCM(os.urandom(32))}
        self.current = 1
        self.fail_after: int | None = None  # rewraps before the service "goes down"
        self.rewraps = 0

    @property
    def key_id(self) -> str:
        return f"ring:k{self.current}"

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        aead = self.ring[self.current]
        return bytes([self.current]) + nonce + aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        aead = self.ring.get(wrapped[0])
        if aead is None:
            raise KeyServiceError("the key service no longer has that key")
        try:
            return aead.decrypt(wrapped[1:13], wrapped[13:], context)
        except InvalidTag:
            raise IntegrityError("data key failed verification") from None

    def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        if self.fail_after is not None and self.rewraps >= self.fail_after:
            raise KeyServiceError("the key service is unreachable", retry_after=5)
        self.rewraps += 1
        return self.wrap(self.unwrap(wrapped, context), context)

    def rotate(self, *, new_key: bool) -> str:
        if new_key:
            self.current += 1
            self.ring[self.current] = AESGCM(os.urandom(32))
        return self.key_id

    def close(self) -> None:
        pass


@pytest.fixture
def store(database_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(database_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def keys() -> RingKeyService:
    return RingKeyService()


@pytest.fixture
def registry(store: MetadataStore, keys: RingKeyService, tmp_path: Path) -> Registry:
    registry = Registry(store, FileBlobStore(tmp_path / "blobs"), keys, clock=lambda: NOW)
    for model in ("a", "b", "c"):
        store.put_model(model, actor="t", now=NOW)
        registry.add_version(
            model, f"bytes of {model}".encode(), VersionDetails("onnx", SIG), uploaded_by="t"
        )
    return registry


def _open_all(registry: Registry) -> list[bytes]:
    snapshot = registry.store.snapshot()
    return [registry.open_version(snapshot.models[m].versions[1]) for m in ("a", "b", "c")]


def test_rewrap_moves_every_version_to_the_new_kek_and_blobs_still_open(
    registry: Registry, keys: RingKeyService
) -> None:
    rotation = KeyRotation(registry.store, keys)
    assert rotation.counts() == {"ring:k1": 3}
    keys.rotate(new_key=True)
    done = rotation.rewrap(limit=10)
    assert (done.key_id, done.rewrapped, done.remaining, done.after) == (
        "ring:k2",
        [("a", 1), ("b", 1), ("c", 1)],
        0,
        None,
    )
    assert rotation.counts() == {"ring:k2": 3}
    del keys.ring[1]  # the old KEK retired: nothing needs it any more
    assert _open_all(registry) == [b"bytes of a", b"bytes of b", b"bytes of c"]


def test_a_pass_stopped_by_an_outage_writes_nothing_and_the_next_one_finishes(
    registry: Registry, keys: RingKeyService
) -> None:
    rotation = KeyRotation(registry.store, keys)
    keys.rotate(new_key=True)
    keys.fail_after = 1
    with pytest.raises(KeyServiceError, match="unreachable"):
        rotation.rewrap(limit=10)
    assert rotation.counts() == {"ring:k1": 3}
    keys.fail_after = None
    first = rotation.rewrap(limit=2)
    assert (len(first.rewrapped), first.remaining, first.after is not None) == (2, 1, True)
    rest = rotation.rewrap(limit=2, after=first.after or 0)
    assert (rest.rewrapped, rest.remaining) == ([("c", 1)], 0)
    # Running it again is a no-op: idempotent per version.
    assert (rotation.rewrap(limit=10).rewrapped, rotation.counts().get("ring:k1", 0)) == ([], 0)


def test_a_version_whose_kek_is_gone_is_reported_and_refused_at_load(
    registry: Registry, keys: RingKeyService
) -> None:
    keys.rotate(new_key=True)
    rotation = KeyRotation(registry.store, keys)
    rotation.rewrap(limit=2)  # a and b move to k2; c stays under k1
    del keys.ring[1]
    done = rotation.rewrap(limit=10)
    assert (
        done.rewrapped,
        [(r.model, r.version) for r in done.refused],
        done.remaining,
    ) == ([], [("c", 1)], 1)
    version = registry.store.snapshot().models["c"].versions[1]
    with pytest.raises(KeyServiceError, match="model 'c' version 1 cannot be loaded") as refused:
        registry.open_version(version)
    assert refused.value.retry_after is None


def test_a_concurrent_change_to_a_wrapped_key_is_not_overwritten(
    registry: Registry, keys: RingKeyService, store: MetadataStore
) -> None:
    """Each row is updated only if it still holds the wrapped key the pass started from."""
    import sqlalchemy as sa

    from modelkeep.store import schema as t

    keys.rotate(new_key=True)
    original = keys.rewrap

    def rewrap_and_race(wrapped: bytes, context: bytes) -> bytes:
        new = original(wrapped, context)
        with store.engine.begin() as conn:  # another pass got there first for this row
            conn.execute(
                sa.update(t.versions)
                .where(t.versions.c.wrapped_key == wrapped)
                .values(wrapped_key=new, kek_id="ring:k2")
            )
        return original(wrapped, context)

    keys.rewrap = rewrap_and_race  # type: ignore[method-assign]
    done = KeyRotation(store, keys).rewrap(limit=10)
    assert (done.rewrapped, KeyRotation(store, keys).counts()) == ([], {"ring:k2": 3})
    assert _open_all(registry) == [b"bytes of a", b"bytes of b", b"bytes of c"]


# -- captured payloads: sealed under data keys of their own, re-wrapped after the versions -------


def _capture(registry: Registry, keys: RingKeyService, model: str, capture_id: str) -> None:
    record = CaptureRecord(
        request_sha256="0" * 64,
        request_id=None,
        principal="k",
        model=model,
        version=1,
        time=NOW,
        input=f"in {capture_id}".encode(),
        output=b"out",
    )
    sealed = seal_record(record, capture_id, keys)
    CaptureStore(registry.store).add(
        NewCapture(
            id=capture_id,
            model=model,
            version=1,
            principal="k",
            created_at=NOW,
            expires_at=NOW + timedelta(days=1),
            input_size=len(record.input),
            output_size=3,
            wrapped_key=sealed.wrapped_key,
            kek_id=sealed.kek_id,
            sealed=sealed.sealed,
        )
    )


def _open_captures(registry: Registry, keys: RingKeyService) -> list[bytes]:
    captures = CaptureStore(registry.store)
    opened = []
    for model, capture_id in (("a", "c1"), ("a", "c2"), ("b", "c3")):
        _, wrapped, sealed = captures.get(model, capture_id)
        opened.append(open_record(model, capture_id, wrapped, sealed, keys).input)
    return opened


def test_rewrap_moves_captured_payloads_after_the_versions_and_they_still_open(
    registry: Registry, keys: RingKeyService
) -> None:
    for model, capture_id in (("a", "c1"), ("a", "c2"), ("b", "c3")):
        _capture(registry, keys, model, capture_id)
    rotation = KeyRotation(registry.store, keys)
    assert rotation.capture_counts() == {"ring:k1": 3}
    keys.rotate(new_key=True)
    # Two rows a pass: versions a and b; then c and the first capture; then the other two;
    # a full pass hands on a cursor, so one more finds nothing left.
    passes = []
    after: int | None = 0
    capture_after: str | None = ""
    while after is not None or capture_after is not None:
        done = rotation.rewrap(limit=2, after=after, capture_after=capture_after)
        passes.append((done.rewrapped, done.rewrapped_captures, done.remaining_captures))
        after, capture_after = done.after, done.capture_after
    assert passes == [
        ([("a", 1), ("b", 1)], [], 3),
        ([("c", 1)], ["c1"], 2),
        ([], ["c2", "c3"], 0),
        ([], [], 0),
    ]
    assert rotation.capture_counts() == {"ring:k2": 3}
    del keys.ring[1]  # the old KEK retired: every capture still opens
    assert _open_captures(registry, keys) == [b"in c1", b"in c2", b"in c3"]


def test_a_capture_whose_kek_is_gone_is_refused_and_the_rest_move(
    registry: Registry, keys: RingKeyService
) -> None:
    _capture(registry, keys, "a", "c1")
    keys.rotate(new_key=True)
    del keys.ring[1]  # c1's KEK retired before the rotation finished
    _capture(registry, keys, "b", "c2")
    keys.rotate(new_key=True)
    done = KeyRotation(registry.store, keys).rewrap(limit=10, after=None)
    assert (done.rewrapped, done.rewrapped_captures) == ([], ["c2"])
    assert [(r.model, r.capture) for r in done.refused] == [("a", "c1")]
    assert (done.remaining_captures, done.capture_after) == (1, None)
    with pytest.raises(KeyServiceError):
        _open_captures(registry, keys)
