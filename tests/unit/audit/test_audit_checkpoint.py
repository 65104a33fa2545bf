"""CheckpointSigner key files and checkpoint signatures."""

from __future__ import annotations

import dataclasses
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelkeep.audit import (
    KEY_FILE,
    CheckpointSigner,
    load_public_key,
    public_key_path,
    verify_checkpoint,
)
from modelkeep.errors import ConfigError

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
HEAD = "c0ffee" + "0" * 58


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / KEY_FILE


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_an_owner_only_private_key_and_a_public_key_beside_it(
    key_path: Path,
) -> None:
    signer = CheckpointSigner.create(key_path)

    pub = key_path.parent / "audit-signing.key.pub"
    assert public_key_path(key_path) == pub
    assert (mode(key_path), mode(pub)) == (0o600, 0o644)
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert CheckpointSigner.load(key_path).key_id == signer.key_id
    assert verify_checkpoint(signer.sign(seq=1, head_hash=HEAD, time=NOW), load_public_key(pub))


def test_create_refuses_to_overwrite_an_existing_key(key_path: Path) -> None:
    CheckpointSigner.create(key_path)
    before = key_path.read_bytes()

    with pytest.raises(ConfigError, match="refusing to overwrite") as caught:
        CheckpointSigner.create(key_path)

    assert key_path.read_bytes() == before
    assert str(key_path.parent) not in caught.value.message


def test_create_refuses_when_only_the_public_key_exists(key_path: Path) -> None:
    public_key_path(key_path).write_text("someone else's key")

    with pytest.raises(ConfigError, match="refusing to overwrite"):
        CheckpointSigner.create(key_path)

    assert not key_path.exists()


def test_load_refuses_a_key_others_can_read(key_path: Path) -> None:
    CheckpointSigner.create(key_path)
    key_path.chmod(0o640)

    with pytest.raises(ConfigError, match="owner only"):
        CheckpointSigner.load(key_path)


def test_load_refuses_a_missing_or_damaged_key(key_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        CheckpointSigner.load(key_path)
    key_path.write_bytes(b"not a key")
    key_path.chmod(0o600)
    with pytest.raises(ConfigError, match="damaged"):
        CheckpointSigner.load(key_path)


def test_load_refuses_a_public_key_file_of_another_key(key_path: Path, tmp_path: Path) -> None:
    CheckpointSigner.create(key_path)
    CheckpointSigner.create(tmp_path / "other.key")
    public_key_path(key_path).write_bytes(public_key_path(tmp_path / "other.key").read_bytes())

    with pytest.raises(ConfigError, match="does not match"):
        CheckpointSigner.load(key_path)


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 2},
        {"head_hash": "f" * 64},
        {"time": NOW + timedelta(microseconds=1)},
        {"key_id": "0" * 16},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_checkpoint_verifies_only_exactly_as_signed(change: dict[str, object]) -> None:
    signer = CheckpointSigner(Ed25519PrivateKey.generate())
    checkpoint = signer.sign(seq=1, head_hash=HEAD, time=NOW)

    assert verify_checkpoint(checkpoint, signer.public_key)
    assert not verify_checkpoint(dataclasses.replace(checkpoint, **change), signer.public_key)


def test_a_checkpoint_does_not_verify_with_another_public_key() -> None:
    checkpoint = CheckpointSigner.generate().sign(seq=1, head_hash=HEAD, time=NOW)

    assert not verify_checkpoint(checkpoint, CheckpointSigner.generate().public_key)
