"""Key services: wrap/unwrap of data keys, key ids, and the local key file's safety checks."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelkeep.crypto import InMemoryKeyService, KeyService, LocalKeyService, new_data_key
from modelkeep.errors import ConfigError, IntegrityError

FAILED = "data key failed verification"
CONTEXT = b"model=fraud;version=1"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_unwrap_returns_the_wrapped_data_key() -> None:
    service = InMemoryKeyService()
    data_key = new_data_key()
    assert data_key == service.unwrap(service.wrap(data_key, CONTEXT), CONTEXT)


def test_wrapped_format_is_version_byte_nonce_and_aes_gcm_with_context() -> None:
    kek = os.urandom(32)
    data_key = new_data_key()
    wrapped = InMemoryKeyService(kek).wrap(data_key, CONTEXT)
    assert wrapped[:1] == b"\x01"
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert data_key == AESGCM(kek).decrypt(wrapped[1:13], wrapped[13:], CONTEXT)


def test_wrapping_twice_uses_fresh_nonces() -> None:
    service = InMemoryKeyService()
    data_key = new_data_key()
    assert service.wrap(data_key, CONTEXT) != service.wrap(data_key, CONTEXT)


def test_key_id_is_a_truncated_domain_separated_hash_of_the_kek() -> None:
    kek = bytes(range(32))
    expected = hashlib.sha256(b"modelkeep/kek-id/v1" + kek).hexdigest()[:16]
    assert expected == InMemoryKeyService(kek).key_id


def test_different_keks_have_different_key_ids() -> None:
    assert InMemoryKeyService().key_id != InMemoryKeyService().key_id


def test_services_satisfy_the_key_service_protocol() -> None:
    assert isinstance(InMemoryKeyService(), KeyService)


def test_repr_shows_the_key_id_and_not_the_kek() -> None:
    kek = bytes(range(32))
    service = InMemoryKeyService(kek)
    assert f"InMemoryKeyService(key_id={service.key_id!r})" == repr(service)


def test_unwrap_under_another_kek_is_refused() -> None:
    wrapped = InMemoryKeyService().wrap(new_data_key(), CONTEXT)
    with pytest.raises(IntegrityError) as info:
        InMemoryKeyService().unwrap(wrapped, CONTEXT)
    assert info.value.message == FAILED


def test_unwrap_with_another_context_is_refused() -> None:
    service = InMemoryKeyService()
    wrapped = service.wrap(new_data_key(), CONTEXT)
    with pytest.raises(IntegrityError) as info:
        service.unwrap(wrapped, b"model=fraud;version=2")
    assert info.value.message == FAILED


@pytest.mark.parametrize("position", [0, 1, 12, 13, -1])
def test_unwrap_of_a_damaged_wrapped_key_is_refused(position: int) -> None:
    service = InMemoryKeyService()
    wrapped = bytearray(service.wrap(new_data_key(), CONTEXT))
    wrapped[position] ^= 0x80
    with pytest.raises(IntegrityError) as info:
        service.unwrap(bytes(wrapped), CONTEXT)
    assert info.value.message == FAILED


@pytest.mark.parametrize("wrapped", [b"", b"\x01", b"\x01" + bytes(28)])
def test_unwrap_of_a_too_short_input_is_refused(wrapped: bytes) -> None:
    with pytest.raises(IntegrityError) as info:
        InMemoryKeyService().unwrap(wrapped, CONTEXT)
    assert info.value.message == FAILED


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_a_kek_of_the_wrong_length_is_a_programming_error(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        InMemoryKeyService(os.urandom(length))


def test_create_writes_32_bytes_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        LocalKeyService.create(path)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert len(path.read_bytes()) == 32


def test_a_created_key_loads_and_unwraps_what_it_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    created = LocalKeyService.create(path)
    data_key = new_data_key()
    wrapped = created.wrap(data_key, CONTEXT)
    loaded = LocalKeyService.load(path)
    assert created.key_id == loaded.key_id
    assert data_key == loaded.unwrap(wrapped, CONTEXT)


def test_key_id_of_a_loaded_file_matches_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    LocalKeyService.create(path)
    assert InMemoryKeyService(path.read_bytes()).key_id == LocalKeyService.load(path).key_id


def test_create_refuses_to_overwrite_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        LocalKeyService.create(path)
    assert path.read_bytes() == b"precious"


def test_create_refuses_to_overwrite_a_key_it_made(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    first = LocalKeyService.create(path)
    with pytest.raises(ConfigError):
        LocalKeyService.create(path)
    assert first.key_id == LocalKeyService.load(path).key_id


def test_load_refuses_a_missing_file_without_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "secret-dir" / "kek"
    with pytest.raises(ConfigError) as info:
        LocalKeyService.load(path)
    assert "secret-dir" not in info.value.message
    assert "modelkeep init" in info.value.message


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_load_refuses_a_key_file_open_to_group_or_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek"
    LocalKeyService.create(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        LocalKeyService.load(path)
    assert "chmod 600" in info.value.message
    assert str(tmp_path) not in info.value.message


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_load_refuses_a_key_file_of_the_wrong_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(size))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        LocalKeyService.load(path)
    assert "exactly 32 bytes" in info.value.message
    assert str(tmp_path) not in info.value.message


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError):
        LocalKeyService.load(path)
