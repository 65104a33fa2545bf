"""Loading a version: decrypted and hashed once, the signature checked over that digest.

Whatever fails (a tampered segment, a digest that does not match, a signature that does not
verify or was made by another key, a missing one the model requires) fails the load with the
same clear error as before the load path was made to stream.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from modelkeep.crypto import InMemoryKeyService
from modelkeep.crypto.sealed import SEGMENT_SIZE
from modelkeep.crypto.signing import (
    TrustedKey,
    generate_signing_key,
    load_public_key,
    sign_path,
)
from modelkeep.errors import IntegrityError
from modelkeep.registry.blobs import FileBlobStore
from modelkeep.registry.records import VersionRecord
from modelkeep.registry.registry import Registry
from modelkeep.registry.upload import Upload
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.store.metadata import MetadataStore, VersionDetails

SIG = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("label", "INT64", (-1,)),)
)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
# Three and a half segments: the segment boundaries, and a short last segment.
DATA = bytes(range(256)) * (7 * SEGMENT_SIZE // 512)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    store = MetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    store.migrate()
    store.put_model("m", actor="k1", now=NOW)
    blobs = FileBlobStore(tmp_path / "blobs")
    yield Registry(store, blobs, InMemoryKeyService(), clock=lambda: NOW)
    store.close()


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrustedKey, bytes, Path]:
    """A trusted key, and its signature over DATA saved as ``model.bin``."""
    folder = tmp_path_factory.mktemp("publisher")
    trusted = generate_signing_key(folder / "p.key", folder / "p.pub")
    (folder / "model.bin").write_bytes(DATA)
    sign_path(folder / "model.bin", folder / "p.key", folder / "model.sig")
    return trusted, (folder / "model.sig").read_bytes(), folder


def pushed(registry: Registry, data: bytes, **details: object) -> VersionRecord:
    number = registry.add_version(
        "m", data, VersionDetails("onnx", SIG, file_name="model.bin", **details), uploaded_by="k1"
    )  # type: ignore[arg-type]
    return registry.store.snapshot().models["m"].versions[number]


def test_open_version_returns_the_plaintext_across_segments(registry: Registry) -> None:
    version = pushed(registry, DATA)
    opened = registry.open_version(version)
    assert type(opened) is bytes
    assert opened == DATA
    assert registry.open_version(pushed(registry, b"")) == b""


def test_open_version_holds_the_plaintext_once(registry: Registry) -> None:
    """Each segment is appended to the one buffer returned: no copy of the whole into ``bytes``
    (that would need about twice the size). Beside it: the sealed bytes read ahead (four
    segments), the segment being decrypted, its copy being appended and the one before being
    hashed, and the buffer's headroom as it grows."""
    data = DATA * 8  # 28 MiB
    version = pushed(registry, data)
    tracemalloc.start()
    try:
        opened = registry.open_version(version)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hashlib.sha256(opened).hexdigest() == version.sha256
    assert peak < len(data) + 12 * SEGMENT_SIZE, f"peak {peak} for {len(data)} bytes"


def _tar(files: dict[str, bytes]) -> bytes:
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return packed.getvalue()


def test_a_directory_version_streams_and_holds_only_its_model_file(registry: Registry) -> None:
    """The tar streams from the sealed blob: the model file is written out as it passes, the
    other files (a 40 MiB one here) are only hashed, never held. Beside the model: the sealed
    bytes read ahead (four segments and the one being read), the segment being decrypted and
    the two plaintext buffers, the buffered reader under tarfile and tarfile's own pieces."""
    model, weights = DATA[: SEGMENT_SIZE // 2], bytes(40 * SEGMENT_SIZE)
    packed = _tar({"weights.bin": weights, "model.bin": model, "README": b"notes"})
    version = pushed(registry, packed, layout="directory")
    into = io.BytesIO()
    tracemalloc.start()
    try:
        registry.read_verified(version, [], require_signature=False, into=into)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert into.getvalue() == model
    assert peak < len(model) + 16 * SEGMENT_SIZE, f"peak {peak} for a {len(packed)}-byte tar"


def test_a_directory_version_tampered_after_its_model_file_fails_the_load(
    registry: Registry,
) -> None:
    packed = _tar({"model.bin": b"m" * 1000, "weights.bin": bytes(3 * SEGMENT_SIZE)})
    version = pushed(registry, packed, layout="directory")
    assert isinstance(registry.blobs, FileBlobStore)
    path = registry.blobs._path(version.blob_key)
    sealed = bytearray(path.read_bytes())
    sealed[2 * SEGMENT_SIZE + 100] ^= 1  # inside the weights, after the model file
    path.write_bytes(bytes(sealed))
    with pytest.raises(IntegrityError, match="failed integrity verification"):
        registry.read_verified(version, [], require_signature=False, into=io.BytesIO())


def test_a_tampered_segment_fails_the_load(registry: Registry) -> None:
    version = pushed(registry, DATA)
    assert isinstance(registry.blobs, FileBlobStore)
    path = registry.blobs._path(version.blob_key)
    sealed = bytearray(path.read_bytes())
    sealed[2 * SEGMENT_SIZE + 100] ^= 1  # inside the third segment
    path.write_bytes(bytes(sealed))
    with pytest.raises(IntegrityError) as info:
        registry.open_verified(version, [], require_signature=False)
    assert (
        info.value.message
    ) == "model 'm' version 1 failed integrity verification and will not be loaded"


def test_a_plaintext_with_another_digest_than_recorded_fails_the_load(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sealed under the recorded digest (so every segment authenticates), but the plaintext
    # hashes to something else: only the digest check can catch it.
    monkeypatch.setattr(Upload, "sha256", property(lambda self: "ab" * 32))
    version = pushed(registry, DATA)
    monkeypatch.undo()
    assert version.sha256 == "ab" * 32
    with pytest.raises(IntegrityError) as info:
        registry.open_verified(version, [], require_signature=False)
    assert (
        info.value.message
    ) == "model 'm' version 1 failed integrity verification and will not be loaded"


def test_a_signed_version_loads_and_its_signature_is_checked_over_the_digest(
    registry: Registry, publisher: tuple[TrustedKey, bytes, Path]
) -> None:
    trusted, bundle, _ = publisher
    version = pushed(registry, DATA, signer=trusted.fingerprint, bundle=bundle)
    assert registry.open_verified(version, [trusted], require_signature=True) == DATA


def test_a_signature_that_does_not_verify_fails_the_load(
    registry: Registry, publisher: tuple[TrustedKey, bytes, Path], tmp_path: Path
) -> None:
    trusted, bundle, _ = publisher
    # The bundle is the publisher's, over DATA; the version holds other bytes.
    other = pushed(registry, DATA[::-1], signer=trusted.fingerprint, bundle=bundle)
    with pytest.raises(IntegrityError) as info:
        registry.open_verified(other, [trusted], require_signature=True)
    assert info.value.message == "model 'm' version 1 failed signature verification at load"
    # A publisher no longer trusted: the same refusal.
    signed = pushed(registry, DATA, signer=trusted.fingerprint, bundle=bundle)
    stranger = generate_signing_key(tmp_path / "s.key", tmp_path / "s.pub")
    with pytest.raises(IntegrityError) as info:
        registry.open_verified(signed, [stranger], require_signature=True)
    assert info.value.message == "model 'm' version 2 failed signature verification at load"


def test_a_signature_by_another_key_than_recorded_fails_the_load(
    registry: Registry, publisher: tuple[TrustedKey, bytes, Path], tmp_path: Path
) -> None:
    trusted, bundle, _ = publisher
    other = load_public_key(generate_signing_key(tmp_path / "o.key", tmp_path / "o.pub").pem)
    version = pushed(registry, DATA, signer=other.fingerprint, bundle=bundle)
    with pytest.raises(IntegrityError) as info:
        registry.open_verified(version, [trusted, other], require_signature=True)
    assert (
        info.value.message
    ) == "model 'm' version 1 is signed by a key other than the one recorded"


def test_an_unsigned_version_fails_the_load_when_its_model_requires_a_signature(
    registry: Registry,
) -> None:
    version = pushed(registry, DATA)
    assert registry.open_verified(version, [], require_signature=False) == DATA
    with pytest.raises(IntegrityError) as info:
        registry.open_verified(version, [], require_signature=True)
    assert (info.value.message) == "model 'm' version 1 has no signature but its model requires one"
